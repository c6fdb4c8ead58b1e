"""Context parallelism: the tokens of each row split over the `context` mesh axis.

A row of T tokens on a mesh with `context = c` is held as c shards of T / c tokens. Everything
that works token by token (embeddings, norms, projections, the MLP, the loss) runs on its shard
unchanged; only attention needs other shards' tokens: `jaxsft.models.attention` passes each
shard's keys and values around the axis (a ring), or gathers them for kernels that need the
whole row.

**Load balance.** Causal attention's work for a query grows with its position: with contiguous
shards the last device would do 2c - 1 times the work of the first. So inside the decoder the
row is held in *zig-zag* order (as in load-balanced ring attention and MaxText): it is cut into
2c chunks, and device i holds chunks i and 2c - 1 - i, so every device does the same work.
`Llama` reorders the embedded row into that order before its first layer and back after its
last (`to_zigzag` / `from_zigzag`: two `ppermute`s of half a shard each, no gather), so its
inputs and outputs, the loss and whatever is logged stay in the natural order.

`ContextLayout` names the mesh axes a row's tokens split over and their size; the model hands
it to attention so that the kernels know the order and the position of each token.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec


@dataclasses.dataclass(frozen=True)
class ContextLayout:
  """Rows split over the mesh axes `axis` (`size` devices in all), in zig-zag order."""

  axis: str | tuple[str, ...]
  size: int

  def positions(self, length: int) -> np.ndarray:
    """`[length]` int32: the natural position of each slot of a zig-zag row (`zigzag_order`)."""
    return zigzag_order(length, self.size)

  def shard_positions(self, length: int) -> jnp.ndarray:
    """Inside `shard_map`: `[length / size]` int32, the natural positions of this device's
    tokens of a row of `length`."""
    chunk = length // (2 * self.size)
    device = jax.lax.axis_index(self.axis)
    offsets = jnp.arange(chunk, dtype=jnp.int32)
    return jnp.concatenate([device * chunk + offsets,
                            (2 * self.size - 1 - device) * chunk + offsets])


def zigzag_order(length: int, context: int) -> np.ndarray:
  """`[length]` int32: the natural position held at each slot when a row of `length` tokens is
  laid out for `context` devices (shard i = chunks i and 2 * context - 1 - i, of
  `length / (2 * context)` tokens each). The identity for `context == 1`."""
  chunks = np.arange(length, dtype=np.int32).reshape(2 * context, -1)
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * context - 1 - i]])
                         for i in range(context)])


def context_layout(length: int) -> ContextLayout | None:
  """The layout of rows of `length` under the current mesh (`jax.set_mesh`) and logical rules:
  the mesh axes `act_length` maps to, when they have more than one device; None otherwise (no
  mesh, one device, no rule for `act_length`, or a `length` that does not split into two
  chunks per device: such rows stay whole per device and XLA partitions their attention, which
  is exact but neither balanced nor light; training checks the length up front)."""
  if jax.sharding.get_abstract_mesh().empty:
    return None
  axes = nn.logical_to_mesh_axes(('act_length',), nn.get_logical_axis_rules())[0]
  size = axes_size(axes)
  if size == 1 or length % (2 * size):
    return None
  return ContextLayout(axes, size)


def axis_names(axes) -> tuple[str, ...]:
  """Mesh axes as a tuple of names, from a name, a tuple of names or None (a spec entry)."""
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def axes_size(axes) -> int:
  """Devices along the mesh axes `axes` (a name, a tuple of names or None) of the current mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[name] for name in axis_names(axes))


def dividing_axes(logical: str, size: int):
  """The mesh axes the current rules map `logical` to, if they split a dimension of `size`
  evenly; None (replicated) otherwise. For `shard_map` specs, which cannot split unevenly."""
  axes = nn.logical_to_mesh_axes((logical,), nn.get_logical_axis_rules())[0]
  return axes if axis_names(axes) and size % axes_size(axes) == 0 else None


def row_spec(x: jnp.ndarray, layout: ContextLayout) -> PartitionSpec:
  """The `shard_map` spec of a `[B, T, ...]` array of split rows: rows over the batch axes of
  the current rules (where they divide), tokens over the context axes, the rest whole."""
  return PartitionSpec(dividing_axes('act_batch', x.shape[0]), layout.axis,
                       *([None] * (x.ndim - 2)))


def shard_sums_spec(x: jnp.ndarray, layout: ContextLayout) -> PartitionSpec:
  """The spec of a `[shards]` array holding one partial sum per shard of `x`'s split rows (the
  rows and context axes of `row_spec`, flattened): sum it outside `shard_map`, where the sum's
  gradient needs no collective of its own."""
  rows, tokens = row_spec(x, layout)[:2]
  return PartitionSpec(axis_names(rows) + axis_names(tokens))


def _reorder(x: jnp.ndarray, layout: ContextLayout, inverse: bool) -> jnp.ndarray:
  """Natural contiguous shards <-> zig-zag shards of `x` (`[B, T, ...]`, tokens on axis 1).

  In natural order device d holds chunks 2d and 2d + 1; in zig-zag order device e holds chunks
  e and 2c - 1 - e, one even and one odd. So the even chunks move in one `ppermute` and the odd
  ones in another, each a permutation of the devices."""
  c = layout.size

  def owner(chunk):  # the device that holds `chunk` in zig-zag order
    return chunk if chunk < c else 2 * c - 1 - chunk

  even = [(d, owner(2 * d)) for d in range(c)]
  odd = [(d, owner(2 * d + 1)) for d in range(c)]

  def local(x_shard):
    first, second = jnp.split(x_shard, 2, axis=1)
    # On device e in zig-zag order, the even chunk is the first half iff e is even.
    even_first = jax.lax.axis_index(layout.axis) % 2 == 0
    if inverse:
      send_even = jnp.where(even_first, first, second)
      send_odd = jnp.where(even_first, second, first)
      return jnp.concatenate([
          jax.lax.ppermute(send_even, layout.axis, [(b, a) for a, b in even]),
          jax.lax.ppermute(send_odd, layout.axis, [(b, a) for a, b in odd])], axis=1)
    got_even = jax.lax.ppermute(first, layout.axis, even)
    got_odd = jax.lax.ppermute(second, layout.axis, odd)
    return jnp.concatenate([jnp.where(even_first, got_even, got_odd),
                            jnp.where(even_first, got_odd, got_even)], axis=1)

  spec = row_spec(x, layout)
  return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=spec,
                       out_specs=spec, check_vma=False)(x)


def to_zigzag(x: jnp.ndarray, layout: ContextLayout) -> jnp.ndarray:
  """`x` (`[B, T, ...]` in natural order, tokens split over `layout.axis`) in zig-zag order."""
  return _reorder(x, layout, inverse=False)


def from_zigzag(x: jnp.ndarray, layout: ContextLayout) -> jnp.ndarray:
  """The inverse of `to_zigzag`."""
  return _reorder(x, layout, inverse=True)
