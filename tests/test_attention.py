"""Every attention implementation computes the reference (xla) function, or falls back visibly."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.models import attention as attn
from jaxsft.models import splash_attention as splash_lib


def qkv(batch, length, heads, kv_heads, head_dim, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32)
  k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), jnp.float32)
  return q, k, v


def packed_segments(batch, length, cuts):
  """Segment ids 1, 2, ... changing at `cuts`, then padding (0) after the last cut."""
  ids = np.zeros((batch, length), np.int32)
  bounds = [0] + list(cuts)
  for segment, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
    ids[:, start:end] = segment
  return jnp.asarray(ids)


def naive_attention(q, k, v, segment_ids, window=None):
  """Loop-per-query definition of the mask, independent of `attention_mask`."""
  b, t, n, h = q.shape
  group = n // k.shape[2]
  out = np.zeros(q.shape, np.float64)
  q, k, v, seg = (np.asarray(x, np.float64) for x in (q, k, v, segment_ids))
  for bi in range(b):
    for i in range(t):
      allowed = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i] and
                 (window is None or i - j < window)]
      for head in range(n):
        scores = np.array([q[bi, i, head] @ k[bi, j, head // group] for j in allowed]) / np.sqrt(h)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[bi, i, head] = sum(w * v[bi, j, head // group] for w, j in zip(weights, allowed))
  return out


@pytest.mark.parametrize('window', [None, 3])
def test_xla_attention_matches_the_definition(window):
  q, k, v = qkv(2, 12, 4, 2, 8)
  segment_ids = packed_segments(2, 12, (4, 9))
  out = attn.attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                       implementation='xla', sliding_window=window)
  np.testing.assert_allclose(out[:, :9], naive_attention(q, k, v, segment_ids, window)[:, :9],
                             atol=1e-5)


def test_jax_nn_dot_product_attention_path_uses_the_same_mask():
  """The cudnn implementation hands this mask to `jax.nn.dot_product_attention`; run that call
  with XLA's kernel (the CPU has no cuDNN) to check the arguments mean the reference."""
  q, k, v = qkv(2, 16, 8, 2, 16, seed=1)
  segment_ids = packed_segments(2, 16, (5, 12, 14))
  mask = attn.attention_mask(segment_ids, segment_ids, sliding_window=6)
  via_jax_nn = attn.dot_product_attention(q, k, v, mask, implementation='xla')
  reference = attn.xla_attention(q, k, v, mask)
  np.testing.assert_allclose(via_jax_nn, reference, atol=1e-5)


def test_cudnn_on_cpu_falls_back_to_xla_with_a_warning(caplog):
  attn._warn_once.cache_clear()
  q, k, v = qkv(1, 8, 4, 4, 8, seed=2)
  segment_ids = packed_segments(1, 8, (3, 8))
  with caplog.at_level(logging.WARNING):
    out = attn.attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                         implementation='cudnn')
  assert "'cudnn' cannot serve this call" in caplog.text and 'falling back to xla' in caplog.text
  reference = attn.attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
  np.testing.assert_array_equal(out, reference)


@pytest.mark.parametrize('window', [None, 40])
def test_splash_attention_interpreted_matches_xla(window):
  """The TPU kernel (Pallas splash attention) run in interpret mode on the CPU, segment ids,
  GQA and a sliding window included."""
  q, k, v = qkv(1, 128, 4, 2, 64, seed=3)
  segment_ids = packed_segments(1, 128, (50, 100, 120))
  splash = splash_lib.splash_attention(q, k, v, segment_ids, sliding_window=window,
                                       interpret=True)
  mask = attn.attention_mask(segment_ids, segment_ids, sliding_window=window)
  np.testing.assert_allclose(splash, attn.xla_attention(q, k, v, mask), atol=2e-5)


def test_splash_refuses_a_kv_cache_and_falls_back(caplog):
  attn._warn_once.cache_clear()
  q, _, _ = qkv(1, 1, 4, 2, 8, seed=4)
  _, k, v = qkv(1, 8, 4, 2, 8, seed=5)
  with caplog.at_level(logging.WARNING):
    attn.attention(q, k, v, q_segment_ids=jnp.ones((1, 1), jnp.int32),
                   kv_segment_ids=jnp.ones((1, 8), jnp.int32), implementation='splash',
                   q_offset=7)
  assert 'splash' in caplog.text and 'falling back to xla' in caplog.text


def random_packing(batch, length, seed, pad=0):
  """Segments of random lengths per row (different boundaries in every row), padding last."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    start, segment = 0, 1
    while start < length - pad:
      size = min(int(rng.integers(5, 60)), length - pad - start)
      ids[row, start:start + size] = segment
      start, segment = start + size, segment + 1
  return jnp.asarray(ids)


@pytest.mark.parametrize('window,kv_heads,max_logits', [
    (None, 2, None), (40, 4, None), (None, 1, None), (None, 2, 2048), (40, 1, 4096)])
def test_blocked_attention_matches_xla_values_and_gradients(window, kv_heads, max_logits,
                                                            monkeypatch):
  """Same outputs and the same q/k/v gradients as the reference, over rows whose examples
  start at different places (the skipped blocks differ per query block); with `max_logits`,
  long key spans take their queries in chunks (the long-row path)."""
  from jaxsft.models import blocked_attention as blocked
  if max_logits:
    monkeypatch.setattr(blocked, 'MAX_LOGITS_PER_HEAD', max_logits)
    assert blocked.query_chunk(64, 256) == max_logits // 256
  q, k, v = qkv(3, 256, 4, kv_heads, 16, seed=1)
  segment_ids = random_packing(3, 256, seed=2, pad=7)
  weights = jax.random.normal(jax.random.key(3), q.shape)

  def loss(implementation):
    def f(q, k, v):
      out = attn.attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                           implementation=implementation, sliding_window=window)
      return jnp.sum(out * weights), out
    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  (_, ref_out), ref_grads = loss('xla')
  (_, out), grads = loss('blocked')
  np.testing.assert_allclose(out, ref_out, atol=2e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=5e-5)


def test_query_chunks_bound_the_logits_of_long_rows():
  from jaxsft.models import blocked_attention as blocked
  assert blocked.query_chunk(128, 2048) == 128  # short rows: the whole block at once
  block = blocked.block_size(16384)
  assert block == 1024
  chunk = blocked.query_chunk(block, 16384)
  assert block % chunk == 0 and chunk * 16384 <= blocked.MAX_LOGITS_PER_HEAD and chunk == 16


def test_blocked_attention_skips_blocks_before_every_example():
  from jaxsft.models import blocked_attention as blocked
  segment_ids = packed_segments(2, 256, (64, 200, 256))
  assert blocked.block_size(256) == 64
  # Query block 3 (192..255) holds the examples starting at 64 and 200: it needs blocks 1..3.
  np.testing.assert_array_equal(blocked._lookbacks(segment_ids, 64, None), [0, 0, 1, 2])
  np.testing.assert_array_equal(blocked._lookbacks(segment_ids, 64, 10), [0, 0, 1, 1])
  # Any segment id layout stays exact: an id that reappears later is seen from its first run.
  ids = jnp.asarray(np.r_[np.full(64, 1), np.full(128, 2), np.full(64, 1)][None], jnp.int32)
  np.testing.assert_array_equal(blocked._lookbacks(ids, 64, None), [0, 0, 1, 3])


def test_blocked_attention_bf16_close_to_xla():
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(2, 128, 4, 2, 16, seed=4))
  segment_ids = random_packing(2, 128, seed=5)
  kwargs = dict(q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
  out = attn.attention(q, k, v, implementation='blocked', **kwargs)
  ref = attn.attention(q, k, v, implementation='xla', **kwargs)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
