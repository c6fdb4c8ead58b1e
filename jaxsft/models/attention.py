"""Causal, segment-aware attention behind one function with an `implementation` switch.

Every implementation computes the same function: query i of a row attends to key j iff
`segment_ids[i] == segment_ids[j]`, `j <= i` (row indices, so the KV cache passes
`q_offset`), and, with a sliding window W, `i - j < W`. Padding (segment 0) attends only to
padding, so no softmax row is ever empty.

- `xla`: plain einsums over the whole `[T, S]` mask, the reference. Runs everywhere.
- `blocked`: `jaxsft.models.blocked_attention`, plain XLA that skips the key blocks no query
  of a block can see (above the diagonal, before the examples of a packed row) and saves O(T)
  activations for the backward. Self-attention over whole rows only (training, prefill).
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')`, fused flash attention on
  NVIDIA GPUs (bf16/fp16 only).
- `splash`: Pallas splash attention for TPU; on other backends it runs in interpret mode (slow,
  for tests).
- `auto`: cudnn on GPU, splash on TPU, blocked elsewhere, each where the shapes allow it.
The choice follows the platform a program is built for (`target_platforms`), not the host's.
A kernel that cannot serve a case falls back (to `blocked`, else `xla`) with a warning naming
the reason; `auto` falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxsft.models import blocked_attention as blocked_lib
from jaxsft.models import indexed_attention as indexed_lib
from jaxsft.models.indexed_attention import index_mask
from jaxsft.models.ring_attention import ring_attention
from jaxsft.models.config import ATTENTION_IMPLEMENTATIONS
from jaxsft.models.layers import dot
from jaxsft.models.splash_attention import (
    SPLASH_BLOCK,
    rows_and_heads,
    splash_context_shard,
    splash_over_mesh,
)
from jaxsft.parallel.context import ContextLayout

_LOG = logging.getLogger(__name__)
# Rows from this length take `blocked` through the indexed kernel (one scan over blocks): the
# switch-per-block kernel's compile grows with its branches (LLaMA-3.1-8B LoRA step at 65,536
# tokens: 65 s against 7 s; memory 46.3 vs 43.8 GiB; CPU step at 8,192 tokens 1.99 vs 1.87 s).
INDEXED_FROM = 16384


def attention_mask(q_segment_ids: jnp.ndarray, kv_segment_ids: jnp.ndarray, *, q_offset=0,
                   sliding_window: int | None = None) -> jnp.ndarray:
  """Boolean `[B, 1, T, S]`: True where query t (row `t + q_offset`) may attend to key s."""
  t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
  return index_mask(q_segment_ids, kv_segment_ids, jnp.arange(t) + q_offset, jnp.arange(s),
                    sliding_window)


def segment_set_mask(q_sets_bt: jnp.ndarray, kv_sets_bs: jnp.ndarray, *, q_offset=0
                     ) -> jnp.ndarray:
  """Boolean `[B, 1, T, S]` for segment ids read as bit sets: query t attends to an earlier
  key s iff their sets share a bit (0, padding, attends to padding). A context whose set is
  the union of its continuations' single bits is seen by each continuation, and the
  continuations, disjoint, not by each other: a tree of depth one in one row."""
  t, s = q_sets_bt.shape[1], kv_sets_bs.shape[1]
  causal = jnp.arange(s)[None, :] <= (jnp.arange(t) + q_offset)[:, None]
  q, kv = q_sets_bt[:, :, None], kv_sets_bs[:, None, :]
  share = ((q & kv) != 0) | ((q == 0) & (kv == 0))
  return (share & causal)[:, None]


def xla_attention(q_btnh, k_bskh, v_bskh, mask_b1ts) -> jnp.ndarray:
  """Reference attention with grouped KV heads; softmax in float32. Returns `[B, T, N, H]`."""
  b, t, n, h = q_btnh.shape
  kv_heads = k_bskh.shape[2]
  q_btkgh = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
  logits_bkgts = jnp.einsum('btkgh,bskh->bkgts', q_btkgh, k_bskh,
                            preferred_element_type=jnp.float32) / math.sqrt(h)
  logits_bkgts = jnp.where(mask_b1ts[:, :, None], logits_bkgts, blocked_lib.MASKED_LOGIT)
  probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bskh.dtype)
  out_btkgh = dot('bkgts,bskh->btkgh', probs_bkgts, v_bskh)
  return out_btkgh.reshape(b, t, n, h)


def dot_product_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, *,
                          implementation: str = 'cudnn') -> jnp.ndarray:
  """`jax.nn.dot_product_attention` with the segment/causal mask passed as a boolean mask.

  `implementation='cudnn'` is the GPU kernel; tests call it with `'xla'` on CPU to check that
  the arguments mean what the reference means.
  """
  return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts,
                                      implementation=implementation)


def context_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, layout: ContextLayout, *,
                      kernel: str, sliding_window: int | None = None, interpret: bool = False
                      ) -> jnp.ndarray:
  """Self-attention over rows split over `layout.axis` in zig-zag order
  (`jaxsft.parallel.context`), the mask coming from each token's natural row. `blocked` passes
  key/value chunks around the axis (`ring_attention`); `splash`, `cudnn` and `xla`, whose masks
  need the whole row's keys, all-gather the row's keys, values and segment ids (GQA makes them
  `N / K` times smaller than the queries; `docs/design.md` has the arithmetic). Returns
  `[B, T, N, H]`, split like q."""
  rows, heads = rows_and_heads(q_btnh, k_bskh)
  spec = PartitionSpec(rows, layout.axis, heads, None)
  segment_spec = PartitionSpec(rows, layout.axis)

  def local(q, k, v, q_segments):
    length = q.shape[1] * layout.size
    # Computed from the axis index rather than a constant: XLA would fold a [T] constant's
    # block minima at compile time, seconds at 1M tokens.
    q_index = layout.shard_positions(length)
    if kernel == 'blocked':
      return ring_attention(q, k, v, q_segments, q_segments, q_index, q_index,
                            axis=layout.axis, size=layout.size, sliding_window=sliding_window)
    gather = functools.partial(jax.lax.all_gather, axis_name=layout.axis, axis=1, tiled=True)
    k_all, v_all, kv_segments = gather(k), gather(v), gather(q_segments)
    kv_index = jax.lax.all_gather(q_index, layout.axis, axis=0, tiled=True)
    if kernel == 'splash':  # splash's masks are static: keys in natural order
      natural = np.argsort(layout.positions(length))
      return splash_context_shard(q, k_all[:, natural], v_all[:, natural], q_segments,
                                   kv_segments[:, natural], layout,
                                   sliding_window=sliding_window, interpret=interpret)
    mask = index_mask(q_segments, kv_segments, q_index, kv_index, sliding_window)
    if kernel == 'cudnn':
      return dot_product_attention(q, k_all, v_all, mask, implementation='cudnn')
    return xla_attention(q, k_all, v_all, mask)

  return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                       in_specs=(spec, spec, spec, segment_spec), out_specs=spec,
                       check_vma=False)(q_btnh, k_bskh, v_bskh, segment_ids_bt)


# The platforms a program can be built for, named as `jax.export` and `lax.platform_dependent`
# name them. `auto` picks per platform; `blocked` wherever no fused kernel applies.
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
_AUTO = {'cuda': 'cudnn', 'tpu': 'splash'}
_HOME = {'cudnn': 'cuda', 'splash': 'tpu'}  # where a kernel is compiled (splash: else interpreted)


def host_platform() -> str:
  """The platform of this process's default backend (`cuda`, `rocm`, `tpu` or `cpu`)."""
  backend = jax.default_backend()
  if backend != 'gpu':
    return backend
  version = getattr(jax.devices()[0].client, 'platform_version', '')
  return 'rocm' if 'rocm' in version.lower() else 'cuda'


_TARGETS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    'jaxsft_attention_target_platforms', default=None)


@contextlib.contextmanager
def target_platforms(platforms: Sequence[str]):
  """Attention traced inside this block is built for `platforms` (names of `PLATFORMS`), not
  for this host: `jax.export(..., platforms=['tpu'])` of a step traced here on a CPU gets
  splash. A trace cannot see which platforms it will be lowered for, so a program meant for
  another platform is traced inside this block (`jaxsft.train.plan.lower_for_platform` does)."""
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown:
    raise ValueError(f'unknown platforms {unknown}; choose from {PLATFORMS}.')
  token = _TARGETS.set(tuple(platforms))
  try:
    yield
  finally:
    _TARGETS.reset(token)


def _candidate_platforms(implementation: str) -> tuple[str, ...]:
  """The platforms this trace may be lowered for: those of `target_platforms`, else the host's
  and the requested kernel's own (a `cudnn` request traced on a CPU host is built for CUDA too).
  Only these get a branch: tracing one costs time (`blocked` traces a `switch` per query block,
  40 s for 4,096 tokens), and `lax.platform_dependent` traces every branch it is given."""
  targets = _TARGETS.get()
  if targets:
    return targets
  home = _HOME.get(implementation)
  return tuple(dict.fromkeys([host_platform()] + ([home] if home else [])))


@functools.lru_cache(maxsize=1)
def cudnn_unavailable() -> str | None:
  """Why this jax cannot build cuDNN attention into a program (None if it can). jax checks for
  its CUDA plugin while tracing, so without one no CUDA program with cuDNN attention can be
  built here, whatever platform it is lowered for."""
  x = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
  try:
    jax.eval_shape(functools.partial(jax.nn.dot_product_attention, implementation='cudnn'),
                   x, x, x)
  except Exception as error:  # pylint: disable=broad-except  # jax raises RuntimeError today
    return f'this jax cannot build cuDNN attention: {error}'.rstrip('.')
  return None


def unsupported_reason(implementation: str, platform: str, q_btnh, k_bskh, q_offset=0,
                       context: ContextLayout | None = None) -> str | None:
  """Why `implementation` cannot serve this call in a program for `platform` (None if it can).
  With `context`, the call is self-attention over rows split over devices in zig-zag order."""
  t, s, h = q_btnh.shape[1], k_bskh.shape[1], q_btnh.shape[3]
  if implementation == 'cudnn':
    if platform != 'cuda':
      return f'cuDNN attention runs on NVIDIA GPUs, this program is for {platform}'
    if q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
      return f'cuDNN attention needs bf16/fp16 activations, got {q_btnh.dtype}'
    if h > 256 or h % 8:
      return f'cuDNN attention needs head_dim <= 256 and a multiple of 8, got {h}'
    return cudnn_unavailable()
  if implementation in ('blocked', 'splash'):
    if t != s or not isinstance(q_offset, int) or q_offset:
      return f'{implementation} attention serves self-attention over a whole row only (no KV cache)'
  if context is not None:  # blocked: the indexed kernel, which takes any split row
    chunk = t // (2 * context.size)
    if implementation == 'splash' and chunk % SPLASH_BLOCK:
      return (f'splash attention over {context.size} context devices needs chunks of a multiple '
              f'of {SPLASH_BLOCK} tokens (the row / {2 * context.size}), got {chunk}')
    return None
  if implementation == 'blocked' and blocked_lib.block_size(t) is None:
    return f'blocked attention needs a length that splits into >= 2 blocks, got {t}'
  if implementation == 'splash' and t % SPLASH_BLOCK:
    return f'splash attention needs a sequence length that is a multiple of {SPLASH_BLOCK}, got {t}'
  return None


def choose(implementation: str, platform: str, q_btnh, k_bskh, q_offset=0,
           context: ContextLayout | None = None) -> tuple[str, str | None]:
  """The kernel that serves this call in a program for `platform`, and why the requested one
  cannot (None when it can). Falls back to `blocked`, else `xla`."""
  requested = _AUTO.get(platform, 'blocked') if implementation == 'auto' else implementation
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'unknown attention implementation {implementation!r}; '
                     f'choose one of {ATTENTION_IMPLEMENTATIONS}.')
  reason = unsupported_reason(requested, platform, q_btnh, k_bskh, q_offset, context)
  if reason is None:
    return requested, None
  blocked_serves = unsupported_reason('blocked', platform, q_btnh, k_bskh, q_offset,
                                      context) is None
  return ('blocked' if requested != 'blocked' and blocked_serves else 'xla'), reason


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  _LOG.warning(message)


def attention(q_btnh, k_bskh, v_bskh, *, q_segment_ids, kv_segment_ids, implementation='xla',
              q_offset=0, sliding_window: int | None = None,
              context: ContextLayout | None = None, segment_sets: bool = False
              ) -> jnp.ndarray:
  """Segment-aware causal attention. q `[B, T, N, H]`, k/v `[B, S, K, H]` -> `[B, T, N, H]`.

  With `context`, q, k and v are one row split over devices in zig-zag order
  (`jaxsft.parallel.context`), and the kernel runs per device under `context_attention`.

  The kernel is chosen per platform the program is built for (`lax.platform_dependent` over
  `_candidate_platforms`), not for the host: a step traced inside `target_platforms(['tpu'])`
  on a CPU host gets splash. An explicit request that cannot serve falls back with a warning;
  `auto` falls back silently.

  `segment_sets` reads the segment ids as bit sets (`segment_set_mask`; `xla` only, no
  sliding window or context split).
  """
  if segment_sets:
    if sliding_window is not None or context is not None:
      raise ValueError('segment sets take neither a sliding window nor a context split.')
    return xla_attention(q_btnh, k_bskh, v_bskh, segment_set_mask(
        q_segment_ids, kv_segment_ids, q_offset=q_offset))
  plans = {platform: choose(implementation, platform, q_btnh, k_bskh, q_offset, context)
           for platform in _candidate_platforms(implementation)}
  if implementation != 'auto':
    for platform, (chosen, reason) in plans.items():
      if reason:
        _warn_once(f'attention implementation {implementation!r} cannot serve this call on '
                   f'{platform} ({reason}); falling back to {chosen}.')

  def kernel(chosen: str, platform: str):
    def run(q, k, v, q_segments, kv_segments):
      if context is not None:
        return context_attention(q, k, v, q_segments, context, kernel=chosen,
                                 sliding_window=sliding_window, interpret=platform != 'tpu')
      if chosen == 'blocked' and q.shape[1] >= INDEXED_FROM:
        positions = jnp.arange(q.shape[1], dtype=jnp.int32)
        return indexed_lib.indexed_attention(q, k, v, q_segments, kv_segments, positions,
                                             positions, sliding_window=sliding_window)
      if chosen == 'blocked':
        return blocked_lib.blocked_attention(q, k, v, q_segments,
                                             blocked_lib.block_size(q.shape[1]), sliding_window)
      if chosen == 'splash':
        return splash_over_mesh(q, k, v, q_segments, sliding_window=sliding_window,
                                 interpret=platform != 'tpu')
      mask = attention_mask(q_segments, kv_segments, q_offset=q_offset,
                            sliding_window=sliding_window)
      if chosen == 'cudnn':
        return dot_product_attention(q, k, v, mask, implementation='cudnn')
      return xla_attention(q, k, v, mask)
    return run

  # Splash runs compiled on a TPU and interpreted elsewhere: two different programs.
  variants = {(chosen, chosen == 'splash' and platform != 'tpu')
              for platform, (chosen, _) in plans.items()}
  operands = (q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids)
  first = next(iter(plans))
  if len(variants) == 1:
    return kernel(plans[first][0], first)(*operands)
  branches = {platform: kernel(chosen, platform) for platform, (chosen, _) in plans.items()}
  return jax.lax.platform_dependent(*operands, **branches, default=branches[first])
