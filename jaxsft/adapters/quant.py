"""4-bit frozen weights for QLoRA: NF4 (bitsandbytes-exact) and symmetric int4.

A kernel `[..., in, out]` (HF's `[out, in]` transposed, `...` = the scanned `layers` axis)
becomes a `QuantizedKernel` pytree node whose leaves keep the kernel's rank:

  codes        uint8 [..., in / 2, out]   two 4-bit codes per byte along `in`, the first
                                          element in the high nibble (bitsandbytes' order)
  absmax       [..., in / B, out]         one scale per block of B (64) inputs of an output:
                                          float32, or uint8 codes with double quantization
  absmax_scale float32 [..., G]           double quantization: one scale per 256 absmax codes
  absmax_offset float32 [..., 1, 1]       double quantization: the mean subtracted first

The blocks are bitsandbytes' blocks: its flat order of `W [out, in]` runs along `in`, so a
block of 64 is 64 inputs of one output. Double quantization groups the absmax values 256 at a
time in that same flat order (output-major), with bitsandbytes' dynamic 8-bit map, so
`dequantize` reproduces `bitsandbytes.functional.dequantize_4bit` bit for bit.

Because every leaf has the kernel's rank, `nn.scan` slices it per layer and the kernel's
logical axes shard it (`node_shardings`); `Projection` dequantizes to the compute dtype
right before its matmul, inside the scanned layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxsft.adapters.targets import DEFAULT_TARGETS, target_matcher
from jaxsft.errors import UserError, check_choice, check_number
from jaxsft.parallel.mesh import logical_to_mesh_spec

KINDS = ('nf4', 'int4')
# The NF4 levels (QLoRA, Dettmers et al. 2023), as bitsandbytes stores them in float32.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
INT4_LEVELS = np.arange(-8, 8, dtype=np.float32) / 7.0  # codes 0..15 <-> -8..7, |q| <= 7 used
DOUBLE_QUANT_BLOCK = 256
DOUBLE_QUANT_ROUNDING = ('min_error', 'nearest')


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps, dtype=float32)` bit for bit: the step in float32, the
  first half `start + step * i` and the second `end - step * (steps - 1 - i)`, each rounded
  once (the product of two float32 values is exact in float64)."""
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
  i = np.arange(steps, dtype=np.float64)
  first = np.float64(start32) + step * i
  second = np.float64(end32) - step * (steps - 1 - i)
  return np.where(np.arange(steps) < steps // 2, first, second).astype(np.float32)


def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed dynamic 8-bit map (Dettmers 2015), float32, sorted: for exponents
  10^-6 .. 10^0, the midpoints of 2^i + 1 evenly spaced fractions in [0.1, 1] with both signs,
  plus 0 and 1. Computed in float32 as bitsandbytes computes it, so the maps are equal."""
  values = []
  for i in range(7):
    fractions = _torch_linspace_float32(0.1, 1.0, 2 ** i + 1)
    means = (fractions[:-1] + fractions[1:]) / np.float32(2.0)
    magnitude = np.float32(10.0 ** (i - 6))
    values += (magnitude * means).tolist() + (-magnitude * means).tolist()
  values += [0.0, 1.0]
  return np.sort(np.asarray(values, np.float32))


def _bounds(levels: np.ndarray) -> np.ndarray:
  """Midpoints between sorted levels, computed in float32 as bitsandbytes does."""
  return (levels[:-1] + levels[1:]) / np.float32(2.0)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class QuantizedKernel:
  """A 4-bit kernel `[..., in, out]` as a pytree node: `codes` uint8 `[..., in / 2, out]`,
  `absmax` `[..., in / block_size, out]` (float32, or uint8 codes with double quantization, then
  with `absmax_scale [..., G]` and `absmax_offset [..., 1, 1]`); `kind` and `block_size` are
  static. `dequantize(node, dtype)` gives the dense kernel back (see the module docstring)."""

  codes: Any
  absmax: Any
  absmax_scale: Any = None
  absmax_offset: Any = None
  kind: str = 'nf4'
  block_size: int = 64

  def tree_flatten(self):
    return ((self.codes, self.absmax, self.absmax_scale, self.absmax_offset),
            (self.kind, self.block_size))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def shape(self) -> tuple[int, ...]:
    """The dense kernel's shape."""
    *lead, half_in, out = self.codes.shape
    return (*lead, 2 * half_in, out)

  @property
  def double_quant(self) -> bool:
    return self.absmax_scale is not None

  def nbytes(self) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(self))


def _levels(kind: str) -> np.ndarray:
  if kind not in KINDS:
    raise UserError(f'quant.kind={kind!r}; choose one of {KINDS}.')
  return NF4_LEVELS if kind == 'nf4' else INT4_LEVELS


def _blockwise_absmax(x_bio: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(x_bio), axis=-2)


def quantize_kernel(kernel: jax.Array, kind: str = 'nf4', block_size: int = 64,
                    double_quant: bool = True, double_quant_rounding: str = 'min_error'
                    ) -> QuantizedKernel:
  """Quantizes a dense kernel `[..., in, out]` (in divisible by `block_size`).

  `double_quant_rounding`: `nearest` rounds each block scale to the nearest 8-bit code
  (bitsandbytes' rule); `min_error` takes whichever of the two neighbouring codes reconstructs
  the block's weights better, so its error is never above `nearest`'s or bitsandbytes'.
  """
  if double_quant_rounding not in DOUBLE_QUANT_ROUNDING:
    raise UserError(f'double_quant_rounding={double_quant_rounding!r}; choose one of '
                    f'{DOUBLE_QUANT_ROUNDING}.')
  levels = _levels(kind)
  *lead, d_in, d_out = kernel.shape
  if d_in % block_size or block_size % 2:
    raise UserError(f'cannot quantize a kernel of shape {kernel.shape}: its input dimension '
                    f'{d_in} is not a multiple of quant.block_size={block_size}.')
  x = kernel.astype(jnp.float32).reshape(*lead, d_in // block_size, block_size, d_out)
  absmax = _blockwise_absmax(x)  # [..., in/B, out]
  # bitsandbytes multiplies by the reciprocal (not a division); the last bit matters for ties.
  inverse = 1.0 / jnp.maximum(absmax, 1e-38)
  scaled = jnp.clip(x * inverse[..., None, :], -1.0, 1.0).reshape(*lead, d_in, d_out)
  if kind == 'nf4':
    codes = jnp.searchsorted(jnp.asarray(_bounds(levels)), scaled, side='left')
  else:
    codes = jnp.clip(jnp.round(scaled * 7.0), -7, 7).astype(jnp.int32) + 8
  node = QuantizedKernel(_pack(codes), absmax, kind=kind, block_size=block_size)
  if double_quant:
    # Each block's error as a function of its (8-bit) scale, to pick the better of the two
    # neighbouring scale codes: sum_j |level_j * a - w_j| over the block's 64 weights.
    levels_bio = jnp.asarray(levels)[codes].reshape(x.shape)
    block_error = lambda a: jnp.sum(jnp.abs(levels_bio * a[..., None, :] - x), axis=-2)  # noqa: E731
    node.absmax, node.absmax_scale, node.absmax_offset = _double_quantize(
        absmax, block_error if double_quant_rounding == 'min_error' else None)
  return node


def _pack(codes: jax.Array) -> jax.Array:
  """uint8 `[..., in, out]` codes (0..15) -> `[..., in / 2, out]`, first one in the high nibble."""
  *lead, d_in, d_out = codes.shape
  pairs = codes.astype(jnp.uint8).reshape(*lead, d_in // 2, 2, d_out)
  return (pairs[..., 0, :] << 4) | pairs[..., 1, :]


def _flat_absmax(absmax: jax.Array) -> jax.Array:
  """`[..., in/B, out]` -> `[..., out * in/B]` in bitsandbytes' (output-major) order."""
  *lead, blocks, d_out = absmax.shape
  return jnp.swapaxes(absmax, -1, -2).reshape(*lead, blocks * d_out)


def _unflat_absmax(flat: jax.Array, blocks: int, d_out: int) -> jax.Array:
  *lead, _ = flat.shape
  return jnp.swapaxes(flat.reshape(*lead, d_out, blocks), -1, -2)


def _double_quantize(absmax: jax.Array, block_error=None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """absmax - mean, blockwise 8-bit with the dynamic map (256 per group, bitsandbytes' order).

  Each value gets one of its two neighbouring codes: the one that reconstructs its block's
  weights with less error (`block_error(dequantized absmax)`), or the nearer one without
  `block_error`. bitsandbytes always stores one of those two neighbours, so the reconstruction
  error is never worse than its.
  """
  *lead, blocks, d_out = absmax.shape
  offset = jnp.mean(absmax, axis=(-2, -1), keepdims=True)
  flat = _flat_absmax(absmax - offset)
  n = flat.shape[-1]
  groups = -(-n // DOUBLE_QUANT_BLOCK)
  padded = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, groups * DOUBLE_QUANT_BLOCK - n)])
  grouped = padded.reshape(*lead, groups, DOUBLE_QUANT_BLOCK)
  scale = jnp.max(jnp.abs(grouped), axis=-1)
  inverse = 1.0 / jnp.maximum(scale, 1e-38)
  scaled = jnp.clip(grouped * inverse[..., None], -1.0, 1.0)
  code_map = jnp.asarray(dynamic_map())
  nearest = jnp.searchsorted(jnp.asarray(_bounds(dynamic_map())), scaled, side='left')

  def unflat(codes):
    codes = codes.reshape(*lead, groups * DOUBLE_QUANT_BLOCK)[..., :n]
    return _unflat_absmax(codes, blocks, d_out)

  def dequantized(codes):
    values = code_map[codes] * scale[..., None]
    return unflat(values) + offset

  codes = nearest
  if block_error is not None:
    below = jnp.clip(jnp.searchsorted(code_map, scaled, side='right') - 1, 0, 255)
    above = jnp.clip(below + 1, 0, 255)
    error_below = _flat_absmax(block_error(dequantized(below)))
    error_above = _flat_absmax(block_error(dequantized(above)))
    pad = [(0, 0)] * len(lead) + [(0, groups * DOUBLE_QUANT_BLOCK - n)]
    choose_above = jnp.pad(error_above < error_below, pad).reshape(grouped.shape)
    codes = jnp.where(choose_above, above, below)
  return unflat(codes.astype(jnp.uint8)), scale, offset


def dequantize_absmax(node: QuantizedKernel) -> jax.Array:
  """The float32 block scales `[..., in/B, out]`."""
  if not node.double_quant:
    return node.absmax.astype(jnp.float32)
  *lead, blocks, d_out = node.absmax.shape
  flat = _flat_absmax(node.absmax)
  n = flat.shape[-1]
  groups = node.absmax_scale.shape[-1]
  values = jnp.asarray(dynamic_map())[flat.astype(jnp.int32)]
  values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, groups * DOUBLE_QUANT_BLOCK - n)])
  values = values.reshape(*lead, groups, DOUBLE_QUANT_BLOCK) * node.absmax_scale[..., None]
  values = values.reshape(*lead, groups * DOUBLE_QUANT_BLOCK)[..., :n]
  return _unflat_absmax(values, blocks, d_out) + node.absmax_offset


def dequantize(node: QuantizedKernel, dtype: Any = jnp.float32) -> jax.Array:
  """The dense kernel `[..., in, out]`: level[code] * absmax in float32, then cast."""
  *lead, half_in, d_out = node.codes.shape
  codes = jnp.stack([node.codes >> 4, node.codes & 0xF], axis=-2).reshape(
      *lead, 2 * half_in, d_out)
  values = jnp.asarray(_levels(node.kind))[codes.astype(jnp.int32)]
  absmax = dequantize_absmax(node)
  blocks = absmax.shape[-2]
  values = values.reshape(*lead, blocks, node.block_size, d_out) * absmax[..., None, :]
  return values.reshape(*lead, 2 * half_in, d_out).astype(dtype)


@dataclasses.dataclass(frozen=True)
class QuantSettings:
  """How frozen base kernels are stored in 4 bits (QLoRA): `kind` (`nf4`, bitsandbytes-exact,
  or symmetric `int4`), `block_size` inputs per absmax scale, double quantization of those
  scales (8-bit, blocks of 256) and its rounding, and the kernels it applies to (`targets`, read
  like `LoraSettings.targets`). Invalid values raise `UserError` when the settings are made."""

  kind: str = 'nf4'
  block_size: int = 64
  double_quant: bool = True
  double_quant_rounding: str = 'min_error'
  targets: tuple[str, ...] = DEFAULT_TARGETS

  def __post_init__(self):
    object.__setattr__(self, 'targets', (self.targets,) if isinstance(self.targets, str)
                       else tuple(self.targets))
    check_choice('quant.kind', self.kind, KINDS)
    check_number('quant.block_size', self.block_size, low=1, integer=True)
    check_choice('quant.double_quant_rounding', self.double_quant_rounding,
                 DOUBLE_QUANT_ROUNDING)
    # Built (and its targets checked) once: `targeted` runs for every tensor a load reads.
    object.__setattr__(self, '_targeted', target_matcher(self.targets, 'quant.targets'))

  def quantize_kernel(self, kernel: jax.Array) -> QuantizedKernel:
    """`quantize_kernel` of a dense kernel `[..., in, out]` with these settings."""
    return quantize_kernel(kernel, self.kind, self.block_size, self.double_quant,
                           self.double_quant_rounding)

  def targeted(self, path: Sequence[str]) -> bool:
    """Whether the parameter at `path` (a tuple of keys) is a kernel these settings quantize."""
    return self._targeted(path)


def quantize(params: Any, settings: QuantSettings = QuantSettings()) -> Any:
  """`params` with the kernels `settings.targets` match replaced by `QuantizedKernel` nodes
  (the rest as they are)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep=None)
  out = {path: settings.quantize_kernel(leaf) if settings.targeted(path) else leaf
         for path, leaf in flat.items()}
  return flax.traverse_util.unflatten_dict(out)


def dequantize_params(params: Any, dtype: Any = jnp.float32) -> Any:
  """`params` with every `QuantizedKernel` made dense again."""
  return jax.tree_util.tree_map(
      lambda x: dequantize(x, dtype) if isinstance(x, QuantizedKernel) else x, params,
      is_leaf=lambda x: isinstance(x, QuantizedKernel))


def node_shardings(names: Sequence[str | None], node: QuantizedKernel, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]]) -> QuantizedKernel:
  """Shardings of a quantized kernel's leaves from the dense kernel's logical axes: codes and
  absmax shard like the kernel; the small double-quantization statistics are replicated
  along their own dimension."""
  *lead, _, _ = names

  def spec(leaf, leaf_names):
    if leaf is None:
      return None
    return NamedSharding(mesh, logical_to_mesh_spec(leaf_names, leaf.shape, mesh, rules))

  return QuantizedKernel(
      spec(node.codes, names), spec(node.absmax, names),
      spec(node.absmax_scale, (*lead, None)), spec(node.absmax_offset, (*lead, None, None)),
      node.kind, node.block_size)


def bits_per_parameter(node: QuantizedKernel) -> float:
  return 8 * node.nbytes() / math.prod(node.shape)
