"""`indexed_attention` computes the reference attention for queries and keys in any known order
(the zig-zag layout of context parallelism), with gradients, and skips invisible blocks; the
ring of context parallelism gives the same passing key/value chunks around the devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.models import attention as attn
from jaxsft.models import indexed_attention as ia
from jaxsft.models.ring_attention import ring_attention

B, ROW, HEADS, KV_HEADS, DIM = 2, 64, 4, 2, 8
# Row 0: examples [0, 20), [20, 45), [45, 58), padding; row 1: [0, 9), [9, 40), padding.
SEGMENTS = np.zeros((B, ROW), np.int32)
SEGMENTS[0, :20], SEGMENTS[0, 20:45], SEGMENTS[0, 45:58] = 1, 2, 3
SEGMENTS[1, :9], SEGMENTS[1, 9:40] = 1, 2


def zigzag(row: int, context: int, shard: int) -> np.ndarray:
  """Row positions of shard `shard`'s queries: natural chunks shard and 2c-1-shard."""
  chunk = row // (2 * context)
  return np.concatenate([np.arange(shard * chunk, (shard + 1) * chunk),
                         np.arange((2 * context - 1 - shard) * chunk,
                                   (2 * context - shard) * chunk)]).astype(np.int32)


def gathered(row: int, context: int) -> np.ndarray:
  """Row positions of the all-gathered keys: every shard's zig-zag positions, shard by shard."""
  return np.concatenate([zigzag(row, context, i) for i in range(context)])


def natural_qkv(seed=0):
  """q, k, v of a row in natural order and output weights `[B, 32, N, H]` (numpy float32:
  indexing them costs no compiles)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  return (normal(B, ROW, HEADS, DIM), normal(B, ROW, KV_HEADS, DIM),
          normal(B, ROW, KV_HEADS, DIM), normal(B, ROW // 2, HEADS, DIM))


def with_grads(fn, q, k, v, weights):
  """fn(q, k, v) and the gradients of sum(weights * fn(q, k, v)) w.r.t. q, k, v."""
  out, pullback = jax.vjp(fn, q, k, v)
  return (out, *pullback(weights))


@functools.partial(jax.jit, static_argnames=('window', 'block_q', 'block_k'))
def indexed_with_grads(q, k, v, q_seg, kv_seg, q_index, kv_index, weights, window=None,
                       block_q=8, block_k=8):
  fn = lambda q, k, v: ia.indexed_attention(q, k, v, q_seg, kv_seg, q_index, kv_index,
                                             sliding_window=window, block_q=block_q,
                                             block_k=block_k)
  return with_grads(fn, q, k, v, weights)


@functools.partial(jax.jit, static_argnames=('window',))
def natural_reference(q, k, v, segments, q_index, weights, window=None):
  """Attention over the whole row in natural order (`attention_mask`, no index arrays), then the
  rows at `q_index`; the gradients of sum(weights * those rows), in natural order."""
  mask = attn.attention_mask(segments, segments, sliding_window=window)
  fn = lambda q, k, v: attn.xla_attention(q, k, v, mask)[:, q_index]
  return with_grads(fn, q, k, v, weights)


def assert_close(actual, expected, tol=1e-5):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


@pytest.mark.parametrize('window', [None, 12])
def test_zigzag_shards_match_natural_order_reference(window):
  q, k, v, weights = natural_qkv()
  kv_index = gathered(ROW, 2)
  for shard in range(2):
    q_index = zigzag(ROW, 2, shard)
    out, dq, dk, dv = indexed_with_grads(
        q[:, q_index], k[:, kv_index], v[:, kv_index], SEGMENTS[:, q_index],
        SEGMENTS[:, kv_index], q_index, kv_index, weights, window=window)
    ref_out, ref_dq, ref_dk, ref_dv = natural_reference(q, k, v, SEGMENTS, q_index, weights,
                                                        window=window)
    assert_close(out, ref_out)
    assert_close(dq, ref_dq[:, q_index])
    assert_close(dk, ref_dk[:, kv_index])
    assert_close(dv, ref_dv[:, kv_index])


def test_natural_order_equals_causal_segment_reference():
  q, k, v, _ = natural_qkv(seed=1)
  weights = np.concatenate([natural_qkv(seed=5)[3]] * 2, axis=1)
  index = np.arange(ROW, dtype=np.int32)
  got = indexed_with_grads(q, k, v, SEGMENTS, SEGMENTS, index, index, weights, block_q=16,
                           block_k=8)
  expected = natural_reference(q, k, v, SEGMENTS, index, weights)
  for actual, reference in zip(got, expected):
    assert_close(actual, reference)


@jax.jit
def forward_8x8(q, k, v, q_seg, kv_seg, q_index, kv_index):
  return ia.indexed_attention(q, k, v, q_seg, kv_seg, q_index, kv_index, block_q=8, block_k=8)


@pytest.mark.parametrize('shard, position, segment', [(0, 50, 3), (1, 40, 2)])
def test_only_visible_keys_influence_the_output(shard, position, segment):
  """Perturbing row 0's key/value at `position` changes exactly the row-0 queries of its
  segment at or after it: not other segments' queries (shard 0: padding after 58; shard 1:
  segment 3 from 45), not earlier queries of its segment, not row 1."""
  q, k, v, _ = natural_qkv(seed=2)
  q_index, kv_index = zigzag(ROW, 2, shard), gathered(ROW, 2)
  args = q[:, q_index], k[:, kv_index], v[:, kv_index]
  rest = SEGMENTS[:, q_index], SEGMENTS[:, kv_index], q_index, kv_index
  s = int(np.flatnonzero(kv_index == position)[0])
  k_moved, v_moved = args[1].copy(), args[2].copy()
  k_moved[0, s] += 3.0
  v_moved[0, s] += 3.0
  changed = np.abs(np.asarray(forward_8x8(args[0], k_moved, v_moved, *rest))
                   - np.asarray(forward_8x8(*args, *rest))).max(axis=(2, 3)) > 0
  same_segment = SEGMENTS[0, q_index] == segment
  sees = same_segment & (q_index >= position)
  # The case can fail: some queries see the key, some of its segment are before it, and some
  # after it belong to another segment.
  assert sees.any() and (same_segment & ~sees).any()
  assert ((q_index > position) & ~same_segment).any()
  np.testing.assert_array_equal(changed[0], sees)
  assert not changed[1].any()


@pytest.mark.parametrize('case', ['segment and causal', 'window'])
def test_invisible_blocks_are_skipped(case):
  """NaN keys/values in the key blocks no query can see: computing such a block would put NaN
  in the output and dq (0 * NaN); skipping leaves the reference result on the clean values,
  and zero dk/dv for those keys. Keys in zig-zag order, so the skipped blocks are no range."""
  q, k, v, weights = natural_qkv(seed=3)
  segments = np.ones((B, ROW), np.int32)
  if case == 'segment and causal':
    # Segment 1 is [0, 24) and has no queries; keys from 56 on follow every query.
    segments[:, 24:] = 2
    q_index, hidden, window = np.arange(24, 56), np.r_[0:24, 56:64], None
  else:
    # One example; queries from 32 with a window of 12 see nothing before 21.
    q_index, hidden, window = np.arange(32, 64), np.arange(0, 16), 12
  # Key blocks of 8: [0, 8), [8, 16), [48, 56), [56, 64), [16, 24), [24, 32), ...
  kv_index = gathered(ROW, 2)
  is_hidden = np.isin(kv_index, hidden)
  q_seg, kv_seg = segments[:, q_index], segments[:, kv_index]
  blocks = np.asarray(ia.visible_blocks(q_seg, kv_seg, q_index, kv_index, sliding_window=window,
                                        block_q=8, block_k=8))
  hidden_blocks = is_hidden.reshape(-1, 8).all(axis=1)
  assert hidden_blocks.sum() >= 2 and not blocks[:, hidden_blocks].any()
  assert blocks.sum() < blocks.size - hidden_blocks.sum() * blocks.shape[0]  # causal skips too

  nan = np.where(is_hidden[None, :, None, None], np.nan, 1.0).astype(np.float32)
  got = indexed_with_grads(q[:, q_index], k[:, kv_index] * nan, v[:, kv_index] * nan, q_seg,
                           kv_seg, q_index, kv_index, weights, window=window)
  out, dq, dk, dv = natural_reference(q, k, v, segments, q_index, weights, window=window)
  for actual, reference in zip(got, (out, dq[:, q_index], dk[:, kv_index], dv[:, kv_index])):
    assert np.isfinite(np.asarray(actual)).all()
    assert_close(actual, reference)
  assert not np.asarray(got[2])[:, is_hidden].any() and not np.asarray(got[3])[:, is_hidden].any()


def test_traced_indices_inside_shard_map():
  """Two context shards under `shard_map`: each derives its query positions from
  `axis_index` and gathers the keys; together they give the natural-order reference."""
  context = 2
  mesh = jax.make_mesh((context,), ('context',), devices=jax.devices()[:context],
                       axis_types=(jax.sharding.AxisType.Auto,))
  q, k, v, _ = natural_qkv(seed=4)
  weights = np.concatenate([natural_qkv(seed=6)[3]] * 2, axis=1)
  order = gathered(ROW, context)  # shard i holds order[i * 32:(i + 1) * 32]
  chunk = ROW // (2 * context)
  spec = jax.P(None, 'context')

  def local(q, k, v, seg):
    shard = jax.lax.axis_index('context')
    offsets = jnp.arange(chunk, dtype=jnp.int32)
    q_index = jnp.concatenate([shard * chunk + offsets,
                               (2 * context - 1 - shard) * chunk + offsets])
    k_all, v_all, seg_all = (jax.lax.all_gather(x, 'context', axis=1, tiled=True)
                             for x in (k, v, seg))
    return ia.indexed_attention(q, k_all, v_all, seg, seg_all, q_index, jnp.asarray(order),
                                block_q=8, block_k=16)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
  out, dq, dk, dv = jax.jit(with_grads, static_argnums=0)(
      lambda q, k, v: sharded(q, k, v, SEGMENTS[:, order]), q[:, order], k[:, order],
      v[:, order], weights)
  ref = natural_reference(q, k, v, SEGMENTS, order, weights)
  assert_close(out, ref[0])
  for actual, reference in zip((dq, dk, dv), ref[1:]):
    assert_close(actual, reference[:, order])


@pytest.mark.parametrize('window', [None, 12])
def test_ring_passes_chunks_to_the_natural_order_reference(window):
  """`ring_attention` on four shards, each holding only its own zig-zag chunk of keys and
  values (the ring passes them around): values and gradients of the whole-row reference; with
  a window of 12 some chunks lie wholly outside a query's window."""
  context = 4
  mesh = jax.make_mesh((context,), ('context',), devices=jax.devices()[:context],
                       axis_types=(jax.sharding.AxisType.Auto,))
  q, k, v, _ = natural_qkv(seed=7)
  weights = np.concatenate([natural_qkv(seed=8)[3]] * 2, axis=1)
  order = gathered(ROW, context)
  spec = jax.P(None, 'context')

  def local(q, k, v, seg, index):
    return ring_attention(q, k, v, seg, seg, index, index, axis='context', size=context,
                          sliding_window=window)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4 + (jax.P('context'),),
                          out_specs=spec)
  out, dq, dk, dv = jax.jit(with_grads, static_argnums=0)(
      lambda q, k, v: sharded(q, k, v, SEGMENTS[:, order], order), q[:, order], k[:, order],
      v[:, order], weights)
  ref = natural_reference(q, k, v, SEGMENTS, order, weights, window=window)
  assert_close(out, ref[0])
  for actual, reference in zip((dq, dk, dv), ref[1:]):
    assert_close(actual, reference[:, order])


def test_default_blocks_and_bad_blocks():
  assert ia.default_block(64) == 64
  assert ia.default_block(2048) == 512
  assert ia.default_block(1536) == 512
  assert ia.default_block(1000) == 200
  assert ia.default_block(12) == 12
  q, k, v, _ = natural_qkv()
  index = np.arange(ROW, dtype=np.int32)
  with pytest.raises(ValueError, match='must divide'):
    ia.indexed_attention(q, k, v, SEGMENTS, SEGMENTS, index, index, block_q=24)
