"""Dropless grouped matmuls: rows that each belong to one of E groups (a mixture-of-experts
layer's (token, expert) assignments) multiplied by their group's matrix, with no row dropped
and no capacity factor.

`group_by_expert` lays the rows out grouped, each group padded to whole tiles so that every tile
belongs to one group (`GroupedLayout`); `scatter_rows` and `gather_rows` move rows into that
buffer and back; `grouped_matmul` multiplies it: `jax.lax.ragged_dot` on a TPU, where it lowers
to the grouped-matmul kernel, a scan of one dense dot per tile elsewhere (`docs/design.md` has
what this was measured against). A layout may hold only some of the groups (a device's share of
experts split over devices): the other rows get no place, and the tiles left empty by the worst
case the buffer is sized for are skipped.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models.layers import accumulation_dtype

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
  is static: at most `max_rows + min(E, max_rows) * (tile - 1)` rows, rounded up to tiles."""

  rows: jnp.ndarray
  tile_experts: jnp.ndarray
  group_sizes: jnp.ndarray
  tile: int = flax.struct.field(pytree_node=False)
  skip_empty: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def length(self) -> int:
    return self.tile_experts.shape[0] * self.tile

  @property
  def used_tiles(self) -> jnp.ndarray:
    """Tiles the groups fill; the rest of the buffer is empty."""
    return jnp.sum(self.group_sizes) // self.tile


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
  return GroupedLayout(rows, tile_experts, padded, tile, skip_empty=worst_case)


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
