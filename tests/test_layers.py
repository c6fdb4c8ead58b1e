"""The matmul building blocks: float32 accumulation of bf16 dots on CPU, and the custom backwards
of `dense` and RoPE against autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.adapters import lora
from jaxsft.interop import hf
from jaxsft.models import Llama, LlamaConfig
from jaxsft.models.layers import accumulation_dtype, dense, low_rank_update
from jaxsft.models.rope import apply_rotary, inverse_frequencies, rotary_angles
from jaxsft.train.loss import fused_cross_entropy


def _tanh_loss(fn, weights):
  return lambda *args: jnp.sum(jnp.tanh(fn(*args).astype(jnp.float32)) * weights)


def test_bf16_dots_accumulate_in_float32_on_cpu_only_for_bf16():
  assert jax.default_backend() == 'cpu'
  assert accumulation_dtype(jnp.bfloat16) == jnp.float32
  assert accumulation_dtype(jnp.float32) is None


def test_dense_matches_float32_and_returns_the_kernel_gradient_in_its_dtype():
  """bf16 activations, a float32 master kernel: the value and gradients are those of float32
  math on the bf16-rounded operands (one rounding of each result), and the kernel's gradient
  comes back in float32."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(32, 24)) * 0.2, jnp.float32)
  weights = rng.normal(size=(2, 16, 24)).astype(np.float32)
  reference = lambda x, k: jnp.einsum(  # noqa: E731
      '...i,io->...o', x.astype(jnp.float32), k.astype(jnp.bfloat16).astype(jnp.float32))
  got = dense(x, kernel)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), reference(x, kernel), rtol=1e-2,
                             atol=1e-2)
  dx, dkernel = jax.grad(_tanh_loss(dense, weights), argnums=(0, 1))(x, kernel)
  want_dx, want_dkernel = jax.grad(_tanh_loss(reference, weights), argnums=(0, 1))(x, kernel)
  assert dx.dtype == jnp.bfloat16 and dkernel.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dx, np.float32), want_dx, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(dkernel, want_dkernel, rtol=2e-2, atol=5e-2)


def test_low_rank_update_returns_adapter_gradients_in_the_adapters_dtype():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.bfloat16)
  a_ir = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  b_ro = jnp.asarray(rng.normal(size=(4, 12)), jnp.float32)
  weights = rng.normal(size=(2, 8, 12)).astype(np.float32)
  reference = lambda x, a, b: jnp.einsum(  # noqa: E731
      '...i,ir,ro->...o', x.astype(jnp.float32), a, b)
  grads = jax.grad(_tanh_loss(low_rank_update, weights), argnums=(0, 1, 2))(x, a_ir, b_ro)
  want = jax.grad(_tanh_loss(reference, weights), argnums=(0, 1, 2))(x, a_ir, b_ro)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]
  for g, w in zip(grads, want):
    scale = np.abs(np.asarray(w)).max()
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(w) / scale,
                               atol=3e-2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_rotary_backward_is_the_inverse_rotation(dtype):
  """The custom backward (rotate by -angle) equals autodiff of the rotate-half formula."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 12, 3, 16)), dtype)
  positions = jnp.asarray(rng.integers(0, 100, (2, 12)), jnp.int32)
  cos, sin = rotary_angles(positions, inverse_frequencies(16, 10000.0, None), dtype)
  weights = rng.normal(size=x.shape).astype(np.float32)

  def plain(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]

  np.testing.assert_array_equal(np.asarray(apply_rotary(x, cos, sin), np.float32),
                                np.asarray(plain(x, cos, sin), np.float32))
  got = jax.grad(_tanh_loss(apply_rotary, weights))(x, cos, sin)
  want = jax.grad(_tanh_loss(plain, weights))(x, cos, sin)
  tolerance = 1e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tolerance)


def _dot_generals(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _dot_generals(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _dot_generals(sub)


@pytest.mark.parametrize('implementation', ['xla', 'blocked'])
def test_every_bf16_dot_of_a_lora_step_accumulates_in_float32_on_cpu(implementation):
  """The slow path of XLA:CPU (a bf16-out dot, computed in f32 on upcast operands at half the
  rate) must not appear anywhere in the forward or backward of a bf16 LoRA step."""
  config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                       num_heads=4, num_kv_heads=2, dtype=jnp.bfloat16,
                       attention_implementation=implementation)
  params = nn.unbox(Llama(config).init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32)))
  params = params['params']
  adapters = lora.init_lora(jax.random.key(1), lora.abstract_lora(
      hf.abstract_params(config), lora.LoraSettings(rank=4, targets=('all-linear',))))
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 128, (2, 128)), jnp.int32)
  segments = jnp.ones_like(tokens)

  def loss(adapters):
    hidden = Llama(config.replace(lora_scale=1.0)).apply(
        {'params': params, 'lora': adapters}, tokens, segment_ids=segments, return_hidden=True)
    kernel = jnp.asarray(params['lm_head']['kernel'], jnp.bfloat16)
    return fused_cross_entropy(hidden, kernel, tokens, segments, 16)[0]

  dots = list(_dot_generals(jax.make_jaxpr(jax.grad(loss))(adapters).jaxpr))
  bf16_dots = [eqn for eqn in dots
               if all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars)]
  assert len(bf16_dots) > 20, len(dots)
  slow = [str(eqn)[:200] for eqn in bf16_dots
          if eqn.params['preferred_element_type'] != jnp.float32]
  assert not slow, slow
  if implementation == 'blocked':
    # The training path writes its own backward; the `xla` reference's autodiff backward
    # multiplies float32 logit gradients into bf16 keys and queries.
    mixed = [str(eqn)[:200] for eqn in dots
             if len({v.aval.dtype for v in eqn.invars}) > 1]
    assert not mixed, mixed
