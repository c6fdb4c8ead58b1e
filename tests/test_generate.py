"""KV-cache generation: greedy decoding equals transformers' `generate`, with and without
LoRA, for batches of prompts of different lengths; sampling filters behave."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jaxsft.interop import hf

from hf_reference import make_model

# The module: `from jaxsft.eval import generate` is its function of that name.
generate = importlib.import_module('jaxsft.eval.generate')


def hf_greedy(model, prompt, new_tokens):
  with torch.no_grad():
    out = model.generate(torch.as_tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12, 200], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize('variant', ['llama3_gqa', 'mistral_window5', 'qwen2_bias'])
@pytest.mark.parametrize('scan', [True, False])
def test_greedy_equals_transformers(tmp_path, variant, scan):
  model = make_model(variant)
  model.save_pretrained(tmp_path)
  config, params = hf.load_checkpoint(tmp_path, config_overrides={'scan_layers': scan})
  ours = generate.generate(config, {'params': params}, PROMPTS,
                           generate.SamplingConfig(max_new_tokens=24))
  for prompt, tokens in zip(PROMPTS, ours):
    assert tokens == hf_greedy(model, prompt, 24)


def test_greedy_with_lora_equals_peft(tmp_path):
  model = make_model('llama2_mha')
  model.save_pretrained(tmp_path)
  config, params = hf.load_checkpoint(tmp_path)
  peft_model = peft.get_peft_model(model, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'down_proj'], lora_dropout=0.0,
      init_lora_weights=False)).eval()
  peft_model.save_pretrained(tmp_path / 'adapter')
  from jaxsft.adapters import lora
  from jaxsft.interop import peft as peft_io
  settings = lora.LoraSettings(rank=4, alpha=8.0, targets=('q_proj', 'v_proj', 'down_proj'))
  abstract = lora.abstract_lora(hf.abstract_params(config), settings)
  adapters, _ = peft_io.load_peft_adapter(str(tmp_path / 'adapter'), abstract, config.num_layers)
  config = config.with_lora(settings)
  assert config.lora_scale == 2.0
  ours = generate.generate(config, {'params': params, 'lora': adapters}, PROMPTS[:2],
                           generate.SamplingConfig(max_new_tokens=24))
  for prompt, tokens in zip(PROMPTS[:2], ours):
    assert tokens == hf_greedy(peft_model, prompt, 24)


def test_cache_and_uncached_decoding_agree_and_stop_tokens(tmp_path):
  model = make_model('llama3_gqa')
  model.save_pretrained(tmp_path)
  config, params = hf.load_checkpoint(tmp_path)
  cached = generate.generate(config, {'params': params}, [PROMPTS[0]],
                             generate.SamplingConfig(max_new_tokens=12))[0]
  assert cached == generate.generate_uncached(config, {'params': params}, PROMPTS[0], 12)
  stopped = generate.generate(config, {'params': params}, [PROMPTS[0]],
                              generate.SamplingConfig(max_new_tokens=12),
                              stop_ids=[cached[3]])[0]
  assert stopped == cached[:cached.index(cached[3])]


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  top2 = generate._filter_logits(logits, 2, 1.0)  # pylint: disable=protected-access
  assert np.isfinite(np.asarray(top2)).sum() == 4 and (np.asarray(top2)[0, 2:] < -1e30).all()
  nucleus = np.asarray(generate._filter_logits(logits, 0, 0.75))  # pylint: disable=protected-access
  assert (nucleus[0, :2] > -1e30).all() and (nucleus[0, 2:] < -1e30).all()
  samples = [int(generate._choose(logits, jax.random.key(i), generate.SamplingConfig(  # pylint: disable=protected-access
      temperature=1.0, top_p=0.75))[0]) for i in range(50)]
  assert set(samples) <= {0, 1} and len(set(samples)) == 2


def test_generation_with_a_4bit_base_and_on_a_sharded_mesh(tmp_path):
  from jaxsft.adapters import quant
  from jaxsft.parallel import mesh as mesh_lib
  model = make_model('llama3_gqa')
  model.save_pretrained(tmp_path)
  config, params = hf.load_checkpoint(tmp_path)
  sampling = generate.SamplingConfig(max_new_tokens=10)
  quantized = quant.quantize(params)
  assert (generate.generate(config, {'params': quantized}, PROMPTS, sampling) ==
          generate.generate(config, {'params': quant.dequantize_params(quantized)}, PROMPTS,
                            sampling))
  mesh = mesh_lib.make_mesh((1, 4, 2))
  _, sharded = hf.load_checkpoint(tmp_path, mesh=mesh)
  assert len(sharded['layers']['mlp']['up_proj']['kernel'].sharding.device_set) == 8
  assert (generate.generate(config, {'params': sharded}, PROMPTS, sampling) ==
          generate.generate(config, {'params': params}, PROMPTS, sampling))
