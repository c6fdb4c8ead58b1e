"""PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors` with
PEFT's names (`base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`, `[r, in]`;
`lora_B.weight`, `[out, r]`; norms trained whole under `modules_to_save` as
`....self_attn.q_norm.weight`; DoRA's magnitudes, `use_dora`, as
`....q_proj.lora_magnitude_vector`, `[out]`), which `peft.PeftModel.from_pretrained` loads, and
back into a jaxsft LoRA tree (scanned or unrolled layers).

Mixture-of-experts models: transformers keeps each expert projection of a layer as one
`[E, out, in]` parameter and the router as a bare weight, which PEFT adapts through
`target_parameters` (its `ParamWrapper`: one rank-r adapter per expert, A `[E * r, in]`, B
`[out, r * E]`); jaxsft's per-expert `a [E, in, r]`, `b [E, r, out]` map onto them exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxsft.adapters.lora import LoraSettings
from jaxsft.adapters.targets import is_expert, is_router
from jaxsft.errors import UserError
from jaxsft.parallel.mesh import unboxed

_PEFT_PREFIX = 'base_model.model.model.'
_PEFT_LEAF = {'a': 'lora_A.weight', 'b': 'lora_B.weight', 'scale': 'weight',
              'magnitude': 'lora_magnitude_vector'}  # PEFT saves the last without `.weight`
# Kernels PEFT reaches with `target_parameters` (parameters, not `nn.Linear` modules): each
# expert projection, stored by transformers as one `[E, out, in]` tensor, and the router's
# weight. Their parameter names, and the order transformers defines an experts module's
# parameters in (PEFT nests one wrapper per targeted parameter of a module, the first defined
# innermost, so an inner one's tensors sit under `base_layer.`).
_EXPERT_PARAMETERS = ('gate_up_proj', 'down_proj')


def _kernel(path: tuple[str, ...]) -> tuple[str, ...]:
  """The path of the kernel a LoRA leaf adapts (`targets.is_expert`/`is_router` read it)."""
  return path[:-1] + ('kernel',)


def _module(path: tuple[str, ...]) -> tuple[str, ...]:
  """The module path inside a layer (or at the top) of a LoRA leaf's path."""
  top = 1 if path[0] == 'layers' or path[0].startswith('layers_') else 0
  return tuple(path[top:-1])


def _peft_names(path: tuple[str, ...], num_layers: int,
                targeted: frozenset[tuple[str, ...]] = frozenset()) -> list[str]:
  """PEFT's tensor names for one leaf of a LoRA tree, one per layer it holds (a scanned leaf
  holds every layer): `('layers', 'self_attn', 'q_proj', 'a')` ->
  `base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`; a saved norm's
  `('layers', 'self_attn', 'q_norm', 'scale')` -> `....self_attn.q_norm.weight` (how PEFT saves
  `modules_to_save`); the final `('norm', 'scale')` -> `base_model.model.model.norm.weight`.
  An expert projection is named after its experts module, with one `base_layer.` per targeted
  parameter of that module defined after it (`targeted`: the module paths the tree adapts):
  `mlp.experts.base_layer.lora_A.weight` for `gate_up_proj` when `down_proj` is adapted too;
  the router after its module, `mlp.gate.lora_A.weight`."""
  top, *inner, leaf = path
  if is_expert(_kernel(path)):
    module = tuple(inner[:-1])
    later = _EXPERT_PARAMETERS[_EXPERT_PARAMETERS.index(inner[-1]) + 1:]
    wrappers = sum(module + (name,) in targeted for name in later)
    inner = list(module) + ['base_layer'] * wrappers
  suffix = '.'.join(inner + [_PEFT_LEAF[leaf]])
  if top == 'layers':
    return [f'{_PEFT_PREFIX}layers.{i}.{suffix}' for i in range(num_layers)]
  if top.startswith('layers_'):
    return [f'{_PEFT_PREFIX}layers.{top.split("_")[1]}.{suffix}']
  return [f'{_PEFT_PREFIX}{top}.{suffix}']


def _to_peft(leaf: str, value: np.ndarray) -> np.ndarray:
  """jaxsft `[in, r]` / `[r, out]` -> PEFT's torch layout `[r, in]` / `[out, r]`. Experts'
  `[E, in, r]` / `[E, r, out]` -> PEFT's `[E * r, in]` (rows expert-major) / `[out, r * E]`
  (columns rank-major), the layout of its `ParamWrapper`. Norm scales and DoRA magnitudes
  (`[out]`, one layer's) are the same in both."""
  if leaf in ('scale', 'magnitude'):
    return np.ascontiguousarray(value)
  if value.ndim == 2:
    return np.ascontiguousarray(value.T)
  if leaf == 'a':
    return np.ascontiguousarray(value.transpose(0, 2, 1).reshape(-1, value.shape[1]))
  return np.ascontiguousarray(value.transpose(2, 1, 0).reshape(value.shape[2], -1))


def _from_peft(leaf: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """The inverse of `_to_peft` for one layer's leaf of `shape` (jaxsft layout)."""
  if leaf in ('scale', 'magnitude'):
    return value
  if len(shape) == 2:
    return value.T
  experts, rows, columns = shape
  if leaf == 'a':  # [E * r, in] -> [E, in, r]
    return value.reshape(experts, columns, rows).transpose(0, 2, 1)
  return value.reshape(columns, rows, experts).transpose(2, 1, 0)  # [out, r * E] -> [E, r, out]


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=None)


def _targeted(paths) -> frozenset[tuple[str, ...]]:
  return frozenset(_module(path) for path in paths if path[-1] in ('a', 'b'))


def peft_tensors(lora_tree: Any, num_layers: int) -> dict[str, np.ndarray]:
  """PEFT's state dict (float32) of a LoRA tree."""
  tensors = {}
  flat = _flat(jax.device_get(lora_tree))
  targeted = _targeted(flat)
  for path, value in flat.items():
    value = np.asarray(value, np.float32)
    names = _peft_names(path, num_layers, targeted)
    parts = value if path[0] == 'layers' else [value]
    for name, part in zip(names, parts):
      tensors[name] = _to_peft(path[-1], part)
  return dict(sorted(tensors.items()))


def _targets(lora_tree: Any) -> tuple[list[str], list[str]]:
  """PEFT's `target_modules` (module names) and `target_parameters` (`mlp.experts.down_proj`,
  `mlp.gate.weight`) for the kernels a LoRA tree adapts."""
  modules, parameters = set(), set()
  for path in _flat(lora_tree):
    if path[-1] != 'a':
      continue
    module = _module(path)
    if is_router(_kernel(path)):
      parameters.add('.'.join(module) + '.weight')
    elif is_expert(_kernel(path)):
      parameters.add('.'.join(module))
    else:
      modules.add(module[-1])
  return sorted(modules), sorted(parameters)


def save_peft_adapter(out: str, lora_tree: Any, num_layers: int, settings: LoraSettings,
                      base_model: str = '') -> None:
  """Writes the LoRA tree as a PEFT adapter folder, `adapter_config.json` (rank, alpha, rsLoRA,
  dropout and DoRA of `settings`; the target modules the tree holds) and
  `adapter_model.safetensors` (process 0 only), that `peft.PeftModel.from_pretrained` loads
  over `base_model`."""
  rank, alpha, dropout, rslora = (settings.rank, settings.alpha, settings.dropout,
                                  settings.rslora)
  tensors = peft_tensors(lora_tree, num_layers)
  if jax.process_index() != 0:
    return
  os.makedirs(out, exist_ok=True)
  modules, parameters = _targets(lora_tree)
  saved = sorted({key.split('.')[-2] for key in tensors if '.lora_' not in key})
  adapter_config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': rank, 'lora_alpha': alpha,
      'lora_dropout': dropout, 'use_rslora': rslora, 'use_dora': settings.dora,
      'target_modules': modules, 'bias': 'none', 'fan_in_fan_out': False, 'init_lora_weights': True,
      'modules_to_save': saved or None, 'inference_mode': True,
      'base_model_name_or_path': base_model}
  if parameters:
    adapter_config['target_parameters'] = parameters
  with open(os.path.join(out, 'adapter_config.json'), 'w') as f:
    json.dump(adapter_config, f, indent=2)
  save_file(tensors, os.path.join(out, 'adapter_model.safetensors'))


def load_peft_adapter(folder: str, abstract_lora_tree: Any, num_layers: int
                      ) -> tuple[Any, dict[str, Any]]:
  """A PEFT adapter folder -> (LoRA tree shaped like `abstract_lora_tree`, from
  `jaxsft.adapters.lora.abstract_lora`, and the adapter's config as a dict). Tensors the tree
  does not ask for, or missing ones, are a `UserError` naming the adapter's target modules;
  so is a DoRA adapter (`use_dora`) for a tree without magnitudes, or the other way round."""
  with open(os.path.join(folder, 'adapter_config.json')) as f:
    adapter_config = json.load(f)
  flat = _flat(unboxed(abstract_lora_tree))
  dora = any(path[-1] == 'magnitude' for path in flat)
  if bool(adapter_config.get('use_dora', False)) != dora:
    raise UserError(f'{folder} has use_dora={bool(adapter_config.get("use_dora", False))} but '
                    f'lora.dora={dora}; make them equal.')
  files = [name for name in ('adapter_model.safetensors',) if
           os.path.exists(os.path.join(folder, name))]
  if not files:
    raise UserError(f'{folder} has no adapter_model.safetensors (PEFT adapters saved '
                    'as .bin need `safe_serialization=True`).')
  tensors = {key.replace('.default.', '.').replace('.modules_to_save.', '.'): value
             for key, value in load_file(os.path.join(folder, files[0])).items()}
  out, used = {}, set()
  targeted = _targeted(flat)
  for path, leaf in flat.items():
    parts = []
    layer_shape = tuple(leaf.shape[1:] if path[0] == 'layers' else leaf.shape)
    for name in _peft_names(path, num_layers, targeted):
      if name not in tensors:
        raise UserError(f'{folder}: no tensor {name}; set lora.targets to the adapter\'s '
                        f'target_modules ({adapter_config.get("target_modules")}) and '
                        'lora.modules_to_save to its modules_to_save '
                        f'({adapter_config.get("modules_to_save")}).')
      used.add(name)
      value = tensors[name].astype(np.float32)
      if len(layer_shape) == 3 and value.size != int(np.prod(layer_shape)):
        raise UserError(f'{folder}: {name} has shape {value.shape}, which does not hold '
                        f'{layer_shape} (lora.rank must equal the adapter\'s r='
                        f'{adapter_config.get("r")}).')
      parts.append(_from_peft(path[-1], value, layer_shape))
    value = np.stack(parts) if path[0] == 'layers' else parts[0]
    if value.shape != tuple(leaf.shape):
      raise UserError(f'{folder}: {"/".join(path)} has shape {value.shape}, expected '
                      f'{tuple(leaf.shape)} (lora.rank must equal the adapter\'s r='
                      f'{adapter_config.get("r")}).')
    out[path] = jnp.asarray(value, leaf.dtype)
  leftover = sorted(set(tensors) - used)
  if leftover:
    raise UserError(f'{folder}: the adapter has tensors jaxsft\'s lora.targets / '
                    f'lora.modules_to_save do not ask for, e.g. {leftover[:3]}; set them to '
                    f'the adapter\'s target_modules ({adapter_config.get("target_modules")}) '
                    f'and modules_to_save ({adapter_config.get("modules_to_save")}).')
  return flax.traverse_util.unflatten_dict(out), adapter_config
