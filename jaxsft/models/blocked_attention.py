"""Block-sparse attention over packed rows in plain XLA, with a memory-light custom backward.

Packed rows are mostly mask: a query sees only the keys of its own example, at or before it.
This kernel splits a row into query blocks of `block` positions. For query block i it finds,
at run time, the earliest key any of its queries may see (over the whole batch) and computes
attention against the key blocks from there up to block i only, through a `lax.switch` over
the possible numbers of key blocks (each branch has static shapes). Blocks above the diagonal
and blocks wholly before every query's example are never computed.

The backward pass is the flash-attention one: the forward saves q, k, v, the output and the
per-query log-sum-exp, not the `[T, S]` probabilities, and the backward recomputes each
block's probabilities. So the layer's saved activations are O(T), not O(T^2), and the softmax
gradient needs one `[T]` reduction (`rowsum(dout * out)`) instead of one per block.

The function computed is the reference (`attention.xla_attention` with `attention_mask`)
exactly: the mask is still applied inside every computed block, so correctness never depends
on how segments are laid out; only the amount of skipped work does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models.layers import dot

# Masked logits: finite (no inf - inf = NaN), and exp() of it minus any real logit is 0.
MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)
MIN_BLOCK = 64
MAX_QUERY_BLOCKS = 16  # bounds the switch branches per layer: n (n + 1) / 2
# Long rows have long blocks: a block's queries go through their key span in chunks whose
# [chunk, span] float32 logits (and probabilities, their gradients) stay under this per head.
MAX_LOGITS_PER_HEAD = 2 ** 18


def block_size(length: int) -> int | None:
  """Query/key block for a row of `length`: the smallest block of at least `MIN_BLOCK`
  positions (a multiple of 8) that splits the row into 2..`MAX_QUERY_BLOCKS` equal blocks, or
  None when there is none (the caller uses dense attention)."""
  for count in range(min(MAX_QUERY_BLOCKS, length // MIN_BLOCK), 1, -1):
    if length % count == 0 and (length // count) % 8 == 0:
      return length // count
  return None


def first_visible_key(segment_ids_bt: jnp.ndarray, sliding_window: int | None) -> jnp.ndarray:
  """`[B, T]`: the smallest key index query t may attend to (first occurrence of its segment
  id in the row, moved up to the window's start). Ids outside [0, T] get 0 (no skipping)."""
  b, t = segment_ids_bt.shape
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  index_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  in_range = (segment_ids_bt >= 0) & (segment_ids_bt <= t)
  first_bs = jnp.full((b, t + 1), t, jnp.int32).at[rows, jnp.where(in_range, segment_ids_bt, t)
                                                  ].min(index_bt)
  first_bt = jnp.where(in_range, jnp.take_along_axis(first_bs, jnp.clip(segment_ids_bt, 0, t),
                                                     axis=1), 0)
  if sliding_window is not None:
    first_bt = jnp.maximum(first_bt, index_bt - sliding_window + 1)
  return first_bt


def _lookbacks(segment_ids_bt, block: int, sliding_window: int | None) -> jnp.ndarray:
  """`[T / block]` int32: for query block i, how many key blocks before block i it needs."""
  b, t = segment_ids_bt.shape
  first_bt = first_visible_key(segment_ids_bt, sliding_window)
  first_block = jnp.min(first_bt.reshape(b, t // block, block), axis=(0, 2)) // block
  return jnp.arange(t // block, dtype=jnp.int32) - first_block.astype(jnp.int32)


def _block_logits(q_bckgh, k_bskh, seg_q_bc, seg_k_bs, q_start, k_start, sliding_window):
  """Scaled, masked logits `[B, K, G, C, S]` (float32) of one query block vs a key span."""
  scale = 1.0 / math.sqrt(q_bckgh.shape[-1])
  logits = jnp.einsum('btkgh,bskh->bkgts', q_bckgh, k_bskh,
                      preferred_element_type=jnp.float32) * scale
  q_index = q_start + jnp.arange(q_bckgh.shape[1])[:, None]
  k_index = k_start + jnp.arange(k_bskh.shape[1])[None, :]
  allowed = k_index <= q_index
  if sliding_window is not None:
    allowed &= q_index - k_index < sliding_window
  allowed = allowed & (seg_q_bc[:, :, None] == seg_k_bs[:, None, :])
  return jnp.where(allowed[:, None, None], logits, MASKED_LOGIT), allowed


def _split_heads(x_btnh, kv_heads):
  b, t, n, h = x_btnh.shape
  return x_btnh.reshape(b, t, kv_heads, n // kv_heads, h)


def query_chunk(block: int, span: int) -> int:
  """Queries of one block processed together against a key span of `span` positions: the
  largest divisor of `block` (a multiple of 8, or the block) whose `[chunk, span]` logits stay
  under `MAX_LOGITS_PER_HEAD`, so long rows do not hold `[block, row]` float32 tensors."""
  if block * span <= MAX_LOGITS_PER_HEAD:
    return block
  for chunk in range(block - 8, 7, -8):
    if block % chunk == 0 and chunk * span <= MAX_LOGITS_PER_HEAD:
      return chunk
  return 8 if block % 8 == 0 else block


def _over_query_chunks(fn, chunk, carry, q_start, *rows_btx):
  """Applies `fn(carry, q_start, *rows) -> (carry, outs)` to `chunk`-query slices of the
  `[B, block, ...]` arrays `rows_btx` in a scan, and joins each of `outs` (`[B, chunk, ...]`)
  along the query axis."""
  block = rows_btx[0].shape[1]
  if chunk == block:
    return fn(carry, q_start, *rows_btx)
  count = block // chunk
  split = [x.reshape(x.shape[0], count, chunk, *x.shape[2:]).swapaxes(0, 1) for x in rows_btx]
  starts = q_start + chunk * jnp.arange(count)
  carry, outs = jax.lax.scan(lambda c, xs: fn(c, xs[0], *xs[1:]), carry, (starts, *split))
  return carry, tuple(o.swapaxes(0, 1).reshape(o.shape[1], block, *o.shape[3:]) for o in outs)


def _unsplittable_switch(index, branches):
  """`lax.switch(index, branches)` that JAX's partial evaluation keeps whole.

  In a scanned layer loop the mask work of every branch depends only on the segment ids, which
  are loop-invariant, so scan's partial evaluation would hoist it out of the loop as a `cond`
  whose every branch returns the masks of all branches, zero-filled: hundreds of MB of
  broadcast zeros per step at 2,048 tokens, growing with the cube of the block count. Under
  `checkpoint` with nothing saveable the switch is computed where it is used.
  """
  return jax.checkpoint(lambda i: jax.lax.switch(i, branches),
                        policy=jax.checkpoint_policies.nothing_saveable)(index)


def _per_query_block(length, block, lookbacks, branch):
  """For each query block i, `lax.switch`es on its lookback to `branch(q_start, q_end, k_start)`
  with the key span it needs (1 to i + 1 blocks ending at block i; each branch has static
  shapes). Returns the branch outputs of every query block, in order."""
  outputs = []
  for i in range(length // block):
    q_start, q_end = i * block, (i + 1) * block
    branches = [functools.partial(branch, q_start, q_end, q_end - span * block)
                for span in range(1, i + 2)]
    outputs.append(_unsplittable_switch(jnp.clip(lookbacks[i], 0, i), branches))
  return outputs


def _forward(q_btnh, k_bskh, v_bskh, segment_ids_bt, block, sliding_window):
  b, t, n, h = q_btnh.shape
  q_btkgh = _split_heads(q_btnh, k_bskh.shape[2])
  lookbacks = _lookbacks(segment_ids_bt, block, sliding_window)

  def branch(q_start, q_end, k_start):
    k_span, v_span = k_bskh[:, k_start:q_end], v_bskh[:, k_start:q_end]
    seg_k = segment_ids_bt[:, k_start:q_end]

    def attend(carry, rows_start, q_rows, seg_rows):
      logits, _ = _block_logits(q_rows, k_span, seg_rows, seg_k, rows_start, k_start,
                                sliding_window)
      peak = jnp.max(logits, axis=-1, keepdims=True)
      weights = jnp.exp(logits - peak)
      total = jnp.sum(weights, axis=-1, keepdims=True)
      probs = (weights / total).astype(v_span.dtype)
      out = dot('bkgts,bskh->btkgh', probs, v_span)
      return carry, (out, (peak + jnp.log(total))[..., 0].transpose(0, 3, 1, 2))

    return _over_query_chunks(attend, query_chunk(block, q_end - k_start), (), q_start,
                              q_btkgh[:, q_start:q_end], segment_ids_bt[:, q_start:q_end])[1]

  outs, lses = zip(*_per_query_block(t, block, lookbacks, branch))
  out_btnh = jnp.concatenate(outs, axis=1).reshape(b, t, n, h)
  return out_btnh, jnp.concatenate(lses, axis=1), lookbacks


def _backward(q_btnh, k_bskh, v_bskh, segment_ids_bt, out_btnh, lse_btkg, lookbacks,
              dout_btnh, block, sliding_window):
  b, t, n, h = q_btnh.shape
  q_btkgh, out_btkgh, dout_btkgh = (_split_heads(x, k_bskh.shape[2])
                                    for x in (q_btnh, out_btnh, dout_btnh))
  # d softmax: dS = P * (dP - rowsum(dO * O)); the row sums once, for all blocks.
  delta_btkg = jnp.einsum('btkgh,btkgh->btkg', dout_btkgh.astype(jnp.float32),
                          out_btkgh.astype(jnp.float32))
  scale = 1.0 / math.sqrt(h)

  def branch(q_start, q_end, k_start):
    k_span, v_span = k_bskh[:, k_start:q_end], v_bskh[:, k_start:q_end]
    seg_k = segment_ids_bt[:, k_start:q_end]

    def grads(carry, rows_start, q_rows, seg_rows, dout_rows, lse_rows, delta_rows):
      dk_span, dv_span = carry
      logits, allowed = _block_logits(q_rows, k_span, seg_rows, seg_k, rows_start, k_start,
                                      sliding_window)
      probs = jnp.where(allowed[:, None, None], jnp.exp(
          logits - lse_rows.transpose(0, 2, 3, 1)[..., None]), 0.0)
      dv_span += jnp.einsum('bkgts,btkgh->bskh', probs.astype(dout_rows.dtype), dout_rows,
                            preferred_element_type=jnp.float32)
      dprobs = jnp.einsum('btkgh,bskh->bkgts', dout_rows, v_span,
                          preferred_element_type=jnp.float32)
      dlogits = (probs * (dprobs - delta_rows.transpose(0, 2, 3, 1)[..., None]) * scale
                 ).astype(q_rows.dtype)
      dq_rows = jnp.einsum('bkgts,bskh->btkgh', dlogits, k_span,
                           preferred_element_type=jnp.float32)
      dk_span += jnp.einsum('bkgts,btkgh->bskh', dlogits, q_rows,
                            preferred_element_type=jnp.float32)
      return (dk_span, dv_span), (dq_rows,)

    zeros = jnp.zeros(k_span.shape, jnp.float32)
    (dk_span, dv_span), (dq_blk,) = _over_query_chunks(
        grads, query_chunk(block, q_end - k_start), (zeros, zeros), q_start,
        q_btkgh[:, q_start:q_end], segment_ids_bt[:, q_start:q_end],
        dout_btkgh[:, q_start:q_end], lse_btkg[:, q_start:q_end], delta_btkg[:, q_start:q_end])
    # Every branch returns the key prefix [0, q_end) so the switch's outputs agree in shape.
    pad = ((0, 0), (k_start, 0), (0, 0), (0, 0))
    return dq_blk, jnp.pad(dk_span, pad), jnp.pad(dv_span, pad)

  dk_bskh = jnp.zeros(k_bskh.shape, jnp.float32)
  dv_bskh = jnp.zeros(v_bskh.shape, jnp.float32)
  dq_blocks = []
  for dq_blk, dk_prefix, dv_prefix in _per_query_block(t, block, lookbacks, branch):
    dq_blocks.append(dq_blk)
    dk_bskh = dk_bskh.at[:, :dk_prefix.shape[1]].add(dk_prefix)
    dv_bskh = dv_bskh.at[:, :dv_prefix.shape[1]].add(dv_prefix)
  dq_btnh = jnp.concatenate(dq_blocks, axis=1).reshape(b, t, n, h)
  return dq_btnh.astype(q_btnh.dtype), dk_bskh.astype(k_bskh.dtype), dv_bskh.astype(v_bskh.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, block: int,
                      sliding_window: int | None = None) -> jnp.ndarray:
  """Segment-aware causal self-attention. q `[B, T, N, H]`, k/v `[B, T, K, H]`, segment ids
  `[B, T]`; `T` a multiple of `block` (see `block_size`). Returns `[B, T, N, H]`."""
  return _forward(q_btnh, k_bskh, v_bskh, segment_ids_bt, block, sliding_window)[0]


def _blocked_fwd(q_btnh, k_bskh, v_bskh, segment_ids_bt, block, sliding_window):
  out, lse, lookbacks = _forward(q_btnh, k_bskh, v_bskh, segment_ids_bt, block, sliding_window)
  return out, (q_btnh, k_bskh, v_bskh, segment_ids_bt, out, lse, lookbacks)


def _blocked_bwd(block, sliding_window, residuals, dout_btnh):
  q, k, v, segment_ids, out, lse, lookbacks = residuals
  dq, dk, dv = _backward(q, k, v, segment_ids, out, lse, lookbacks, dout_btnh, block,
                         sliding_window)
  return dq, dk, dv, None


blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)
