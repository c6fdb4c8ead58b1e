"""RoPE scalings (yarn, dynamic, linear, llama3) equal transformers', beyond the original context.

The scaled models have an original context of 32 tokens and are run on 96 (or positions up to
87): every scaling then changes the frequencies, and the logits of the tiny fp32 models of
`hf_reference` must still equal transformers' within 1e-4.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxsft.interop import hf
from jaxsft.interop.hf_config import config_from_hf, config_to_hf
from jaxsft.models import Llama
from jaxsft.models.config import ROPE_TYPES, LlamaConfig
from jaxsft.models.rope import rope_init, rotary_embedding, rotary_frequencies

from hf_reference import make_model, random_tokens, torch_logits

ORIGINAL = 32  # pretraining context of the scaled models
LENGTH = 96  # three times beyond it


def _yarn(**fields):
  return {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': ORIGINAL,
          **fields}


# name -> (hf_reference variant, config overrides). YaRN models are declared 4x longer than
# their original context; dynamic NTK takes `max_position_embeddings` as the original context.
MODEL_CASES = {
    'yarn-llama2': ('llama2_mha', dict(max_position_embeddings=4 * ORIGINAL,
                                       rope_scaling=_yarn())),
    'yarn-qwen2': ('qwen2_bias', dict(max_position_embeddings=4 * ORIGINAL,
                                      rope_scaling=_yarn())),
    'yarn_attention_factor-mistral': ('mistral', dict(
        max_position_embeddings=4 * ORIGINAL, rope_scaling=_yarn(attention_factor=0.8))),
    'yarn_mscale-qwen3': ('qwen3', dict(
        max_position_embeddings=4 * ORIGINAL, rope_scaling=_yarn(mscale=1.0,
                                                                 mscale_all_dim=0.5))),
    'yarn_untruncated-llama2': ('llama2_mha', dict(
        max_position_embeddings=4 * ORIGINAL, rope_theta=1e6,
        rope_scaling=_yarn(truncate=False, beta_fast=8.0, beta_slow=2.0))),
    # DeepSeek-V3's convention: no factor, the ratio of the two contexts instead.
    'yarn_implicit_factor-qwen2': ('qwen2_bias', dict(
        max_position_embeddings=4 * ORIGINAL, rope_scaling=_yarn(factor=None))),
    'dynamic-llama2': ('llama2_mha', dict(
        max_position_embeddings=ORIGINAL, rope_scaling={'rope_type': 'dynamic', 'factor': 2.0})),
    'dynamic-qwen3': ('qwen3', dict(
        max_position_embeddings=ORIGINAL, rope_scaling={'rope_type': 'dynamic', 'factor': 3.0})),
    'linear-mistral': ('mistral', dict(
        max_position_embeddings=ORIGINAL, rope_scaling={'rope_type': 'linear', 'factor': 4.0})),
    'linear-qwen3': ('qwen3', dict(
        max_position_embeddings=ORIGINAL, rope_scaling={'rope_type': 'linear', 'factor': 2.0})),
}


def _load_pair(tmp_path, variant, overrides):
  """A fresh torch model (dynamic RoPE is stateful there) and the same model in jaxsft."""
  torch_model = make_model(variant, **overrides)
  torch_model.save_pretrained(tmp_path)
  config, params = hf.load_checkpoint(tmp_path)
  return torch_model, config, params


@pytest.mark.parametrize('case', sorted(MODEL_CASES))
def test_logits_match_transformers_beyond_the_original_context(tmp_path, case):
  variant, overrides = MODEL_CASES[case]
  torch_model, config, params = _load_pair(tmp_path, variant, overrides)
  assert config.rope_scaling['rope_type'] == overrides['rope_scaling']['rope_type']
  tokens = random_tokens(2, LENGTH, seed=4)
  logits = np.asarray(Llama(config).apply({'params': params}, tokens))
  reference = torch_logits(torch_model, tokens)
  assert np.abs(logits - reference).max() <= 1e-4
  assert np.abs(reference).max() > 1.0  # the weights are large enough for a real comparison


def test_dynamic_follows_the_largest_position_of_the_whole_batch(tmp_path):
  """Row 0 (positions 0..47) gets the frequencies of row 1's last position (87, so a length of
  88), as in transformers given the same `position_ids`; alone it would get those of 48."""
  torch_model, config, params = _load_pair(tmp_path, 'llama2_mha', MODEL_CASES['dynamic-llama2'][1])
  tokens = random_tokens(2, 48, seed=5)
  positions = np.stack([np.arange(48), np.arange(48) + 40]).astype(np.int32)
  forward = jax.jit(lambda positions: Llama(config).apply({'params': params}, tokens,
                                                            positions=positions))
  logits = np.asarray(forward(positions))
  with torch.no_grad():
    reference = torch_model(torch.as_tensor(tokens, dtype=torch.long),
                            position_ids=torch.as_tensor(positions, dtype=torch.long)
                            ).logits.numpy()
  assert np.abs(logits - reference).max() <= 1e-4
  # Row 0 next to a row as short as itself: the frequencies of 48, other logits for row 0.
  alone = np.asarray(forward(np.stack([positions[0], positions[0]])))
  assert np.abs(alone[0] - logits[0]).max() > 1e-3


def _hf_config(head_dim, theta, max_position_embeddings, rope_scaling):
  return transformers.LlamaConfig(
      hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
      max_position_embeddings=max_position_embeddings, rope_theta=theta,
      rope_scaling=dict(rope_scaling))


# (head_dim, theta, max_position_embeddings, rope_scaling), at sizes of real checkpoints too.
FREQUENCY_CASES = {
    'yarn': (16, 1e4, 128, _yarn()),
    'yarn_qwen_128k': (128, 1e6, 131072, {'rope_type': 'yarn', 'factor': 4.0,
                                          'original_max_position_embeddings': 32768}),
    'yarn_untruncated': (32, 1e6, 128, _yarn(truncate=False, beta_fast=16, beta_slow=2)),
    'yarn_mscale': (64, 5e5, 32768, {'rope_type': 'yarn', 'factor': 8.0, 'mscale': 1.0,
                                     'mscale_all_dim': 0.8,
                                     'original_max_position_embeddings': 4096}),
    'yarn_equal_mscales': (128, 1e4, 32768, {'rope_type': 'yarn', 'factor': 8.0, 'mscale': 0.707,
                                             'mscale_all_dim': 0.707,
                                             'original_max_position_embeddings': 4096}),
    'yarn_attention_factor': (16, 1e4, 128, _yarn(attention_factor=0.8)),
    'yarn_implicit_factor': (16, 1e4, 128, _yarn(factor=None)),
    'yarn_implicit_original': (16, 1e4, 128, {'rope_type': 'yarn', 'factor': 4.0}),
    'dynamic': (16, 1e4, 32, {'rope_type': 'dynamic', 'factor': 2.0}),
    'dynamic_large': (128, 5e5, 4096, {'rope_type': 'dynamic', 'factor': 3.0}),
    'linear': (16, 1e4, 32, {'rope_type': 'linear', 'factor': 4.0}),
    'llama3': (128, 5e5, 131072, {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                  'high_freq_factor': 4.0,
                                  'original_max_position_embeddings': 8192}),
}


@pytest.mark.parametrize('case', sorted(FREQUENCY_CASES))
def test_inverse_frequencies_equal_transformers(case):
  head_dim, theta, context, scaling = FREQUENCY_CASES[case]
  hf_config = _hf_config(head_dim, theta, context, scaling)
  want, want_factor = ROPE_INIT_FUNCTIONS[scaling['rope_type']](hf_config)
  got, got_factor = rope_init(head_dim, theta, scaling, context)
  assert got.dtype == np.float32 and got.shape == (head_dim // 2,)
  # torch's float32 pow is off by an ulp now and then; everything else rounds as there.
  np.testing.assert_allclose(got, want.numpy(), rtol=3e-7, atol=0)
  assert got_factor == pytest.approx(want_factor, rel=1e-15)


@pytest.mark.parametrize('case', ['dynamic', 'dynamic_large'])
def test_dynamic_frequencies_equal_transformers_at_every_length(case):
  """One jit for all lengths: within the context the plain frequencies, beyond it transformers'
  recomputation from `max(position_ids) + 1` (a decoding-sized window of positions here)."""
  head_dim, theta, context, scaling = FREQUENCY_CASES[case]
  hf_config = _hf_config(head_dim, theta, context, scaling)
  kwargs = dict(head_dim=head_dim, theta=theta, rope_scaling=scaling,
                max_position_embeddings=context)
  frequencies = jax.jit(lambda positions: rotary_frequencies(positions, **kwargs)[0])
  embed = jax.jit(lambda positions: rotary_embedding(positions, dtype=jnp.float32, **kwargs))
  short = rope_init(head_dim, theta, None)[0]
  for last in (context // 2, context - 1, context, context + 1, 3 * context + 5):
    positions = np.arange(last - 3, last + 1, dtype=np.int32)[None]
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)  # fresh
    with torch.no_grad():
      want_cos, want_sin = rotary(torch.zeros(1), torch.as_tensor(positions, dtype=torch.long))
    got = np.asarray(frequencies(positions))
    # float32 pow is within an ulp of torch's, not always equal (XLA's differs from torch's).
    np.testing.assert_allclose(got, rotary.inv_freq.numpy(), rtol=4e-7, atol=0)
    assert np.array_equal(got, short) == (last < context)
    # An angle is position * frequency, so those ulps move cos and sin by up to ~position * 4e-7.
    for mine, ref in zip(embed(positions), (want_cos, want_sin)):
      np.testing.assert_allclose(np.asarray(mine), ref.numpy(), rtol=0, atol=1e-6 + 4e-7 * last)


def test_yarn_attention_factor_scales_cos_and_sin():
  positions = np.arange(LENGTH, dtype=np.int32)[None]
  kwargs = dict(head_dim=16, theta=1e4, max_position_embeddings=4 * ORIGINAL, dtype=jnp.float32)
  cos, sin = rotary_embedding(positions, rope_scaling=_yarn(attention_factor=0.8), **kwargs)
  unit_cos, unit_sin = rotary_embedding(positions, rope_scaling=_yarn(attention_factor=1.0),
                                        **kwargs)
  np.testing.assert_allclose(cos, 0.8 * np.asarray(unit_cos), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(sin, 0.8 * np.asarray(unit_sin), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('rope_type', ['longrope', 'proportional', 'su'])
def test_unknown_rope_type_is_refused_with_the_supported_list(rope_type):
  with pytest.raises(ValueError, match=rope_type) as error:
    LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                num_kv_heads=2, rope_scaling={'rope_type': rope_type, 'factor': 2.0})
  for known in ROPE_TYPES:
    assert known in str(error.value)
  with pytest.raises(ValueError, match='yarn'):
    rope_init(16, 1e4, {'type': rope_type}, 32)  # transformers 4's spelling of the key


ROUND_TRIP_SCALINGS = {
    'yarn_full': _yarn(attention_factor=0.9, beta_fast=16.0, beta_slow=2.0, mscale=1.0,
                       mscale_all_dim=0.5, truncate=False),
    'yarn_plain': _yarn(),
    'dynamic': {'rope_type': 'dynamic', 'factor': 2.0},
    'linear': {'rope_type': 'linear', 'factor': 4.0},
}


@pytest.mark.parametrize('model_type', ['llama', 'mistral', 'qwen2', 'qwen3'])
@pytest.mark.parametrize('scaling', sorted(ROUND_TRIP_SCALINGS))
def test_hf_config_round_trip_keeps_the_rope_parameters(tmp_path, model_type, scaling):
  """jaxsft -> config.json -> jaxsft keeps the rope dict, and transformers reads the exported
  file to the same rope parameters (and so the same frequencies and attention factor)."""
  rope_scaling = ROUND_TRIP_SCALINGS[scaling]
  config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, rope_theta=1e6, rope_scaling=rope_scaling,
                       max_position_embeddings=4 * ORIGINAL, model_type=model_type,
                       qkv_bias=model_type == 'qwen2', qk_norm=model_type == 'qwen3')
  exported = json.loads(json.dumps(config_to_hf(config)))
  assert config_from_hf(exported).rope_scaling == rope_scaling

  (tmp_path / 'config.json').write_text(json.dumps(exported))
  loaded = transformers.AutoConfig.from_pretrained(tmp_path)
  assert loaded.rope_parameters == {**rope_scaling, 'rope_theta': 1e6}
  want, want_factor = ROPE_INIT_FUNCTIONS[rope_scaling['rope_type']](loaded)
  got, got_factor = rope_init(config.head_dim, config.rope_theta, config.rope_scaling,
                              config.max_position_embeddings)
  np.testing.assert_allclose(got, want.numpy(), rtol=3e-7, atol=0)
  assert got_factor == pytest.approx(want_factor, rel=1e-15)

  # And back: transformers' own config.json (5's `rope_parameters`) reads to the same dict.
  loaded.save_pretrained(tmp_path / 'resaved')
  again = config_from_hf(json.loads((tmp_path / 'resaved' / 'config.json').read_text()))
  assert again.rope_scaling == rope_scaling and again.rope_theta == 1e6
