"""The fused, chunked LM-head + cross-entropy equals the plain one, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.train import loss as loss_lib


def reference(hidden, kernel, targets, mask):
  logits = jnp.einsum('btd,dv->btv', hidden, kernel, preferred_element_type=jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss_sum = jnp.sum((log_z - target) * mask)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * mask)
  return loss_sum, correct


def inputs(seed=0, b=3, t=48, d=16, v=50):
  keys = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(keys[0], (b, t, d))
  kernel = jax.random.normal(keys[1], (d, v)) * 0.5
  targets = jax.random.randint(keys[2], (b, t), 0, v)
  mask = np.zeros((b, t), np.float32)
  mask[0, 5:20] = 1    # one span
  mask[1, ::3] = 1     # scattered
  # row 2 supervises nothing
  return hidden, kernel, targets, jnp.asarray(mask)


@pytest.mark.parametrize('chunk', [8, 16, 48])
def test_fused_loss_values_and_gradients_match_reference(chunk):
  hidden, kernel, targets, mask = inputs()
  got = loss_lib.fused_cross_entropy(hidden, kernel, targets, mask, chunk)
  want = reference(hidden, kernel, targets, mask)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  assert float(got[1]) == float(want[1])
  grad = jax.grad(lambda h, k: loss_lib.fused_cross_entropy(h, k, targets, mask, chunk)[0],
                  argnums=(0, 1))(hidden, kernel)
  grad_want = jax.grad(lambda h, k: reference(h, k, targets, mask)[0],
                       argnums=(0, 1))(hidden, kernel)
  for g, w in zip(grad, grad_want):
    np.testing.assert_allclose(g, w, atol=1e-5)
  # Unsupervised positions get exactly zero gradient.
  assert not np.any(np.asarray(grad[0])[np.asarray(mask) == 0])


def test_fused_loss_under_jit_and_scaled_cotangent():
  hidden, kernel, targets, mask = inputs(seed=1)
  f = jax.jit(lambda h, k: 3.0 * loss_lib.fused_cross_entropy(h, k, targets, mask, 16)[0])
  g = jax.jit(jax.grad(f, argnums=(0, 1)))(hidden, kernel)
  w = jax.grad(lambda h, k: 3.0 * reference(h, k, targets, mask)[0], argnums=(0, 1))(hidden,
                                                                                    kernel)
  for a, b in zip(g, w):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_chunk_size_divides_the_length():
  assert loss_lib.chunk_size(512, 256) == 256
  assert loss_lib.chunk_size(500, 256) == 250
  assert loss_lib.chunk_size(512, 0) == 512
  assert loss_lib.chunk_size(100, 256) == 100
