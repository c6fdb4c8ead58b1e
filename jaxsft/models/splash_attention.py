"""Pallas splash attention (TPU) for `jaxsft.models.attention`, per device under `shard_map`.

XLA cannot partition a Mosaic kernel, so on a multi-device mesh splash runs inside `shard_map`
on each device's rows and heads (`splash_over_mesh`); under context parallelism on each
device's zig-zag shard of a row against the row's keys (`splash_context_shard`). Elsewhere than
a TPU the kernel runs in interpret mode (slow: for tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxsft.parallel.context import ContextLayout, dividing_axes

SPLASH_BLOCK = 128  # splash tiles rows in blocks of at least this many tokens


def _splash_kernel(q_len: int, kv_len: int, heads_per_group: int, sliding_window: int | None,
                   interpret: bool, offset: int = 0):
  """A splash MQA kernel for `q_len` queries at rows `offset..` against `kv_len` keys at rows
  `0..` (multiples of 128). Built per trace, never cached here: the kernel holds its mask
  arrays, and one created inside a trace (a jitted `init`) leaked that trace's tracers into the
  next (splash caches the mask processing)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (q_len, kv_len)
  if sliding_window is None:
    mask = sm.CausalMask(shape, offset=offset)
  else:
    mask = sm.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=offset)
  # The largest of MaxText's usual block sizes that tiles the rows (TPU lanes want >= 128).
  block = next(size for size in (512, 256, SPLASH_BLOCK) if q_len % size == kv_len % size == 0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  multi_head = sm.MultiHeadMask([mask] * heads_per_group)
  return sk.make_splash_mqa_single_device(multi_head, block_sizes=sizes, interpret=interpret)


def splash_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, *, sliding_window=None,
                     interpret: bool = False, kv_segment_ids_bs=None, q_offset: int = 0
                     ) -> jnp.ndarray:
  """Pallas splash attention (TPU). GQA by one MQA kernel per KV head. Self-attention over a
  row, or (`kv_segment_ids_bs`, `q_offset`) the queries of rows `q_offset..` against keys of
  rows `0..`, as context parallelism needs. Splash does not scale the logits, so q is scaled
  first."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, t, n, h = q_btnh.shape
  s, kv_heads = k_bskh.shape[1], k_bskh.shape[2]
  kv_segment_ids_bs = segment_ids_bt if kv_segment_ids_bs is None else kv_segment_ids_bs
  kernel = _splash_kernel(t, s, n // kv_heads, sliding_window, interpret, q_offset)
  q_bkgth = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  q_bkgth = q_bkgth / jnp.asarray(math.sqrt(h), q_bkgth.dtype)
  k_bksh = k_bskh.transpose(0, 2, 1, 3)
  v_bksh = v_bskh.transpose(0, 2, 1, 3)

  def one_row(q_kgth, k_ksh, v_ksh, seg_q, seg_kv):
    segments = sk.SegmentIds(q=seg_q, kv=seg_kv)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q_kgth, k_ksh, v_ksh)

  out_bkgth = jax.vmap(one_row)(q_bkgth, k_bksh, v_bksh, segment_ids_bt, kv_segment_ids_bs)
  return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def rows_and_heads(q_btnh, k_bskh):
  """The mesh axes of the current mesh and logical rules that a kernel under `shard_map` splits
  rows and heads over: each where it divides evenly, heads only where query and KV heads split
  alike (whole GQA groups per device); None where replicated."""
  heads = dividing_axes('act_heads', q_btnh.shape[2])
  if heads != dividing_axes('act_kv_heads', k_bskh.shape[2]):
    heads = None
  return dividing_axes('act_batch', q_btnh.shape[0]), heads


def splash_over_mesh(q_btnh, k_bskh, v_bskh, segment_ids_bt, *, sliding_window, interpret):
  """`splash_attention` on each device's shard of a multi-device mesh (the context mesh of
  `jax.set_mesh`): XLA cannot partition a Mosaic kernel, so on a TPU slice the kernel runs inside
  `shard_map` over the local rows and heads."""
  call = functools.partial(splash_attention, sliding_window=sliding_window, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return call(q_btnh, k_bskh, v_bskh, segment_ids_bt)
  rows, heads = rows_and_heads(q_btnh, k_bskh)
  spec = PartitionSpec(rows, None, heads, None)  # q, k, v and the output alike
  return jax.shard_map(call, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(rows, None)),
                       out_specs=spec, check_vma=False)(q_btnh, k_bskh, v_bskh, segment_ids_bt)


def splash_context_shard(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids,
                         layout: ContextLayout, *, sliding_window, interpret):
  """Splash on one device's zig-zag shard against the whole row's keys (natural order). A
  splash mask is static, and this device's chunks sit at rows known only from its axis index,
  so each device index gets its branch of a `lax.switch`, two kernels each (one per chunk),
  every one skipping the key blocks its chunk cannot see."""
  chunk = q_btnh.shape[1] // 2

  def branch(device: int):
    def run(q, k, v, q_segments, kv_segments):
      outs = []
      for half, index in enumerate((device, 2 * layout.size - 1 - device)):
        rows = slice(half * chunk, (half + 1) * chunk)
        end = (index + 1) * chunk  # the keys this chunk may see: rows [0, end)
        outs.append(splash_attention(
            q[:, rows], k[:, :end], v[:, :end], q_segments[:, rows],
            kv_segment_ids_bs=kv_segments[:, :end], q_offset=index * chunk,
            sliding_window=sliding_window, interpret=interpret))
      return jnp.concatenate(outs, axis=1)
    return run

  return jax.lax.switch(jax.lax.axis_index(layout.axis),
                        [branch(device) for device in range(layout.size)],
                        q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids)
