"""Ring attention: causal attention over a row whose tokens are split over a mesh axis, passing
key/value chunks around the axis instead of gathering the whole row.

This module owns the `blocked` kernel of context parallelism (`attention.context_attention`).
Inside `shard_map`, device i of c holds its queries and its own chunk of keys and values, in the
zig-zag order of `jaxsft.parallel.context`, with each token's natural row position. The ring
runs c steps; at step s device i attends its queries to the chunk that started on device
`i - s (mod c)` with the index-masked flash kernel, while `lax.ppermute` already sends that
chunk on to device `i + 1`, so the transfer of the next chunk overlaps this step's compute.
The online softmax's state (running maximum, sum and accumulator per query) carries from chunk
to chunk (`indexed_attention.attend`), so the result is exact, not a merge of rounded parts.

The backward runs the same ring. Each device holds the final output, log-sum-exp and
`delta = rowsum(dout * out)` of its queries, which make every chunk's share of the flash
backward independent of the others (`indexed_attention.attention_grads`); the chunk's key and
value gradients travel with it in float32 and, after c steps, arrive back at its owner.

Memory, per device with c devices and a row of T tokens: the queries, outputs and dq of T / c
tokens, and two chunks of keys, values (and in the backward their gradients) of T / c tokens,
instead of the whole row's keys and values and their gradients an all-gather holds. For
LLaMA-3-8B (8 KV heads of 128) at T = 1,048,576 over 8 devices, that is about 1.5 GiB of
chunks in flight against 8 GiB gathered (`docs/design.md`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxsft.models import indexed_attention as indexed_lib


def _rotate(tree, axis: str, size: int):
  """Sends each array of `tree` to the next device along `axis` (device i to i + 1 mod size)."""
  pairs = [(i, (i + 1) % size) for i in range(size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, pairs), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _ring(q, k, v, q_seg, kv_seg, q_index, kv_index, axis, size, sliding_window, block_q,
          block_k):
  return _ring_fwd(q, k, v, q_seg, kv_seg, q_index, kv_index, axis, size, sliding_window,
                   block_q, block_k)[0]


def _ring_fwd(q, k, v, q_seg, kv_seg, q_index, kv_index, axis, size, sliding_window, block_q,
              block_k):

  def attend(state, chunk):
    return indexed_lib.attend(state, q, *chunk[:2], q_seg, chunk[2], q_index, chunk[3],
                              sliding_window, block_q, block_k)

  def step(carry, _):
    chunk, state = carry
    incoming = _rotate(chunk, axis, size)  # independent of this step's compute: overlaps it
    return (incoming, attend(state, chunk)), None

  own = (k, v, kv_seg, kv_index)
  state = attend(indexed_lib.empty_state(q, k.shape[2], block_q), own)
  if size > 1:
    (last, state), _ = jax.lax.scan(step, (_rotate(own, axis, size), state), None,
                                    length=size - 2)
    state = attend(state, last)
  out, lse = indexed_lib.finish(state, q.dtype)
  return out, (q, k, v, q_seg, kv_seg, q_index, kv_index, out, lse)


def _ring_bwd(axis, size, sliding_window, block_q, block_k, residuals, dout):
  q, k, v, q_seg, kv_seg, q_index, kv_index, out, lse = residuals
  delta = indexed_lib.output_delta(out, dout, k.shape[2], block_q)

  def grads(chunk, dk, dv, dq):
    """Adds this chunk's share to dq and to the chunk's own dk, dv."""
    return indexed_lib.attention_grads(q, *chunk[:2], q_seg, chunk[2], q_index, chunk[3], lse,
                                       delta, dout, sliding_window, block_q, block_k, dq,
                                       (dk, dv))

  def step(carry, _):
    chunk, dk, dv, dq = carry
    incoming = _rotate(chunk, axis, size)
    dq, dk, dv = grads(chunk, dk, dv, dq)
    # The chunk's gradients follow the chunk: the next device adds its share to them.
    return (incoming, *_rotate((dk, dv), axis, size), dq), None

  own = (k, v, kv_seg, kv_index)
  zero = jnp.zeros_like(k, jnp.float32)
  carry = (own, zero, zero, indexed_lib.zero_query_grads(q, k.shape[2], block_q))
  if size > 1:
    carry, _ = jax.lax.scan(step, carry, None, length=size - 1)
  dq, dk, dv = grads(*carry)
  if size > 1:  # one more hop brings each chunk's gradients home (size hops in all)
    dk, dv = _rotate((dk, dv), axis, size)
  return (indexed_lib.unblock_queries(dq).astype(q.dtype), dk.astype(k.dtype),
          dv.astype(v.dtype), None, None, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs, q_index_t,
                   kv_index_s, *, axis: str, size: int, sliding_window: int | None = None
                   ) -> jnp.ndarray:
  """Segment-aware causal attention of this device's queries to the keys of every device on
  `axis`, called inside `shard_map`.

  Args:
    q_btnh: this device's queries `[B, T, N, H]`.
    k_bskh, v_bskh: this device's keys and values `[B, S, K, H]` (every device the same S).
    q_segment_ids_bt, kv_segment_ids_bs: this device's segment ids `[B, T]`, `[B, S]`.
    q_index_t, kv_index_s: int `[T]`, `[S]`: each local query's and key's position in the row.
    axis, size: the mesh axis the row is split over and its size.
    sliding_window: W, or None for full causal attention.

  The mask is `indexed_attention.indexed_attention`'s over the union of all devices' keys; the
  result equals that kernel given the all-gathered keys. Returns `[B, T, N, H]` in q's dtype.
  """
  block_q = indexed_lib.default_block(q_btnh.shape[1])
  block_k = indexed_lib.default_block(k_bskh.shape[1])
  # Under `checkpoint` with nothing saveable, as `indexed_attention` and for the same reason:
  # the tile masks depend only on loop-invariant indices, which a rematerialized layer scan
  # would otherwise precompute and keep for every layer.
  call = jax.checkpoint(functools.partial(_ring, axis=axis, size=size,
                                          sliding_window=sliding_window, block_q=block_q,
                                          block_k=block_k),
                        policy=jax.checkpoint_policies.nothing_saveable)
  return call(q_btnh, k_bskh, v_bskh, q_segment_ids_bt.astype(jnp.int32),
              kv_segment_ids_bs.astype(jnp.int32), q_index_t.astype(jnp.int32),
              kv_index_s.astype(jnp.int32))
