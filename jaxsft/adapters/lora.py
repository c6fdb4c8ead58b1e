"""LoRA adapters as a second variable collection.

`variables = {'params': frozen, 'lora': adapters}`. The `lora` tree mirrors the paths of the
kernels it adapts: `layers/self_attn/q_proj/kernel [L, D, N*H]` gets
`layers/self_attn/q_proj/{a: [L, D, R], b: [L, R, N*H]}` (the leading `layers` axis only with
`scan_layers`). `Projection` finds them there and adds `scale * (dropout(x) @ a) @ b`.

DoRA (`dora=True`, Liu et al. 2024; PEFT's `use_dora`) adds `magnitude [L, N*H]`, one learned
length per output feature: the layer computes with `magnitude * V / ||V||`, where
`V = W + scale * A @ B` and the norm is over each kernel column (each output feature; a row of
PEFT's `[out, in]` weight). It starts at `||W||`, so the adapted model starts as the base model.

Targets (`lora.targets`) are read by `jaxsft.adapters.targets.target_matcher`, as `quant.targets` are:
plain names (`q_proj`), regular expressions over the module path, or `all-linear`.

Norms named in `lora.modules_to_save` (PEFT's setting; e.g. Qwen3's `q_norm`, `k_norm`) train
whole: a copy of their `scale` lives in the `lora` tree at the same path
(`layers/self_attn/q_norm/scale`), starts as the base's value, and `RMSNorm` reads it from there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsft.adapters import quant
from jaxsft.adapters.targets import (
  DEFAULT_TARGETS,
  is_expert,
  is_router,
  module_path,
  target_matcher,
)
from jaxsft.errors import UserError, check_number
from jaxsft.parallel.mesh import unboxed

LORA_RANK_AXIS = 'lora_rank'


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
  """alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """What a LoRA adapter is: `rank` r, `alpha`, rsLoRA scaling, dropout on the adapter's input
  (training only), the kernels it adapts (`targets`: names, regexes over module paths, or
  `all-linear`), the norms trained whole next to it (`modules_to_save`), and whether it is
  DoRA (`dora`: a learned magnitude per output feature, PEFT's `use_dora`).

  Invalid values raise `UserError` when the settings are made. `scale` is the factor of the
  update `x @ W + scale * (x @ A) @ B`; a model applying adapters takes it from here
  (`LlamaConfig.with_lora(settings)`), never from a default.
  """

  rank: int = 16
  alpha: float = 32.0
  rslora: bool = False
  dropout: float = 0.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  modules_to_save: tuple[str, ...] = ()
  dora: bool = False

  def __post_init__(self):
    for name in ('targets', 'modules_to_save'):
      value = getattr(self, name)
      object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
    check_number('lora.rank', self.rank, low=1, integer=True)
    check_number('lora.alpha', self.alpha, low=0, low_open=True)
    check_number('lora.dropout', self.dropout, low=0)
    if self.dropout >= 1:
      raise UserError(f'lora.dropout={self.dropout!r}: must be below 1 (1 drops every input).')
    target_matcher(self.targets, 'lora.targets')  # empty lists, bad regexes
    if self.modules_to_save:
      target_matcher(self.modules_to_save, 'lora.modules_to_save', leaf='scale')

  @property
  def scale(self) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora_scale(self.rank, self.alpha, self.rslora)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=None)


def abstract_lora(abstract_params: Any, settings: LoraSettings, param_dtype: Any = jnp.float32
                  ) -> Any:
  """The LoRA tree's shapes as `nn.LogicallyPartitioned` ShapeDtypeStructs, from the boxed
  abstract params (`jax.eval_shape` of `init`, or `jaxsft.interop.hf.abstract_params`): for a
  kernel `[..., in, out]`, `a [..., in, r]` takes the kernel's input axis and `b [..., r, out]`
  its output axis, so adapters shard like the kernels they adapt; with `settings.dora`,
  `magnitude [..., out]` takes the output axis too. Norm scales matched by
  `settings.modules_to_save` are copied whole, with their own axes. Targets that match no
  kernel raise `UserError` naming the kernels there are."""
  targets, rank, modules_to_save = settings.targets, settings.rank, settings.modules_to_save
  matches = target_matcher(targets)
  saved = (target_matcher(modules_to_save, 'lora.modules_to_save', leaf='scale')
           if modules_to_save else lambda path: False)
  out = {}
  for path, leaf in _flat(abstract_params).items():
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * leaf.ndim
    shape = (leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf).shape
    if saved(path):
      out[path] = nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, param_dtype), names)
      continue
    if not matches(path):
      continue
    *lead, d_in, d_out = shape
    *lead_names, in_name, out_name = names
    module = path[:-1]
    out[module + ('a',)] = nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct((*lead, d_in, rank), param_dtype),
        (*lead_names, in_name, LORA_RANK_AXIS))
    out[module + ('b',)] = nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct((*lead, rank, d_out), param_dtype),
        (*lead_names, LORA_RANK_AXIS, out_name))
    if settings.dora:
      out[module + ('magnitude',)] = nn.LogicallyPartitioned(
          jax.ShapeDtypeStruct((*lead, d_out), param_dtype), (*lead_names, out_name))
  kernel_paths = [p for p in _flat(abstract_params) if p[-1] == 'kernel']
  if not out:
    kernels = sorted(module_path(p) for p in kernel_paths)
    raise UserError(f'lora.targets={list(targets)} match no kernel; kernels are e.g. '
                    f'{kernels[:6]}.')
  if tuple(targets) != DEFAULT_TARGETS:  # the defaults span dense and sparse families
    unmatched = [t for t in targets if not any(target_matcher([t])(p) for p in kernel_paths)]
    if unmatched:
      names = sorted({p[-2] for p in kernel_paths})
      raise UserError(f'lora.targets {unmatched} match no kernel of this model, whose '
                      f'projections are {names}; name those (a mixture-of-experts model\'s '
                      'experts are gate_up_proj and down_proj), or drop the others.')
  if settings.dropout and any(is_expert(p) or is_router(p) for p in kernel_paths
                              if matches(p)):
    raise UserError(f'lora.dropout={settings.dropout} with adapters on experts or the router: '
                    'PEFT adapts those as parameters (target_parameters), without dropout, so '
                    'the adapter could not load in PEFT; set lora.dropout=0.')
  if settings.dora and any(is_expert(p) or is_router(p) for p in kernel_paths if matches(p)):
    raise UserError('lora.dora=True with adapters on experts or the router: PEFT adapts those as '
                    'parameters (target_parameters), which have no DoRA; drop them from '
                    'lora.targets or set lora.dora=False.')
  if modules_to_save and not any(path[-1] == 'scale' for path in out):
    norms = sorted({p[-2] for p in _flat(abstract_params) if p[-1] == 'scale'})
    raise UserError(f'lora.modules_to_save={list(modules_to_save)} match no norm; jaxsft '
                    f'trains whole only the RMSNorms, here {norms}.')
  return flax.traverse_util.unflatten_dict(out)


def dora_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """`||W + scale * A @ B||` of each output feature, float32: kernel `[..., in, out]`, a
  `[..., in, r]`, b `[..., r, out]` -> `[..., out]` (the norm over `in`: PEFT's norm of each row
  of its `[out, in]` weight). Formed whole, as PEFT does: DoRA's cost over LoRA."""
  weight = kernel.astype(jnp.float32) + scale * jnp.einsum(
      '...ir,...ro->...io', a.astype(jnp.float32), b.astype(jnp.float32))
  return jnp.sqrt(jnp.sum(weight * weight, axis=-2))


def _column_norm(kernel: Any) -> jax.Array:
  """`||W||` of each output feature (float32) of a dense or 4-bit `[..., in, out]` kernel."""
  if isinstance(kernel, quant.QuantizedKernel):
    kernel = quant.dequantize(kernel, jnp.float32)
  kernel = jnp.asarray(kernel, jnp.float32)
  return jnp.sqrt(jnp.sum(kernel * kernel, axis=-2))


def init_lora(rng: jax.Array, abstract: Any, base_params: Any = None) -> Any:
  """PEFT's initialisation: A Kaiming-uniform (a = sqrt(5), i.e. U(+-1/sqrt(in))), B zeros, so
  the adapted model starts as the base model; a saved norm's scale starts as `base_params`'s,
  a DoRA magnitude as the norm of each output feature of the `base_params` kernel (a 4-bit one
  dequantized, as PEFT does). `abstract` is from `abstract_lora`; the result has its shapes,
  unboxed."""
  flat = _flat(unboxed(abstract))
  base = _flat(base_params) if base_params is not None else {}
  out = {}
  magnitudes = [path for path in flat if path[-1] == 'magnitude']
  if magnitudes and base_params is None:
    raise ValueError('DoRA adapters start from the base kernels\' norms; pass base_params.')
  for path in magnitudes:
    out[path] = _column_norm(base[path[:-1] + ('kernel',)]).astype(flat[path].dtype)
  # Keys as without DoRA (magnitudes draw none): the same seed gives LoRA and DoRA the same A.
  rest = sorted((path, leaf) for path, leaf in flat.items() if path[-1] != 'magnitude')
  keys = jax.random.split(rng, max(len(rest), 1))
  for key, (path, leaf) in zip(keys, rest):
    if path[-1] == 'scale':
      out[path] = jnp.asarray(base[path], leaf.dtype)
    elif path[-1] == 'a':
      bound = 1.0 / math.sqrt(leaf.shape[-2])
      out[path] = jax.random.uniform(key, leaf.shape, leaf.dtype, -bound, bound)
    else:
      out[path] = jnp.zeros(leaf.shape, leaf.dtype)
  return flax.traverse_util.unflatten_dict(out)


def merge_lora(params: Any, lora: Any, scale: float, quantized_dtype: Any = jnp.float32
               ) -> Any:
  """Params with `W + scale * A @ B` folded into each adapted kernel (for export), computed in
  float32; under DoRA `magnitude * V / ||V||` of `V = W + scale * A @ B`. A 4-bit base kernel
  is dequantized first (float32) and every quantized kernel comes out in `quantized_dtype`
  (float32 by default: no rounding on top of the 4-bit codes; pass `jnp.bfloat16` for half the
  bytes); dense kernels keep their dtype. The result is a plain dense tree, e.g. for
  `jaxsft.interop.hf.save_checkpoint`."""
  flat_params = _flat(params)
  flat_lora = _flat(lora)
  merged = {}
  for path, kernel in flat_params.items():
    if isinstance(kernel, quant.QuantizedKernel):
      kernel = quant.dequantize(kernel, jnp.float32).astype(quantized_dtype)
    merged[path] = kernel
  for path, scale_copy in flat_lora.items():
    if path[-1] == 'scale':
      merged[path] = scale_copy.astype(merged[path].dtype)
  for path in {p[:-1] for p in flat_lora if p[-1] in ('a', 'b')}:
    kernel = merged[path + ('kernel',)]
    delta = jnp.einsum('...ir,...ro->...io', flat_lora[path + ('a',)].astype(jnp.float32),
                       flat_lora[path + ('b',)].astype(jnp.float32))
    weight = kernel.astype(jnp.float32) + scale * delta
    if path + ('magnitude',) in flat_lora:  # DoRA: each output feature's column to its length
      magnitude = flat_lora[path + ('magnitude',)].astype(jnp.float32)
      norm = jnp.sqrt(jnp.sum(weight * weight, axis=-2, keepdims=True))
      weight = weight * (magnitude[..., None, :] / norm)
    merged[path + ('kernel',)] = weight.astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(merged)


def dense_params(params: Any, lora_tree: Any | None, scale: float) -> Any:
  """A plain float32-kernel tree for export: the adapters merged (`merge_lora`) when there are
  any, every 4-bit kernel dequantized."""
  if lora_tree is not None:
    return merge_lora(params, lora_tree, scale)  # 4-bit kernels come out float32
  return quant.dequantize_params(params, jnp.float32)
