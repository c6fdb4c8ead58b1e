"""LoRA adapters as a second variable collection.

`variables = {'params': frozen, 'lora': adapters}`. The `lora` tree mirrors the paths of the
kernels it adapts: `layers/self_attn/q_proj/kernel [L, D, N*H]` gets
`layers/self_attn/q_proj/{a: [L, D, R], b: [L, R, N*H]}` (the leading `layers` axis only with
`scan_layers`). `Projection` finds them there and adds `scale * (dropout(x) @ a) @ b`.

Targets (`lora.targets`) are read by `jaxsft.adapters.targets.target_matcher`, as `quant.targets` are:
plain names (`q_proj`), regular expressions over the module path, or `all-linear`.

Norms named in `lora.modules_to_save` (PEFT's setting; e.g. Qwen3's `q_norm`, `k_norm`) train
whole: a copy of their `scale` lives in the `lora` tree at the same path
(`layers/self_attn/q_norm/scale`), starts as the base's value, and `RMSNorm` reads it from there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsft.adapters import quant
from jaxsft.adapters.targets import module_path, target_matcher
from jaxsft.errors import UserError

LORA_RANK_AXIS = 'lora_rank'


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
  """alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=None)


def abstract_lora(abstract_params: Any, targets: Sequence[str] | str, rank: int,
                  param_dtype: Any = jnp.float32, modules_to_save: Sequence[str] = ()) -> Any:
  """The LoRA tree's shapes as `nn.LogicallyPartitioned` ShapeDtypeStructs, from the boxed
  abstract params (`jax.eval_shape` of `init`): `a` takes the kernel's input axis and `b` its
  output axis, so adapters shard like the kernels they adapt. Norm scales matched by
  `modules_to_save` are copied whole, with their own axes."""
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
  if not out:
    kernels = sorted(module_path(p) for p in _flat(abstract_params) if p[-1] == 'kernel')
    raise UserError(f'lora.targets={list(targets)} match no kernel; kernels are e.g. '
                    f'{kernels[:6]}.')
  if modules_to_save and not any(path[-1] == 'scale' for path in out):
    norms = sorted({p[-2] for p in _flat(abstract_params) if p[-1] == 'scale'})
    raise UserError(f'lora.modules_to_save={list(modules_to_save)} match no norm; jaxsft '
                    f'trains whole only the RMSNorms, here {norms}.')
  return flax.traverse_util.unflatten_dict(out)


def init_lora(rng: jax.Array, abstract: Any, base_params: Any = None) -> Any:
  """PEFT's initialisation: A Kaiming-uniform (a = sqrt(5), i.e. U(+-1/sqrt(in))), B zeros, so
  the adapted model starts as the base model; a saved norm's scale starts as `base_params`'s.
  `abstract` is from `abstract_lora`."""
  flat = _flat(nn.unbox(abstract))
  base = _flat(base_params) if base_params is not None else {}
  out = {}
  keys = jax.random.split(rng, max(len(flat), 1))
  for key, (path, leaf) in zip(keys, sorted(flat.items())):
    if path[-1] == 'scale':
      out[path] = jnp.asarray(base[path], leaf.dtype)
    elif path[-1] == 'a':
      bound = 1.0 / math.sqrt(leaf.shape[-2])
      out[path] = jax.random.uniform(key, leaf.shape, leaf.dtype, -bound, bound)
    else:
      out[path] = jnp.zeros(leaf.shape, leaf.dtype)
  return flax.traverse_util.unflatten_dict(out)


def merge_lora(params: Any, lora: Any, scale: float, quantized_dtype: Any = jnp.bfloat16
               ) -> Any:
  """Params with `W + scale * A @ B` folded into each adapted kernel (for export). A 4-bit
  base kernel is dequantized first and the merged kernel written in `quantized_dtype`; every
  other quantized kernel is dequantized too, so the result is a plain dense tree."""
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
    merged[path + ('kernel',)] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(merged)


def dense_params(params: Any, lora_tree: Any | None, scale: float) -> Any:
  """A plain float32-kernel tree for export: the adapters merged (`merge_lora`) when there are
  any, every 4-bit kernel dequantized."""
  if lora_tree is not None:
    return merge_lora(params, lora_tree, scale, quantized_dtype=jnp.float32)
  return quant.dequantize_params(params, jnp.float32)
