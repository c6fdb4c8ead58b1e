"""Mixture-of-experts MLP (Qwen3-MoE, Mixtral): a router sends each token to `k` of `E` expert
MLPs, and the layer's output is their outputs weighted by the router's probabilities.

**Routing.** The router is a linear map `[D, E]` (`mlp/gate/kernel`, transformers' `mlp.gate`)
whose logits go through a float32 softmax; each token keeps its `k` most probable experts, with
those probabilities renormalized to sum to 1 where `norm_topk_prob` (Mixtral always; Qwen3-MoE
per its config). `route` computes exactly what transformers' `TopKRouter` does.

**Dropless grouped matmuls.** The `T * k` (token, expert) assignments are grouped by expert,
each expert's group padded to whole tiles, and every expert projection is one grouped matmul
over them (`jaxsft.models.grouped`). No token is dropped and there is no capacity factor: a
group is as long as the router makes it. The outputs are put back in token order and summed
over each token's `k` experts with the router's weights.

**Parameters** mirror transformers 5's modules, each expert's kernels stacked on a leading
`expert` axis (so `lora.targets` and PEFT's `target_parameters` name the same things):
  - `mlp/gate/kernel [D, E]`: the router.
  - `mlp/experts/gate_up_proj/kernel [E, D, 2F]`: gate and up projections side by side (gate
    first), transformers' `experts.gate_up_proj` transposed.
  - `mlp/experts/down_proj/kernel [E, F, D]`.
HF checkpoints store one tensor per expert and projection (`experts.{e}.gate_proj.weight`, or
Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`); `jaxsft.interop` reads and writes those.

**LoRA on experts** is one adapter per expert, as PEFT's `target_parameters` makes it: the
kernel `[E, in, out]` gets `a [E, in, r]` and `b [E, r, out]` (`jaxsft.adapters.lora` gives
any kernel with leading axes adapters with the same leading axes), applied as two more grouped
matmuls, `scale * grouped(grouped(x, a), b)`. A 4-bit expert kernel is dequantized one layer
at a time, as every `QuantizedKernel`.

**On a mesh** each device routes its own tokens, and the experts are split over the fsdp devices
at rest. `LlamaConfig.moe_exchange` says what crosses those devices in the step:
  - 'weights': the layer's experts are gathered per layer as every FSDP weight is, and each
    device groups and computes its own tokens (`experts_forward` under `shard_map`);
  - 'tokens': the experts stay where they are; the routed tokens are gathered over the fsdp
    devices, each device computes its experts' share of them, and the shares are summed back to
    each token's device (`exchanged_experts_forward`).
`docs/design.md` says which moves fewer bytes when, and what a ragged all-to-all would change.

**The load-balancing loss** (Switch Transformer's, as transformers' `load_balancing_loss_func`
computes it): over the tokens of every sparse layer, `E * sum_e f_e * P_e`, where `f_e` is the
share of top-k assignments that went to expert e (summing to k) and `P_e` its mean router
probability. Each layer sows its sums (`router_stats`: assignments and probabilities per expert,
and the token count, over non-padding tokens) into the `intermediates` collection; they add up
over layers and devices, and `load_balancing_loss` turns the total into the loss.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxsft.adapters.quant import QuantizedKernel, dequantize
from jaxsft.models.config import LlamaConfig
from jaxsft.models.grouped import (
  GroupedLayout,
  gather_rows,
  group_by_expert,
  grouped_matmul,
  scatter_rows,
  tile_rows,
)
from jaxsft.models.layers import Projection, default_kernel_init
from jaxsft.parallel.context import axes_size, axis_names, dividing_axes

ROUTER_STATS = 'router_stats'  # the `intermediates` entry each sparse layer sows


def route(logits_te: jnp.ndarray, top_k: int, normalize: bool
          ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """The router's choice for each token: `(weights [T, k] float32, experts [T, k] int32,
  probabilities [T, E] float32)`, the softmax over all experts, its top k, renormalized to
  sum to 1 when `normalize`. Ties go to the lower expert index, as `torch.topk` on a CPU."""
  probs_te = jax.nn.softmax(logits_te.astype(jnp.float32), axis=-1)
  weights_tk, experts_tk = jax.lax.top_k(probs_te, top_k)
  if normalize:
    weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
  return weights_tk, experts_tk.astype(jnp.int32), probs_te


@flax.struct.dataclass
class ExpertWeights:
  """One expert projection's arrays: the dense kernel `[E, in, out]` in the compute dtype and
  its LoRA factors `a [E, in, r]`, `b [E, r, out]` (None without adapters)."""

  kernel: jnp.ndarray
  lora_a: jnp.ndarray | None = None
  lora_b: jnp.ndarray | None = None


class ExpertProjection(nn.Module):
  """The parameters of every expert's `[in, out]` projection (kernel `[E, in, out]`, 4-bit or
  dense; LoRA factors in the `lora` collection); `__call__(d_in)` returns them as
  `ExpertWeights`, for `project` to apply inside or outside `shard_map`."""

  num_experts: int
  features: int
  axes: tuple[str, str]  # logical names of (in, out); the expert axis is `expert`
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, d_in: int) -> ExpertWeights:
    if self.has_variable('params', 'kernel') and isinstance(
        self.get_variable('params', 'kernel'), QuantizedKernel):
      kernel = dequantize(self.get_variable('params', 'kernel'), self.dtype)
    else:
      kernel = self.param('kernel', nn.with_logical_partitioning(
          default_kernel_init, ('expert',) + tuple(self.axes)),
                          (self.num_experts, d_in, self.features), self.param_dtype)
    if not self.has_variable('lora', 'a'):
      return ExpertWeights(jnp.asarray(kernel, self.dtype))
    return ExpertWeights(jnp.asarray(kernel, self.dtype),
                         jnp.asarray(self.get_variable('lora', 'a')),
                         jnp.asarray(self.get_variable('lora', 'b')))


def project(x_ni: jnp.ndarray, weights: ExpertWeights, layout: GroupedLayout,
            lora_scale: float | None) -> jnp.ndarray:
  """`x @ kernel[e]` (+ `lora_scale * (x @ a[e]) @ b[e]`) for the grouped buffer's rows."""
  y = grouped_matmul(x_ni, weights.kernel, layout)
  if weights.lora_a is None:
    return y
  if lora_scale is None:
    raise ValueError('the variables hold LoRA adapters (a "lora" collection) but the model has '
                     'no LoRA scale; build it with LlamaConfig.with_lora(LoraSettings(...)).')
  low_rank = grouped_matmul(x_ni, weights.lora_a, layout)
  return y + lora_scale * grouped_matmul(low_rank, weights.lora_b, layout)


def route_tokens(logits_te: jnp.ndarray, real_t: jnp.ndarray, top_k: int, normalize: bool
                 ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """`route` and the router statistics of the tokens `real_t` marks: `(weights [T, k],
  experts [T, k], stats [2 * E + 1])`, the stats being top-k assignments and summed
  probabilities per expert, and the token count (`load_balancing_loss`)."""
  e = logits_te.shape[-1]
  weights_tk, experts_tk, probs_te = route(logits_te, top_k, normalize)
  mask = real_t.astype(jnp.float32)
  counts = jnp.sum(jax.nn.one_hot(experts_tk, e, dtype=jnp.float32) * mask[:, None, None],
                   axis=(0, 1))
  stats = jnp.concatenate([counts, jnp.sum(probs_te * mask[:, None], axis=0),
                           jnp.sum(mask)[None]])
  return weights_tk, experts_tk, stats


def expert_mlp(x_td: jnp.ndarray, weights_tk: jnp.ndarray, experts_tk: jnp.ndarray,
               gate_up: ExpertWeights, down: ExpertWeights, lora_scale: float | None,
               tile: int | None = None, max_rows: int | None = None) -> jnp.ndarray:
  """The experts' SwiGLU for tokens `x_td [T, D]` routed to `experts_tk [T, k]` (indices into
  the kernels' leading axis; others are left out, contributing zero) with `weights_tk`:
  grouped by expert, two grouped projections, back to token order, weighted. Returns `[T, D]`
  float32. `tile`, `max_rows`: `group_by_expert`'s."""
  t, d = x_td.shape
  k = experts_tk.shape[-1]
  f = down.kernel.shape[1]
  layout = group_by_expert(experts_tk, gate_up.kernel.shape[0], tile, max_rows)
  rows = scatter_rows(jnp.repeat(x_td, k, axis=0), layout)  # a row per assignment
  gate_up_nf = project(rows, gate_up, layout, lora_scale)
  y_nd = project(nn.silu(gate_up_nf[:, :f]) * gate_up_nf[:, f:], down, layout, lora_scale)
  y_tkd = gather_rows(y_nd, layout).reshape(t, k, d)
  return jnp.einsum('tkd,tk->td', y_tkd.astype(jnp.float32), weights_tk)


def experts_forward(x_td: jnp.ndarray, logits_te: jnp.ndarray, real_t: jnp.ndarray,
                    gate_up: ExpertWeights, down: ExpertWeights, *, top_k: int,
                    normalize: bool, lora_scale: float | None
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The sparse MLP of tokens `x_td [T, D]` given their router logits `[T, E]`, every expert
  at hand: `(y [T, D] in x's dtype, router statistics [2 * E + 1])` (`route_tokens`)."""
  weights_tk, experts_tk, stats = route_tokens(logits_te, real_t, top_k, normalize)
  y_td = expert_mlp(x_td, weights_tk, experts_tk, gate_up, down, lora_scale)
  return y_td.astype(x_td.dtype), stats


def exchanged_experts_forward(x_td: jnp.ndarray, logits_te: jnp.ndarray, real_t: jnp.ndarray,
                              gate_up: ExpertWeights, down: ExpertWeights, *, top_k: int,
                              normalize: bool, lora_scale: float | None,
                              expert_axes: tuple[str, ...], gather_axes: tuple[str, ...]
                              ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`experts_forward` inside `shard_map` with the experts staying where they are and the
  tokens moving (`LlamaConfig.moe_exchange='tokens'`): this device holds experts
  `[i * E_l, (i + 1) * E_l)` of the split over `expert_axes` (`gate_up`, `down` are its
  `E_l`). Each device routes its own tokens; the tokens, their experts and weights are
  gathered over `gather_axes` (the expert axes that also split the tokens: Megatron's
  all-gather dispatcher); each device computes its experts' share of every gathered token,
  one source device's tokens at a time (a scan, rematerialized in the backward, so that the
  buffer is one device's worth: `T x min(k, E_l)` rows, the worst case when every token
  picks this device); and the partial outputs are summed back to the token's own device
  (`psum_scatter`). Over expert axes that do not split the tokens, every device has the same
  tokens and the partial outputs are summed (`psum`)."""
  t = x_td.shape[0]
  e = logits_te.shape[-1]
  local = gate_up.kernel.shape[0]
  weights_tk, experts_tk, stats = route_tokens(logits_te, real_t, top_k, normalize)
  sources = (x_td, weights_tk, experts_tk)
  if gather_axes:
    sources = tuple(jax.lax.all_gather(a, gather_axes) for a in sources)
  else:
    sources = tuple(a[None] for a in sources)
  first = jax.lax.axis_index(expert_axes) * local  # this device's experts, numbered from 0
  sources = sources[:2] + (sources[2] - first,)
  tile, max_rows = tile_rows(t * top_k, e), t * min(top_k, local)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def one_source(_, source):
    x, weights, experts = source
    return None, expert_mlp(x, weights, experts, gate_up, down, lora_scale, tile, max_rows)

  _, partial_std = jax.lax.scan(one_source, None, sources)
  if gather_axes:
    y_td = jax.lax.psum_scatter(partial_std, gather_axes, scatter_dimension=0)
  else:
    y_td = partial_std[0]
  rest = tuple(a for a in expert_axes if a not in gather_axes)
  if rest:
    y_td = jax.lax.psum(y_td, rest)
  return y_td.astype(x_td.dtype), stats


class Experts(nn.Module):
  """The experts' parameters (`gate_up_proj`, `down_proj`), as `ExpertWeights`."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, d: int) -> tuple[ExpertWeights, ExpertWeights]:
    c = self.config
    e, f = c.num_experts, c.moe_intermediate_size
    gate_up = ExpertProjection(e, 2 * f, ('embed', 'mlp'), c.dtype, c.param_dtype,
                               name='gate_up_proj')(d)
    return gate_up, ExpertProjection(e, d, ('mlp', 'embed'), c.dtype, c.param_dtype,
                                     name='down_proj')(f)


class SparseMoE(nn.Module):
  """The MLP of a sparse layer: router, then the chosen experts' SwiGLU MLPs, weighted.
  `__call__(x_btd, segment_ids_bt)` -> `[B, T, D]`; the segment ids only say which tokens are
  padding, for the load-balancing statistics it sows (`ROUTER_STATS`).

  On a mesh whose batch or context axes split the tokens, each device routes its own tokens
  under `shard_map`; with `moe_exchange='weights'` it also groups and computes them, the
  experts' weights gathered for it as any FSDP weight is (`experts_forward`), with 'tokens'
  the experts stay split over the fsdp devices and the tokens travel to them
  (`exchanged_experts_forward`)."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x_btd: jnp.ndarray, segment_ids_bt: jnp.ndarray) -> jnp.ndarray:
    c = self.config
    b, t, d = x_btd.shape
    x_btd = x_btd.astype(c.dtype)
    logits_bte = Projection(c.num_experts, ('embed', 'expert_router'), dtype=c.dtype,
                            param_dtype=c.param_dtype, lora_scale=c.lora_scale,
                            name='gate')(x_btd)
    gate_up, down = Experts(c, name='experts')(d)

    mesh = jax.sharding.get_abstract_mesh()
    rows = length = experts = None
    if not mesh.empty:
      rows, length = dividing_axes('act_batch', b), dividing_axes('act_length', t)
      if c.moe_exchange == 'tokens':
        experts = dividing_axes('expert', c.num_experts)
    token_axes, expert_axes = axis_names(rows) + axis_names(length), axis_names(experts)
    if expert_axes and axes_size(expert_axes) == 1:
      expert_axes = ()
    if expert_axes:
      forward = functools.partial(
          exchanged_experts_forward, expert_axes=expert_axes,
          gather_axes=tuple(a for a in token_axes if a in expert_axes))
    else:
      forward = experts_forward

    def tokens(x_btd, logits_bte, segment_ids_bt, gate_up, down):
      local_b, local_t = x_btd.shape[:2]
      y_td, stats = forward(
          x_btd.reshape(-1, d), logits_bte.reshape(local_b * local_t, -1),
          segment_ids_bt.reshape(-1) > 0, gate_up, down, top_k=c.num_experts_per_tok,
          normalize=c.norm_topk_prob, lora_scale=c.lora_scale)
      y_btd = y_td.reshape(local_b, local_t, d)
      return y_btd, (jax.lax.psum(stats, token_axes) if token_axes else stats)

    if not token_axes and not expert_axes:
      y_btd, stats = tokens(x_btd, logits_bte, segment_ids_bt, gate_up, down)
    else:
      spec = PartitionSpec(rows, length, None)
      experts_spec = PartitionSpec(experts if expert_axes else None)
      y_btd, stats = jax.shard_map(
          tokens, mesh=mesh, in_specs=(spec, spec, PartitionSpec(rows, length),
                                       experts_spec, experts_spec),
          out_specs=(spec, PartitionSpec()))(x_btd, logits_bte, segment_ids_bt, gate_up, down)
    self.sow('intermediates', ROUTER_STATS, stats)
    return y_btd


def load_balancing_loss(stats: jnp.ndarray, num_experts: int) -> jnp.ndarray:
  """The load-balancing loss from summed `router_stats` (`[..., 2 * E + 1]`, any leading axes
  summed first: layers, devices): `E * sum_e (count_e / tokens) * (prob_e / tokens)`, tokens
  being the (layer, token) pairs counted, as transformers' `load_balancing_loss_func`."""
  total = jnp.sum(stats.reshape(-1, 2 * num_experts + 1), axis=0)
  counts, prob_sums, tokens = (total[:num_experts], total[num_experts:2 * num_experts],
                               total[-1])
  tokens = jnp.maximum(tokens, 1.0)
  return num_experts * jnp.sum((counts / tokens) * (prob_sums / tokens))


def router_stats(intermediates: Any) -> jnp.ndarray | None:
  """Every sparse layer's sown `router_stats` from an `intermediates` collection, stacked
  `[n, 2 * E + 1]`, or None when there are none (a dense model)."""
  leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates)
            if any(getattr(key, 'key', None) == ROUTER_STATS for key in path)]
  if not leaves:
    return None
  return jnp.concatenate([jnp.reshape(leaf, (-1, leaf.shape[-1])) for leaf in leaves])
