"""Flash attention whose causal mask comes from explicit position arrays, in plain XLA.

This module owns the attention kernel of context parallelism. There each device holds its
queries of a row in a permuted order (the zig-zag order that balances causal work: chunks i and
2c-1-i of the row for device i of c) and the keys/values of the whole row all-gathered in
another known order. Array positions then say nothing about row positions, so the mask cannot
come from `arange` as in `attention.attention_mask` or `blocked_attention`: here query t sees
key s iff both have the same segment id, `kv_index[s] <= q_index[t]`, and, with a sliding window
W, `q_index[t] - kv_index[s] < W`, for index arrays the caller passes (traced values are fine,
e.g. from `lax.axis_index` inside `shard_map`).

Algorithm: queries are split into blocks of `block_q`, keys into blocks of `block_k`. A
`lax.scan` over query blocks runs a `lax.scan` over key blocks with the online softmax (float32
running max, sum and accumulator). Before that, `visible_blocks` decides from the data which
(query block, key block) pairs can hold a visible pair at all, and a `lax.cond` skips the
others: blocks wholly in the future of the query block (causality), wholly before the window,
or wholly before the first key of every query's example in a packed row. Skipping only saves
work: the full mask is applied inside every computed block, so the result is the reference
function (`attention.xla_attention` with the index mask) for any layout.

Memory: the forward saves q, k, v, the output and the per-query log-sum-exp (a `jax.custom_vjp`),
never a `[T, S]` tensor; the backward recomputes each visible block's probabilities (the flash
backward, with `delta = rowsum(dout * out)` and `dS = P * (dP - delta)`), so activations and
temporaries are O(T + S) plus one `[block_q, block_k]` tile per head.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models.blocked_attention import MASKED_LOGIT

MAX_BLOCK = 512
_INT_MIN = int(np.iinfo(np.int32).min)
_INT_MAX = int(np.iinfo(np.int32).max)


def default_block(length: int) -> int:
  """The largest divisor of `length` that is at most `MAX_BLOCK` and a multiple of 8, else
  `length` itself (one block)."""
  for block in range(min(MAX_BLOCK, length) // 8 * 8, 7, -8):
    if length % block == 0:
      return block
  return length


def first_visible_index(q_segment_ids_bt, kv_segment_ids_bs, q_index_t, kv_index_s,
                        sliding_window: int | None = None) -> jnp.ndarray:
  """`[B, T]` int32: a lower bound on the row index of any key query t may see: the smallest
  `kv_index` among the keys of its segment (a scatter-min by segment id, so any key order
  works), raised to the window's start. Segment ids outside `[0, S]` get no bound (int32 min);
  a segment without keys gets int32 max (the query sees nothing)."""
  b, s = kv_segment_ids_bs.shape
  slots = s + 1
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
  kv_in_range = (kv_segment_ids_bs >= 0) & (kv_segment_ids_bs < slots)
  kv_index_bs = jnp.broadcast_to(kv_index_s.astype(jnp.int32), (b, s))
  first_b_slot = jnp.full((b, slots + 1), _INT_MAX, jnp.int32).at[
      rows, jnp.where(kv_in_range, kv_segment_ids_bs, slots)].min(kv_index_bs)
  q_in_range = (q_segment_ids_bt >= 0) & (q_segment_ids_bt < slots)
  first_bt = jnp.take_along_axis(first_b_slot, jnp.where(q_in_range, q_segment_ids_bt, slots),
                                 axis=1)
  first_bt = jnp.where(q_in_range, first_bt, _INT_MIN)
  if sliding_window is not None:
    first_bt = jnp.maximum(first_bt, q_index_t.astype(jnp.int32)[None, :] - sliding_window + 1)
  return first_bt


def visible_blocks(q_segment_ids_bt, kv_segment_ids_bs, q_index_t, kv_index_s, *,
                   sliding_window: int | None = None, block_q: int, block_k: int
                   ) -> jnp.ndarray:
  """`[T / block_q, S / block_k]` bool: False where no query of the query block (in any batch
  row) can see any key of the key block, so the kernel skips it. Query block i spans indices
  `[lo_i, hi_i]`: hi_i the largest q_index in it, lo_i the smallest `first_visible_index` of its
  queries over the batch. Key block j is visible iff `min kv_index <= hi_i` (causality) and
  `max kv_index >= lo_i` (window, packed segments)."""
  t, s = q_index_t.shape[0], kv_index_s.shape[0]
  first_bt = first_visible_index(q_segment_ids_bt, kv_segment_ids_bs, q_index_t, kv_index_s,
                                 sliding_window)
  lo_i = jnp.min(first_bt.reshape(-1, t // block_q, block_q), axis=(0, 2))
  hi_i = jnp.max(q_index_t.astype(jnp.int32).reshape(t // block_q, block_q), axis=1)
  kv_blocks = kv_index_s.astype(jnp.int32).reshape(s // block_k, block_k)
  k_min_j, k_max_j = jnp.min(kv_blocks, axis=1), jnp.max(kv_blocks, axis=1)
  return (k_min_j[None, :] <= hi_i[:, None]) & (k_max_j[None, :] >= lo_i[:, None])


def _blocks(x, block, axis=1):
  """Splits `axis` of x into `[length / block, block]` and moves the block count to the front."""
  shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x, axis=1):
  """Inverse of `_blocks`: `[count, ..., block, ...]` -> `[..., count * block, ...]`."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def index_mask(q_segment_ids_bt, kv_segment_ids_bs, q_index_t, kv_index_s,
               sliding_window: int | None = None) -> jnp.ndarray:
  """Boolean `[B, 1, T, S]` for queries and keys at the natural rows `q_index_t` / `kv_index_s`
  (any order): True where query t may attend to key s."""
  allowed = kv_index_s[None, :] <= q_index_t[:, None]
  if sliding_window is not None:
    allowed &= q_index_t[:, None] - kv_index_s[None, :] < sliding_window
  same_segment = q_segment_ids_bt[:, :, None] == kv_segment_ids_bs[:, None, :]
  return (same_segment & allowed)[:, None, :, :]


def _tile(q_bckgh, k_bdkh, seg_q_bc, seg_k_bd, index_q_c, index_k_d, sliding_window):
  """Scaled, masked float32 logits `[B, K, G, C, D]` of one query block against one key block,
  and the mask `[B, 1, 1, C, D]`."""
  scale = 1.0 / math.sqrt(q_bckgh.shape[-1])
  logits = jnp.einsum('bckgh,bdkh->bkgcd', q_bckgh, k_bdkh,
                      preferred_element_type=jnp.float32) * scale
  allowed = index_mask(seg_q_bc, seg_k_bd, index_q_c, index_k_d, sliding_window)[:, :, None]
  return jnp.where(allowed, logits, MASKED_LOGIT), allowed


def _prepare(q_btnh, k_bskh, v_bskh, q_seg, kv_seg, q_index, kv_index, sliding_window,
             block_q, block_k):
  """Blocked operands: query-side and key-side scan inputs and the visibility table."""
  b, t, n, h = q_btnh.shape
  kv_heads = k_bskh.shape[2]
  q_btkgh = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
  visible_ij = visible_blocks(q_seg, kv_seg, q_index, kv_index, sliding_window=sliding_window,
                              block_q=block_q, block_k=block_k)
  q_side = (_blocks(q_btkgh, block_q), _blocks(q_seg, block_q),
            q_index.astype(jnp.int32).reshape(-1, block_q))
  k_side = (_blocks(k_bskh, block_k), _blocks(v_bskh, block_k), _blocks(kv_seg, block_k),
            kv_index.astype(jnp.int32).reshape(-1, block_k))
  return q_side, k_side, visible_ij


def empty_state(q_btnh, kv_heads: int, block_q: int):
  """The online softmax's state before any key, per query block: running maximum and sum
  `[T / block_q, B, K, G, block_q]` and accumulator `[..., block_q, H]`, float32."""
  b, t, n, h = q_btnh.shape
  # Derived from q: inside shard_map the state then varies over the same axes as the loop's.
  zero = jnp.zeros_like(q_btnh[:, :1, :1, 0], jnp.float32)[None, :, :, :, None]
  row = jnp.broadcast_to(zero, (t // block_q, b, kv_heads, n // kv_heads, block_q))
  return row + MASKED_LOGIT, row, jnp.broadcast_to(row[..., None], row.shape + (h,))


def attend(state, q_btnh, k_bskh, v_bskh, q_seg, kv_seg, q_index, kv_index, sliding_window,
           block_q, block_k):
  """The forward pass (no custom gradient) over one set of keys, continuing the online
  softmax `state` (`empty_state`, or a previous call's over other keys): returns the new state.
  Calling it on disjoint key chunks one after another equals one call on their union, so a
  ring passes chunks through it (`ring_attention`)."""
  q_side, k_side, visible_ij = _prepare(q_btnh, k_bskh, v_bskh, q_seg, kv_seg, q_index,
                                        kv_index, sliding_window, block_q, block_k)

  def query_block(_, xs):
    q_i, seg_q_i, index_q_i, visible_j, *init = xs

    def update(carry, k_j, v_j, seg_k_j, index_k_j):
      peak, total, acc = carry
      logits, allowed = _tile(q_i, k_j, seg_q_i, seg_k_j, index_q_i, index_k_j, sliding_window)
      new_peak = jnp.maximum(peak, jnp.max(logits, axis=-1))
      fix = jnp.exp(peak - new_peak)
      probs = jnp.where(allowed, jnp.exp(logits - new_peak[..., None]), 0.0)
      total = total * fix + jnp.sum(probs, axis=-1)
      acc = acc * fix[..., None] + jnp.einsum('bkgcd,bdkh->bkgch', probs.astype(v_j.dtype), v_j,
                                              preferred_element_type=jnp.float32)
      return new_peak, total, acc

    def key_block(carry, ys):
      visible, *operands = ys
      return jax.lax.cond(visible, update, lambda c, *_: c, carry, *operands), None

    state_i, _ = jax.lax.scan(key_block, tuple(init), (visible_j, *k_side))
    return None, state_i

  return jax.lax.scan(query_block, None, (*q_side, visible_ij, *state))[1]


def finish(state, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The output `[B, T, N, H]` in `dtype` and the float32 log-sum-exp of each query's visible
  logits, `[T / block_q, B, K, G, block_q]`, from the online softmax's final state."""
  peak, total, acc = state
  total = jnp.where(total > 0, total, 1.0)  # only a query that sees no key (never given)
  out_i = (acc / total[..., None]).transpose(0, 1, 4, 2, 3, 5)  # [T/bq, B, bq, K, G, H]
  blocks, b, block_q, kv_heads, group, h = out_i.shape
  out = _unblocks(out_i).reshape(b, blocks * block_q, kv_heads * group, h).astype(dtype)
  return out, peak + jnp.log(total)


def output_delta(out_btnh, dout_btnh, kv_heads: int, block_q: int) -> jnp.ndarray:
  """The flash backward's `delta = rowsum(dout * out)` per query and head, float32, blocked as
  the log-sum-exp: `[T / block_q, B, K, G, block_q]`."""
  b, t, n, h = out_btnh.shape
  delta_bkgt = jnp.einsum('btkgh,btkgh->bkgt',
                          dout_btnh.astype(jnp.float32).reshape(b, t, kv_heads, -1, h),
                          out_btnh.astype(jnp.float32).reshape(b, t, kv_heads, -1, h))
  return _blocks(delta_bkgt, block_q, axis=3)


def attention_grads(q_btnh, k_bskh, v_bskh, q_seg, kv_seg, q_index, kv_index, lse_i, delta_i,
                    dout_btnh, sliding_window, block_q, block_k, dq_i=None, dk_dv=None):
  """The flash backward against one set of keys, given each query's log-sum-exp and delta over
  all the keys it sees (`finish`, `output_delta`). Returns dq blocked as the queries
  (`[T / block_q, B, block_q, K, G, H]`, float32) with these keys' share added to `dq_i`, and
  dk, dv `[B, S, K, H]` (float32, added to `dk_dv`; else in k's dtype). Passing the
  accumulators through calls on disjoint key chunks gives the gradients over their union."""
  b, t, n, h = q_btnh.shape
  kv_heads = k_bskh.shape[2]
  kv_grad_dtype = k_bskh.dtype if dk_dv is None else jnp.float32
  if dk_dv is None:
    zero = jnp.zeros_like(k_bskh, jnp.float32)
    dk_dv = (zero, zero)
  q_side, k_side, visible_ij = _prepare(q_btnh, k_bskh, v_bskh, q_seg, kv_seg, q_index,
                                        kv_index, sliding_window, block_q, block_k)
  dout_btkgh = dout_btnh.astype(q_btnh.dtype).reshape(b, t, kv_heads, n // kv_heads, h)
  scale = 1.0 / math.sqrt(h)

  def key_block(dq_i, xs):
    k_j, v_j, seg_k_j, index_k_j, visible_i, dk_j, dv_j = xs

    def grads(carry, q_i, seg_q_i, index_q_i, dout_i, lse, delta):
      dq, dk, dv = carry
      logits, allowed = _tile(q_i, k_j, seg_q_i, seg_k_j, index_q_i, index_k_j, sliding_window)
      probs = jnp.where(allowed, jnp.exp(logits - lse[..., None]), 0.0)
      dv += jnp.einsum('bkgcd,bckgh->bdkh', probs.astype(dout_i.dtype), dout_i,
                       preferred_element_type=jnp.float32)
      dprobs = jnp.einsum('bckgh,bdkh->bkgcd', dout_i, v_j, preferred_element_type=jnp.float32)
      dlogits = (probs * (dprobs - delta[..., None]) * scale).astype(q_i.dtype)
      dq += jnp.einsum('bkgcd,bdkh->bckgh', dlogits, k_j, preferred_element_type=jnp.float32)
      dk += jnp.einsum('bkgcd,bckgh->bdkh', dlogits, q_i, preferred_element_type=jnp.float32)
      return dq, dk, dv

    def query_block(carry, ys):
      visible, dq, *operands = ys
      dq, dk, dv = jax.lax.cond(visible, grads, lambda c, *_: c, (dq, *carry), *operands)
      return (dk, dv), dq

    (dk_j, dv_j), dq_i = jax.lax.scan(
        query_block, (dk_j, dv_j), (visible_i, dq_i, *q_side, _blocks(dout_btkgh, block_q),
                                    lse_i, delta_i))
    # Each key block's gradients are complete here: stacking them in the keys' dtype keeps the
    # whole row's dk/dv at the size of k and v, not twice that in float32.
    return dq_i, (dk_j.astype(kv_grad_dtype), dv_j.astype(kv_grad_dtype))

  dq_i = zero_query_grads(q_btnh, kv_heads, block_q) if dq_i is None else dq_i
  dq_i, (dk_j, dv_j) = jax.lax.scan(
      key_block, dq_i, (*k_side, visible_ij.T, *(_blocks(d, block_k) for d in dk_dv)))
  return dq_i, _unblocks(dk_j), _unblocks(dv_j)


def zero_query_grads(q_btnh, kv_heads: int, block_q: int) -> jnp.ndarray:
  """Float32 zeros blocked as `attention_grads`' dq, derived from q (inside shard_map they vary
  over q's axes, as the gradients added to them)."""
  b, t, n, h = q_btnh.shape
  return jnp.zeros_like(_blocks(q_btnh.reshape(b, t, kv_heads, n // kv_heads, h), block_q),
                        jnp.float32)


def unblock_queries(dq_i) -> jnp.ndarray:
  """`attention_grads`' blocked dq `[T / block_q, B, block_q, K, G, H]` -> `[B, T, N, H]`."""
  x = _unblocks(dq_i)
  return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _indexed(q, k, v, q_seg, kv_seg, q_index, kv_index, sliding_window, block_q, block_k):
  return _indexed_fwd(q, k, v, q_seg, kv_seg, q_index, kv_index, sliding_window, block_q,
                      block_k)[0]


def _indexed_fwd(q, k, v, q_seg, kv_seg, q_index, kv_index, sliding_window, block_q, block_k):
  state = attend(empty_state(q, k.shape[2], block_q), q, k, v, q_seg, kv_seg, q_index,
                 kv_index, sliding_window, block_q, block_k)
  out, lse = finish(state, q.dtype)
  return out, (q, k, v, q_seg, kv_seg, q_index, kv_index, out, lse)


def _indexed_bwd(sliding_window, block_q, block_k, residuals, dout):
  q, k, v, q_seg, kv_seg, q_index, kv_index, out, lse = residuals
  delta = output_delta(out, dout, k.shape[2], block_q)
  dq, dk, dv = attention_grads(q, k, v, q_seg, kv_seg, q_index, kv_index, lse, delta, dout,
                               sliding_window, block_q, block_k)
  return unblock_queries(dq).astype(q.dtype), dk, dv, None, None, None, None


_indexed.defvjp(_indexed_fwd, _indexed_bwd)


def indexed_attention(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs,
                      q_index_t, kv_index_s, *, sliding_window: int | None = None,
                      block_q: int | None = None, block_k: int | None = None) -> jnp.ndarray:
  """Segment-aware causal attention with the positions given by index arrays.

  Args:
    q_btnh: queries `[B, T, N, H]`.
    k_bskh, v_bskh: keys and values `[B, S, K, H]`, N a multiple of K (grouped KV heads).
    q_segment_ids_bt, kv_segment_ids_bs: int `[B, T]` and `[B, S]` segment ids (0: padding,
      which attends to padding by the same rule).
    q_index_t, kv_index_s: int `[T]` and `[S]`: each query's and key's position in the row,
      the same for every batch row; may be traced.
    sliding_window: W, or None for full causal attention.
    block_q, block_k: tile sizes dividing T and S (default `default_block`).

  Query t attends to key s iff the segment ids agree, `kv_index[s] <= q_index[t]` and
  `q_index[t] - kv_index[s] < W`. Every query must see at least one key (its own position among
  the keys guarantees it). Returns `[B, T, N, H]` in q's dtype; logits scaled by 1/sqrt(H).
  """
  b, t, n, h = q_btnh.shape
  s, kv_heads = k_bskh.shape[1], k_bskh.shape[2]
  if k_bskh.shape != (b, s, kv_heads, h) or v_bskh.shape != k_bskh.shape or n % kv_heads:
    raise ValueError(f'q {q_btnh.shape}, k {k_bskh.shape}, v {v_bskh.shape}: want q [B, T, N, '
                     'H] and k, v [B, S, K, H] with N a multiple of K.')
  if (q_segment_ids_bt.shape != (b, t) or kv_segment_ids_bs.shape != (b, s)
      or q_index_t.shape != (t,) or kv_index_s.shape != (s,)):
    raise ValueError(f'segment ids {q_segment_ids_bt.shape}, {kv_segment_ids_bs.shape} and '
                     f'indices {q_index_t.shape}, {kv_index_s.shape}: want [{b}, {t}], '
                     f'[{b}, {s}], [{t}], [{s}].')
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f'sliding_window={sliding_window}: must be at least 1.')
  block_q = default_block(t) if block_q is None else block_q
  block_k = default_block(s) if block_k is None else block_k
  if block_q < 1 or t % block_q or block_k < 1 or s % block_k:
    raise ValueError(f'block_q={block_q}, block_k={block_k}: must divide T={t} and S={s}.')
  # Under `checkpoint` with nothing saveable, as blocked attention's switch: in a scanned,
  # rematerialized layer loop the masks and zero fills of every tile depend only on the segment
  # ids and indices, which are loop-invariant, so scan's partial evaluation would compute them
  # ahead of the loop and keep them for every layer: [T, S] per head, 44 GiB at 8,192 x 16,384
  # tokens over 4 layers (1.5 GiB with this). The price, without full remat, is one more
  # forward of the kernel in the backward pass.
  call = jax.checkpoint(functools.partial(_indexed, sliding_window=sliding_window,
                                          block_q=block_q, block_k=block_k),
                        policy=jax.checkpoint_policies.nothing_saveable)
  return call(q_btnh, k_bskh, v_bskh, q_segment_ids_bt.astype(jnp.int32),
              kv_segment_ids_bs.astype(jnp.int32), q_index_t.astype(jnp.int32),
              kv_index_s.astype(jnp.int32))
