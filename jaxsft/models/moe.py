"""Mixture-of-experts MLP (Qwen3-MoE, Mixtral): a router sends each token to `k` of `E` expert
MLPs, and the layer's output is their outputs weighted by the router's probabilities.

**Routing.** The router is a linear map `[D, E]` (`mlp/gate/kernel`, transformers' `mlp.gate`)
whose logits go through a float32 softmax; each token keeps its `k` most probable experts, with
those probabilities renormalized to sum to 1 where `norm_topk_prob` (Mixtral always; Qwen3-MoE
per its config). `route` computes exactly what transformers' `TopKRouter` does.

**Dropless grouped matmuls.** The `T * k` (token, expert) assignments are grouped by expert,
each expert's group padded to whole tiles (`group_by_expert`), and every expert projection is
one grouped matmul over them (`grouped_matmul`): `jax.lax.ragged_dot` on a TPU, where it lowers
to the grouped-matmul kernel, a scan of one dense dot per tile elsewhere. No token is dropped
and there is no capacity factor: a group is as long as the router makes it. The outputs are
put back in token order and summed over each token's `k` experts with the router's weights
(`docs/design.md` has what this was measured against: `ragged_dot` on a CPU, a dense one-hot
einsum over every expert).

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

**On a mesh** each device routes, groups and computes its own tokens (`experts_forward` under
`shard_map`); the experts, split over the fsdp devices at rest, are gathered per layer as every
FSDP weight is (`docs/design.md` says why, and what expert parallelism with an all-to-all would
change).

**The load-balancing loss** (Switch Transformer's, as transformers' `load_balancing_loss_func`
computes it): over the tokens of every sparse layer, `E * sum_e f_e * P_e`, where `f_e` is the
share of top-k assignments that went to expert e (summing to k) and `P_e` its mean router
probability. Each layer sows its sums (`router_stats`: assignments and probabilities per expert,
and the token count, over non-padding tokens) into the `intermediates` collection; they add up
over layers and devices, and `load_balancing_loss` turns the total into the loss.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxsft.adapters.quant import QuantizedKernel, dequantize
from jaxsft.models.config import LlamaConfig
from jaxsft.models.layers import Projection, accumulation_dtype, default_kernel_init
from jaxsft.parallel.context import dividing_axes

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


MAX_TILE = 128  # rows of one expert's tile in the grouped layout


@flax.struct.dataclass
class GroupedLayout:
  """Where each (token, slot) assignment sits when the rows are grouped by expert.

  Each expert's group is padded to a whole number of tiles of `tile` rows, so every tile
  belongs to one expert: `rows [T * k]` is each assignment's row in the `[tiles * tile, ...]`
  buffer (`length` or past it for an assignment to an expert this layout leaves out: another
  device's), `tile_experts [tiles]` each tile's expert, `group_sizes [E]` the padded group
  lengths and `used_tiles` how many tiles they fill (padding rows are zeros and are never read
  back; with `skip_empty`, the tiles past `used_tiles` are not computed). The buffer's length
  is static: at most
  `max_rows + min(E, max_rows) * (tile - 1)` rows, rounded up to tiles."""

  rows: jnp.ndarray
  tile_experts: jnp.ndarray
  group_sizes: jnp.ndarray
  used_tiles: jnp.ndarray
  tile: int = flax.struct.field(pytree_node=False)
  skip_empty: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def length(self) -> int:
    return self.tile_experts.shape[0] * self.tile


def tile_rows(assignments: int, num_experts: int) -> int:
  """The tile for `assignments` (token, expert) pairs over `num_experts` experts: a power of two
  near a quarter of the mean group (8 to `MAX_TILE` rows), so that the padding, under a tile
  per expert, stays a small share of the rows, and the tiles few enough that each dot is worth
  its step."""
  quarter_group = max(assignments / (4 * num_experts), 1.0)
  return int(min(MAX_TILE, max(8, 2 ** int(np.floor(np.log2(quarter_group))))))


def group_by_expert(experts_tk: jnp.ndarray, num_experts: int, tile: int | None = None,
                    max_rows: int | None = None) -> GroupedLayout:
  """The grouped layout of the router's choices `experts_tk [T, k]` (stable: tokens keep their
  order within a group), in tiles of `tile` rows (default `tile_rows`). Only experts
  `0 .. num_experts - 1` get rows; an id outside them (another device's expert, made negative
  or too large by the caller) gets none, and `max_rows` (default `T * k`) bounds how many
  assignments can fall inside, which sizes the buffer. Given `max_rows`, the buffer is sized
  for the worst case and mostly empty as a rule, so the grouped matmuls skip its empty tiles
  (a `cond` per tile, which costs a little where every tile is full)."""
  flat = experts_tk.reshape(-1)
  m = flat.shape[0]
  tile = tile_rows(m, num_experts) if tile is None else tile
  worst_case, max_rows = max_rows is not None, m if max_rows is None else max_rows
  tiles = -(-(max_rows + min(num_experts, max_rows) * (tile - 1)) // tile)
  inside = (flat >= 0) & (flat < num_experts)
  group = jnp.where(inside, flat, num_experts)  # one group past the last for the others
  counts = jnp.zeros((num_experts + 1,), jnp.int32).at[group].add(1)
  padded = -(-counts[:num_experts] // tile) * tile
  starts = jnp.cumsum(padded) - padded
  order = jnp.argsort(group, stable=True)
  sorted_group = group[order]
  rank = jnp.arange(m, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[sorted_group]
  # Rows of the left-out assignments lie past the buffer, each its own, so scatters stay unique.
  sorted_rows = jnp.where(sorted_group < num_experts,
                          starts[jnp.minimum(sorted_group, num_experts - 1)] + rank,
                          tiles * tile + jnp.arange(m, dtype=jnp.int32))
  rows = jnp.zeros((m,), jnp.int32).at[order].set(sorted_rows)
  tile_starts = jnp.arange(tiles, dtype=jnp.int32) * tile
  tile_experts = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), tile_starts, side='right'),
                             num_experts - 1).astype(jnp.int32)
  return GroupedLayout(rows, tile_experts, padded, jnp.sum(padded) // tile, tile,
                       skip_empty=worst_case)


def scatter_rows(x_md: jnp.ndarray, layout: GroupedLayout) -> jnp.ndarray:
  """`[T * k, D]` in assignment order -> the grouped buffer `[length, D]` (zeros elsewhere;
  assignments the layout leaves out are dropped)."""
  return jnp.zeros((layout.length, x_md.shape[-1]), x_md.dtype).at[layout.rows].set(
      x_md, unique_indices=True, mode='drop')


def gather_rows(y_nd: jnp.ndarray, layout: GroupedLayout) -> jnp.ndarray:
  """The inverse of `scatter_rows`: `[length, D]` -> `[T * k, D]` in assignment order, zeros
  for the assignments the layout leaves out."""
  return jnp.take(y_nd, layout.rows, axis=0, mode='fill', fill_value=0)


def grouped_matmul(x_ni: jnp.ndarray, kernel_eio: jnp.ndarray,
                   layout: GroupedLayout) -> jnp.ndarray:
  """The grouped buffer's rows times their expert's kernel: `[N, in] x [E, in, out] ->
  [N, out]` in x's dtype. On a TPU `jax.lax.ragged_dot` over the padded groups (its grouped
  matmul kernel); elsewhere a `lax.scan` over the tiles, one `[tile, in] x [in, out]` dot each:
  XLA:CPU computes `ragged_dot` as a dense product masked per group, E times the work
  (`docs/design.md`; a GPU's `ragged_dot` was not measured)."""
  kernel_eio = kernel_eio.astype(x_ni.dtype)
  accumulate = accumulation_dtype(x_ni.dtype)

  def ragged(x, kernel):
    return jax.lax.ragged_dot(x, kernel, layout.group_sizes,
                              preferred_element_type=accumulate).astype(x.dtype)

  def tiled(x, kernel):
    # Rematerialized: the backward slices each tile's kernel from `kernel` again instead of
    # keeping one `[in, out]` copy per tile (Qwen3-30B-A3B QLoRA at 2,048 tokens, 640 tiles:
    # temporaries 7.05 -> 2.05 GiB in its plan).
    # Tiles past the groups hold no row: with `skip_empty`, a `cond` skips their product
    # (with experts split over devices, most of a device's buffer, sized for every token
    # routed to it, is empty).
    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def tile_product(_, inputs):
      x_ci, expert, index = inputs
      kernel_io = kernel[expert]

      def product():
        return jnp.einsum('ci,io->co', x_ci, kernel_io,
                          preferred_element_type=accumulate).astype(x.dtype)

      def skip():  # zeros that vary over the mesh axes the product would (under shard_map)
        return (jnp.zeros_like(x_ci[:, :1]) * jnp.zeros_like(kernel_io[:1])).astype(x.dtype)

      if not layout.skip_empty:
        return None, product()
      return None, jax.lax.cond(index < layout.used_tiles, product, skip)

    tiles = layout.tile_experts.shape[0]
    _, y = jax.lax.scan(tile_product, None,
                        (x.reshape(-1, layout.tile, x.shape[-1]), layout.tile_experts,
                         jnp.arange(tiles, dtype=jnp.int32)))
    return y.reshape(x.shape[0], -1)

  return jax.lax.platform_dependent(x_ni, kernel_eio, tpu=ragged, default=tiled)


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

  On a mesh whose batch or context axes split the tokens, each device routes, groups and
  computes its own tokens (`experts_forward` under `shard_map`): the grouping is per device,
  and the experts' weights, split over the fsdp devices at rest, are gathered for it as any
  FSDP weight is (`docs/design.md`)."""

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
    token_axes, expert_axes = _names(rows) + _names(length), _names(experts)
    if expert_axes and math.prod(mesh.shape[a] for a in expert_axes) == 1:
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


def _names(axes) -> tuple[str, ...]:
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


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
