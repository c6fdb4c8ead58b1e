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
A kernel that cannot serve a case falls back (to `blocked`, else `xla`) with a warning naming
the reason; `auto` falls back silently.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from jaxsft.models import blocked_attention as blocked_lib
from jaxsft.models.config import ATTENTION_IMPLEMENTATIONS
from jaxsft.models.layers import dot

_LOG = logging.getLogger(__name__)
_SPLASH_BLOCK = 128


def attention_mask(q_segment_ids: jnp.ndarray, kv_segment_ids: jnp.ndarray, *, q_offset=0,
                   sliding_window: int | None = None) -> jnp.ndarray:
  """Boolean `[B, 1, T, S]`: True where query t may attend to key s."""
  t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
  q_index = (jnp.arange(t) + q_offset)[:, None]
  k_index = jnp.arange(s)[None, :]
  allowed = k_index <= q_index
  if sliding_window is not None:
    allowed &= q_index - k_index < sliding_window
  same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return (same_segment & allowed)[:, None, :, :]


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


def _splash_kernel(seq_len: int, heads_per_group: int, sliding_window: int | None,
                   interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (seq_len, seq_len)
  if sliding_window is None:
    mask = sm.CausalMask(shape)
  else:
    mask = sm.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
  block = min(_SPLASH_BLOCK, seq_len)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  multi_head = sm.MultiHeadMask([mask] * heads_per_group)
  return sk.make_splash_mqa_single_device(multi_head, block_sizes=sizes, interpret=interpret)


def splash_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, *, sliding_window=None,
                     interpret: bool = False) -> jnp.ndarray:
  """Pallas splash attention (TPU). Self-attention only (T == S); GQA by one MQA kernel per KV
  head. Splash does not scale the logits, so q is scaled first."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, t, n, h = q_btnh.shape
  kv_heads = k_bskh.shape[2]
  kernel = _splash_kernel(t, n // kv_heads, sliding_window, interpret)
  q_bkgth = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  q_bkgth = q_bkgth / jnp.asarray(math.sqrt(h), q_bkgth.dtype)
  k_bksh = k_bskh.transpose(0, 2, 1, 3)
  v_bksh = v_bskh.transpose(0, 2, 1, 3)

  def one_row(q_kgth, k_ksh, v_ksh, seg_t):
    segments = sk.SegmentIds(q=seg_t, kv=seg_t)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q_kgth, k_ksh, v_ksh)

  out_bkgth = jax.vmap(one_row)(q_bkgth, k_bksh, v_bksh, segment_ids_bt)
  return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _unsupported_reason(implementation: str, q_btnh, k_bskh, q_offset) -> str | None:
  backend = jax.default_backend()
  t, s, h = q_btnh.shape[1], k_bskh.shape[1], q_btnh.shape[3]
  if implementation == 'cudnn':
    if backend != 'gpu':
      return f'cuDNN attention needs a GPU, the backend is {backend!r}'
    if q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
      return f'cuDNN attention needs bf16/fp16 activations, got {q_btnh.dtype}'
    if h > 256 or h % 8:
      return f'cuDNN attention needs head_dim <= 256 and a multiple of 8, got {h}'
  if implementation in ('blocked', 'splash'):
    if t != s or not isinstance(q_offset, int) or q_offset:
      return f'{implementation} attention serves self-attention over a whole row only (no KV cache)'
  if implementation == 'blocked' and blocked_lib.block_size(t) is None:
    return f'blocked attention needs a length that splits into >= 2 blocks, got {t}'
  if implementation == 'splash':
    if t > _SPLASH_BLOCK and t % _SPLASH_BLOCK:
      return f'splash attention needs the sequence length to be a multiple of {_SPLASH_BLOCK}'
  return None


def _resolve(implementation: str) -> str:
  if implementation != 'auto':
    return implementation
  return {'gpu': 'cudnn', 'tpu': 'splash'}.get(jax.default_backend(), 'blocked')


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  _LOG.warning(message)


def attention(q_btnh, k_bskh, v_bskh, *, q_segment_ids, kv_segment_ids, implementation='xla',
              q_offset=0, sliding_window: int | None = None) -> jnp.ndarray:
  """Segment-aware causal attention. q `[B, T, N, H]`, k/v `[B, S, K, H]` -> `[B, T, N, H]`."""
  chosen = _resolve(implementation)
  reason = _unsupported_reason(chosen, q_btnh, k_bskh, q_offset)
  if reason is not None:
    fallback = 'xla' if chosen == 'blocked' or _unsupported_reason(
        'blocked', q_btnh, k_bskh, q_offset) else 'blocked'
    if implementation != 'auto':
      _warn_once(f'attention implementation {chosen!r} cannot serve this call ({reason}); '
                 f'falling back to {fallback}.')
    chosen = fallback
  if chosen == 'blocked':
    return blocked_lib.blocked_attention(q_btnh, k_bskh, v_bskh, q_segment_ids,
                                         blocked_lib.block_size(q_btnh.shape[1]), sliding_window)
  if chosen == 'splash':
    return splash_attention(q_btnh, k_bskh, v_bskh, q_segment_ids, sliding_window=sliding_window,
                            interpret=jax.default_backend() != 'tpu')
  mask = attention_mask(q_segment_ids, kv_segment_ids, q_offset=q_offset,
                        sliding_window=sliding_window)
  if chosen == 'cudnn':
    return dot_product_attention(q_btnh, k_bskh, v_bskh, mask, implementation='cudnn')
  if chosen == 'xla':
    return xla_attention(q_btnh, k_bskh, v_bskh, mask)
  raise ValueError(f'unknown attention implementation {implementation!r}; '
                   f'choose one of {ATTENTION_IMPLEMENTATIONS}.')
