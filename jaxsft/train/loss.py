"""Cross-entropy over the supervised tokens, fused with the LM head and computed in chunks.

SFT supervises only the responses, so logits of prompt tokens are wasted work, and the
`[B, T, V]` logits are the largest activation of the step (LLaMA-3's 128k vocabulary at 8k
tokens is 4 GiB in float32). `fused_cross_entropy` therefore:

1. moves each row's supervised positions to the front (a stable per-row sort, so the batch
   axis and its sharding stay put);
2. walks the rows in chunks of `chunk` positions with `lax.scan`, and skips (`lax.cond`) every
   chunk past the row with the most supervised tokens, so unsupervised logits are never formed;
3. computes the gradients w.r.t. the hidden states and the head kernel inside the same chunk
   (softmax minus one-hot, the flash-style "fused linear cross-entropy"), so the backward pass
   only scales them: no logits are stored or recomputed. When the head is frozen (LoRA) the
   unused kernel gradient is dead code and XLA drops it.

Accuracy counts a token as correct when its target logit is the row maximum (ties count as
correct; `argmax == target` would pick the first of the tied).

For custom objectives (KL to a frozen reference, preference losses, token weights)
`token_logprobs` gives log p(target | prefix) at every position with the same chunking, and
`batch_logprobs` does so for a packed batch straight from the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxsft.models.layers import dot
from jaxsft.models.llama import Llama, head_kernel
from jaxsft.parallel.context import context_layout, row_spec, shard_sums_spec

# Positions per row whose logits exist at once (`data.max_seq_len` is cut into chunks of the
# largest divisor at most this); the config's `train.loss_chunk_size` default.
DEFAULT_CHUNK_SIZE = 256


def _supervised_first(mask_bt: jnp.ndarray) -> jnp.ndarray:
  """`[B, T]` permutation per row putting supervised positions first, in order."""
  return jnp.argsort(mask_bt <= 0, axis=1, stable=True)


def _gather_rows(x_bt_, order_bt):
  index = order_bt.reshape(order_bt.shape + (1,) * (x_bt_.ndim - 2))
  return jnp.take_along_axis(x_bt_, index, axis=1)


def _chunked(x_bt_, chunk: int):
  """`[B, T, ...]` -> `[T / chunk, B, chunk, ...]` (scan over the leading axis)."""
  b, t = x_bt_.shape[:2]
  return jnp.swapaxes(x_bt_.reshape(b, t // chunk, chunk, *x_bt_.shape[2:]), 0, 1)


def _chunk_terms(hidden_bcd, kernel_dv, targets_bc, mask_bc, with_grads: bool):
  logits_bcv = jnp.einsum('bcd,dv->bcv', hidden_bcd, kernel_dv,
                          preferred_element_type=jnp.float32)
  peak_bc = jnp.max(logits_bcv, axis=-1)
  # The shifted logits are never a value of their own: each use recomputes `logits - peak`
  # inside its fusion. Given one `shifted` array, XLA:CPU fuses the max and the subtraction into
  # the head's product and runs that at 2.5 times the product's time (loss and gradient of
  # 2,048 tokens x 32,000 entries: 2.65 s, 1.71 s this way; scripts/bench_loss.py).
  sum_exp_bc = jnp.sum(jnp.exp(logits_bcv - peak_bc[..., None]), axis=-1)
  target_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0] - peak_bc
  loss_sum = jnp.sum((jnp.log(sum_exp_bc) - target_bc) * mask_bc)
  correct = jnp.sum((target_bc >= 0.0) * mask_bc)
  if not with_grads:
    return loss_sum, correct
  scale_bc = mask_bc / sum_exp_bc
  onehot_bcv = jax.nn.one_hot(targets_bc, logits_bcv.shape[-1], dtype=jnp.float32)
  dlogits_bcv = (jnp.exp(logits_bcv - peak_bc[..., None]) * scale_bc[..., None]
                 - onehot_bcv * mask_bc[..., None]).astype(hidden_bcd.dtype)
  dhidden_bcd = dot('bcv,dv->bcd', dlogits_bcv, kernel_dv)
  dkernel_dv = jnp.einsum('bcd,bcv->dv', hidden_bcd, dlogits_bcv,
                          preferred_element_type=jnp.float32)
  return loss_sum, correct, dhidden_bcd, dkernel_dv


def _run(hidden_btd, kernel_dv, targets_bt, mask_bt, chunk: int, with_grads: bool):
  b, t, d = hidden_btd.shape
  mask_bt = mask_bt.astype(jnp.float32)
  order_bt = _supervised_first(mask_bt)
  hidden_c = _chunked(_gather_rows(hidden_btd, order_bt), chunk)
  targets_c = _chunked(_gather_rows(targets_bt, order_bt), chunk)
  mask_c = _chunked(_gather_rows(mask_bt, order_bt), chunk)
  # Chunks at or past this index hold no supervised token in any row.
  live_chunks = -(-jnp.max(jnp.sum(mask_bt > 0, axis=1)) // chunk)
  zero = jnp.zeros((), jnp.float32)
  empty = ((zero, zero, jnp.zeros((b, chunk, d), hidden_btd.dtype),
            jnp.zeros(kernel_dv.shape, jnp.float32)) if with_grads else (zero, zero))

  def body(carry, inputs):
    index, h, tg, m = inputs
    terms = jax.lax.cond(index < live_chunks,
                         lambda: _chunk_terms(h, kernel_dv, tg, m, with_grads),
                         lambda: empty)
    loss_sum, correct = carry[0] + terms[0], carry[1] + terms[1]
    if not with_grads:
      return (loss_sum, correct), None
    return (loss_sum, correct, carry[2] + terms[3]), terms[2]

  indices = jnp.arange(t // chunk)
  if not with_grads:
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero),
                                          (indices, hidden_c, targets_c, mask_c))
    return loss_sum, correct
  init = (zero, zero, jnp.zeros(kernel_dv.shape, jnp.float32))
  (loss_sum, correct, dkernel_dv), dhidden_c = jax.lax.scan(
      body, init, (indices, hidden_c, targets_c, mask_c))
  dhidden_sorted = jnp.swapaxes(dhidden_c, 0, 1).reshape(b, t, d)
  dhidden_btd = _gather_rows(dhidden_sorted, jnp.argsort(order_bt, axis=1))
  return loss_sum, correct, dhidden_btd, dkernel_dv


def fused_cross_entropy(hidden_btd: jnp.ndarray, kernel_dv: jnp.ndarray, targets_bt: jnp.ndarray,
                        loss_mask_bt: jnp.ndarray, chunk: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`(summed cross-entropy over loss_mask, correctly predicted supervised tokens)` of the
  logits `hidden @ kernel` (float32), without forming the `[B, T, V]` logits.

  hidden `[B, T, D]` (final-normed, compute dtype); kernel `[D, V]` (compute dtype); targets
  `[B, T]` int; loss_mask `[B, T]` (0/1 or weights); `chunk` positions per row per step, a
  divisor of T. Differentiable w.r.t. hidden and kernel; `correct` has no gradient.

  Rows split over a context axis (`jaxsft.parallel.context`) are scored shard by shard: the
  sort and the chunks then stay on each device's tokens (XLA would partition a sort over the
  whole row by gathering it: 16 GiB of float32 hidden states per device at 1M tokens).
  """
  layout = context_layout(hidden_btd.shape[1])
  if layout is None:
    return _fused_cross_entropy(hidden_btd, kernel_dv, targets_bt, loss_mask_bt, chunk)

  def local(h_btd, k_dv, tg_bt, m_bt):
    sums = _fused_cross_entropy(h_btd, k_dv, tg_bt, m_bt, chunk_size(h_btd.shape[1], chunk))
    return tuple(x[None] for x in sums)

  sums_spec = shard_sums_spec(hidden_btd, layout)
  loss_sums, corrects = jax.shard_map(
      local, mesh=jax.sharding.get_abstract_mesh(),
      in_specs=(row_spec(hidden_btd, layout), PartitionSpec(), row_spec(targets_bt, layout),
                row_spec(loss_mask_bt, layout)),
      out_specs=(sums_spec, sums_spec), check_vma=False)(hidden_btd, kernel_dv, targets_bt,
                                                         loss_mask_bt)
  return jnp.sum(loss_sums), jnp.sum(corrects)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_cross_entropy(hidden_btd, kernel_dv, targets_bt, loss_mask_bt, chunk):
  return _run(hidden_btd, kernel_dv, targets_bt, loss_mask_bt, chunk, with_grads=False)


def _fused_fwd(hidden_btd, kernel_dv, targets_bt, loss_mask_bt, chunk):
  loss_sum, correct, dhidden, dkernel = _run(hidden_btd, kernel_dv, targets_bt, loss_mask_bt,
                                             chunk, with_grads=True)
  return (loss_sum, correct), (dhidden, dkernel.astype(kernel_dv.dtype))


def _fused_bwd(chunk, residuals, cotangents):
  dhidden, dkernel = residuals
  scale = cotangents[0]  # d(loss_sum); `correct` is a count and passes no gradient
  return ((dhidden * scale.astype(dhidden.dtype)), (dkernel * scale.astype(dkernel.dtype)),
          None, None)


_fused_cross_entropy.defvjp(_fused_fwd, _fused_bwd)


def chunk_size(length: int, preferred: int) -> int:
  """The largest divisor of `length` that is at most `preferred` (0 or >= length: one chunk)."""
  if preferred <= 0 or preferred >= length:
    return length
  for size in range(preferred, 0, -1):
    if length % size == 0:
      return size
  return length


def _chunk_logits(hidden_bcd, kernel_dv):
  return jnp.einsum('bcd,dv->bcv', hidden_bcd, kernel_dv, preferred_element_type=jnp.float32)


def _logprobs_fwd_chunks(hidden_btd, kernel_dv, targets_bt, chunk):
  """`(log p(target) [B, T], log Z [B, T])`, float32, one chunk of logits at a time."""
  b, t, _ = hidden_btd.shape

  def body(_, inputs):
    h_bcd, tg_bc = inputs
    logits_bcv = _chunk_logits(h_bcd, kernel_dv)
    log_z_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    target_bc = jnp.take_along_axis(logits_bcv, tg_bc[..., None], axis=-1)[..., 0]
    return None, (target_bc - log_z_bc, log_z_bc)

  _, (logprobs_c, log_z_c) = jax.lax.scan(
      body, None, (_chunked(hidden_btd, chunk), _chunked(targets_bt, chunk)))
  unchunk = lambda x_c: jnp.swapaxes(x_c, 0, 1).reshape(b, t)  # noqa: E731
  return unchunk(logprobs_c), unchunk(log_z_c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_logprobs(hidden_btd, kernel_dv, targets_bt, chunk):
  return _logprobs_fwd_chunks(hidden_btd, kernel_dv, targets_bt, chunk)[0]


def _token_logprobs_fwd(hidden_btd, kernel_dv, targets_bt, chunk):
  logprobs_bt, log_z_bt = _logprobs_fwd_chunks(hidden_btd, kernel_dv, targets_bt, chunk)
  # The cotangent is unknown until the backward pass, so its logits are recomputed there, chunk
  # by chunk; only log Z ([B, T], no vocab axis) is kept to normalize them.
  return logprobs_bt, (hidden_btd, kernel_dv, targets_bt, log_z_bt)


def _token_logprobs_bwd(chunk, residuals, dlogprobs_bt):
  hidden_btd, kernel_dv, targets_bt, log_z_bt = residuals
  b, t, d = hidden_btd.shape

  def body(dkernel_dv, inputs):
    h_bcd, tg_bc, log_z_bc, g_bc = inputs
    logits_bcv = _chunk_logits(h_bcd, kernel_dv)
    probs_bcv = jnp.exp(logits_bcv - log_z_bc[..., None])
    onehot_bcv = jax.nn.one_hot(tg_bc, logits_bcv.shape[-1], dtype=jnp.float32)
    # d log p(target) / d logits = onehot - softmax. Cast to the hidden dtype as in
    # `fused_cross_entropy`: bf16 x bf16 -> f32 dots, not XLA:CPU's slow f32 path.
    dlogits_bcv = ((onehot_bcv - probs_bcv) * g_bc[..., None]).astype(hidden_btd.dtype)
    dhidden_bcd = dot('bcv,dv->bcd', dlogits_bcv, kernel_dv.astype(hidden_btd.dtype))
    dkernel_dv = dkernel_dv + jnp.einsum('bcd,bcv->dv', h_bcd, dlogits_bcv,
                                         preferred_element_type=jnp.float32)
    return dkernel_dv, dhidden_bcd

  inputs = tuple(_chunked(x, chunk) for x in (hidden_btd, targets_bt, log_z_bt,
                                                dlogprobs_bt.astype(jnp.float32)))
  dkernel_dv, dhidden_c = jax.lax.scan(body, jnp.zeros(kernel_dv.shape, jnp.float32), inputs)
  dhidden_btd = jnp.swapaxes(dhidden_c, 0, 1).reshape(b, t, d)
  return dhidden_btd, dkernel_dv.astype(kernel_dv.dtype), None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def token_logprobs(hidden_btd: jnp.ndarray, kernel_dv: jnp.ndarray, targets_bt: jnp.ndarray,
                   chunk: int = DEFAULT_CHUNK_SIZE) -> jnp.ndarray:
  """log p(target_t | prefix) in nats, float32 `[B, T]`, of the logits `hidden @ kernel`
  (float32, accumulated from the given dtypes), without forming the `[B, T, V]` logits.

  hidden `[B, T, D]` (final-normed: `Llama.apply(..., return_hidden=True)`); kernel `[D, V]`
  (`jaxsft.models.llama.head_kernel`); targets `[B, T]` int in [0, V); `chunk`: positions per
  row whose logits exist at once, at most (the largest divisor of T at most this; 0: all).
  Every position gets a value, padding included: mask it. Differentiable w.r.t. hidden and
  kernel (reverse mode; `jax.jvp` is not supported): the backward pass recomputes each chunk's
  logits, so neither pass holds more than `[B, chunk, V]` of them.
  """
  layout = context_layout(hidden_btd.shape[1])
  if layout is None:
    return _token_logprobs(hidden_btd, kernel_dv, targets_bt,
                           chunk_size(hidden_btd.shape[1], chunk))
  # Rows split over a context axis: each device scores its own tokens (see fused_cross_entropy).
  local = lambda h_btd, k_dv, tg_bt: _token_logprobs(  # noqa: E731
      h_btd, k_dv, tg_bt, chunk_size(h_btd.shape[1], chunk))
  return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                       in_specs=(row_spec(hidden_btd, layout), PartitionSpec(),
                                 row_spec(targets_bt, layout)),
                       out_specs=row_spec(targets_bt, layout), check_vma=False)(
                           hidden_btd, kernel_dv, targets_bt)


def batch_logprobs(model: Llama, variables: dict, batch: dict[str, jnp.ndarray],
                   chunk: int = DEFAULT_CHUNK_SIZE, rngs: dict | None = None) -> jnp.ndarray:
  """log p(target | its segment's prefix) in nats, float32 `[B, T]`, of a packed batch (the
  `inputs`, `targets`, `positions`, `segment_ids`, `loss_mask` rows of `data.packing`); 0
  where `loss_mask` is 0 (other values, weights included, keep the log-probability unscaled:
  weighting is the caller's). Summed over a segment: that sequence's supervised log-likelihood.

  `model`: a `Llama` (its `deterministic` and `rngs` as for training); `variables`: what
  `model.apply` takes. The head is applied by `token_logprobs` in chunks of `chunk` positions,
  unless LoRA adapts the head itself: then the model's own `[B, T, V]` logits are used.
  """
  args = (batch['inputs'], batch['positions'], batch['segment_ids'])
  kernel_dv = head_kernel(model.config, variables)
  if kernel_dv is None:
    logits_btv = model.apply(variables, *args, rngs=rngs).astype(jnp.float32)
    logprobs_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    logprobs_bt = jnp.take_along_axis(logprobs_btv, batch['targets'][..., None], axis=-1)[..., 0]
  else:
    hidden_btd = model.apply(variables, *args, rngs=rngs, return_hidden=True)
    logprobs_bt = token_logprobs(hidden_btd, kernel_dv, batch['targets'], chunk)
  return jnp.where(batch['loss_mask'] != 0, logprobs_bt, 0.0)
