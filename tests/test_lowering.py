"""The train step lowers for the platforms jaxsft is for, from this CPU host: `jax.export` with
`platforms=['tpu']` / `['cuda']` builds the program a TPU or GPU would compile (full, LoRA,
QLoRA; scanned layers), with the attention kernel meant for that platform. What JAX cannot
build without the device's plugin is skipped with JAX's reason; scripts/device_check.sh covers
it on a GPU."""

import pytest

from jaxsft.config import default_config
from jaxsft.models import attention as attention_lib
from jaxsft.train import plan
from jaxsft.train.run import run_settings

ARCH = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=1024)


def step_config(method: str, implementation: str):
  config = default_config()
  config.model.path = ''
  config.model.architecture = ARCH
  config.model.scan_layers = True
  config.model.attention_implementation = implementation
  config.data.max_seq_len = 256  # splash needs a multiple of 128
  config.batch_size = 8
  config.lora.enabled = method in ('lora', 'qlora')
  config.lora.rank = 4
  config.quant.kind = 'nf4' if method == 'qlora' else 'none'
  return config


def skip_without_cudnn(implementation: str) -> None:
  reason = attention_lib.cudnn_unavailable()
  if implementation == 'cudnn' and reason:
    pytest.skip(f'{reason}: a CUDA program with cuDNN attention needs jax\'s CUDA plugin '
                '(jax[cuda]); scripts/device_check.sh builds and runs it on a GPU')


@pytest.mark.parametrize('method', ['full', 'lora', 'qlora'])
@pytest.mark.parametrize('platform,implementation', [('tpu', 'splash'), ('cuda', 'xla'),
                                                     ('cuda', 'cudnn')])
def test_train_step_lowers_for_the_platform(method, platform, implementation):
  skip_without_cudnn(implementation)
  lowering = plan.lower_for_platform(run_settings(step_config(method, implementation)), platform)
  assert (lowering.attention, lowering.fallback_reason) == (implementation, None)
  if implementation in ('splash', 'cudnn'):  # the fused kernel is in the program itself
    assert lowering.kernel_calls > 0
  else:
    assert lowering.kernel_calls == 0
  assert lowering.stablehlo_bytes > 0


def test_splash_lowers_on_a_mesh_that_splits_heads():
  """A TPU slice with tensor parallelism: splash runs per device on its rows and heads."""
  config = step_config('full', 'splash')
  config.mesh.shape = (4, 1, 2)
  lowering = plan.lower_for_platform(run_settings(config), 'tpu')
  assert lowering.attention == 'splash' and lowering.kernel_calls > 0


@pytest.mark.parametrize('platform,intended', [('tpu', 'splash'), ('cuda', 'cudnn')])
def test_auto_picks_the_kernel_meant_for_the_platform_it_is_lowered_for(platform, intended):
  """`auto` follows the platform the program is built for, not the host's CPU backend."""
  skip_without_cudnn(intended)
  lowering = plan.lower_for_platform(run_settings(step_config('lora', 'auto')), platform)
  assert lowering.attention == intended and lowering.kernel_calls > 0


def test_a_trace_gets_branches_for_the_platforms_it_may_be_built_for():
  """The host's, the requested kernel's own, or those `target_platforms` declares; no more (a
  branch costs its tracing time)."""
  host = attention_lib.host_platform()
  assert attention_lib._candidate_platforms('auto') == (host,)
  assert set(attention_lib._candidate_platforms('cudnn')) == {host, 'cuda'}
  assert set(attention_lib._candidate_platforms('splash')) == {host, 'tpu'}
  with attention_lib.target_platforms(['tpu', 'cuda']):
    assert attention_lib._candidate_platforms('auto') == ('tpu', 'cuda')
  with pytest.raises(ValueError, match='unknown platforms'):
    with attention_lib.target_platforms(['gpu']):
      pass


def test_the_kernel_choice_per_platform():
  """What `auto` and explicit requests resolve to on each platform, and the reasons given when
  a request cannot serve (bf16 activations, self-attention over a whole row)."""
  import jax
  import jax.numpy as jnp
  q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
  choose = attention_lib.choose
  assert choose('auto', 'tpu', q, q) == ('splash', None)
  assert choose('auto', 'cpu', q, q) == ('blocked', None)
  assert choose('auto', 'rocm', q, q) == ('blocked', None)
  cuda, reason = choose('auto', 'cuda', q, q)
  assert (cuda, reason) == (('cudnn', None) if attention_lib.cudnn_unavailable() is None else
                            ('blocked', attention_lib.cudnn_unavailable()))
  assert choose('splash', 'cpu', q, q) == ('splash', None)  # interpreted off a TPU
  chosen, reason = choose('cudnn', 'tpu', q, q)
  assert chosen == 'blocked' and 'NVIDIA GPUs' in reason
  f32 = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.float32)
  assert 'bf16/fp16' in choose('cudnn', 'cuda', f32, f32)[1]
  short = jax.ShapeDtypeStruct((2, 200, 4, 64), jnp.bfloat16)
  assert choose('splash', 'tpu', short, short)[0] in ('blocked', 'xla')
  decode = jax.ShapeDtypeStruct((2, 1, 4, 64), jnp.bfloat16)
  assert choose('auto', 'tpu', decode, q, q_offset=5) == (
      'xla', 'splash attention serves self-attention over a whole row only (no KV cache)')
