"""PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors` with
PEFT's names (`base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`, `[r, in]`;
`lora_B.weight`, `[out, r]`; norms trained whole under `modules_to_save` as
`....self_attn.q_norm.weight`), which `peft.PeftModel.from_pretrained` loads, and back into a
jaxsft LoRA tree (scanned or unrolled layers).
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
from jaxsft.errors import UserError
from jaxsft.parallel.mesh import unboxed

_PEFT_PREFIX = 'base_model.model.model.'
_PEFT_LEAF = {'a': 'lora_A.weight', 'b': 'lora_B.weight', 'scale': 'weight'}


def _peft_names(path: tuple[str, ...], num_layers: int) -> list[str]:
  """PEFT's tensor names for one leaf of a LoRA tree, one per layer it holds (a scanned leaf
  holds every layer): `('layers', 'self_attn', 'q_proj', 'a')` ->
  `base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`; a saved norm's
  `('layers', 'self_attn', 'q_norm', 'scale')` -> `....self_attn.q_norm.weight` (how PEFT saves
  `modules_to_save`); the final `('norm', 'scale')` -> `base_model.model.model.norm.weight`."""
  top, *inner, leaf = path
  suffix = '.'.join(inner + [_PEFT_LEAF[leaf]])
  if top == 'layers':
    return [f'{_PEFT_PREFIX}layers.{i}.{suffix}' for i in range(num_layers)]
  if top.startswith('layers_'):
    return [f'{_PEFT_PREFIX}layers.{top.split("_")[1]}.{suffix}']
  return [f'{_PEFT_PREFIX}{top}.{suffix}']


def _to_peft(leaf: str, value: np.ndarray) -> np.ndarray:
  """jaxsft `[in, r]` / `[r, out]` -> PEFT's torch layout `[r, in]` / `[out, r]`."""
  return np.ascontiguousarray(value if leaf == 'scale' else value.T)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=None)


def peft_tensors(lora_tree: Any, num_layers: int) -> dict[str, np.ndarray]:
  """PEFT's state dict (float32) of a LoRA tree."""
  tensors = {}
  for path, value in _flat(jax.device_get(lora_tree)).items():
    value = np.asarray(value, np.float32)
    names = _peft_names(path, num_layers)
    parts = value if path[0] == 'layers' else [value]
    for name, part in zip(names, parts):
      tensors[name] = _to_peft(path[-1], part)
  return dict(sorted(tensors.items()))


def save_peft_adapter(out: str, lora_tree: Any, num_layers: int, settings: LoraSettings,
                      base_model: str = '') -> None:
  """Writes the LoRA tree as a PEFT adapter folder, `adapter_config.json` (rank, alpha, rsLoRA,
  dropout of `settings`; the target modules the tree holds) and `adapter_model.safetensors`
  (process 0 only), that `peft.PeftModel.from_pretrained` loads over `base_model`."""
  rank, alpha, dropout, rslora = (settings.rank, settings.alpha, settings.dropout,
                                  settings.rslora)
  tensors = peft_tensors(lora_tree, num_layers)
  if jax.process_index() != 0:
    return
  os.makedirs(out, exist_ok=True)
  modules = sorted({key.split('.')[-3] for key in tensors if '.lora_' in key})
  saved = sorted({key.split('.')[-2] for key in tensors if '.lora_' not in key})
  adapter_config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': rank, 'lora_alpha': alpha,
      'lora_dropout': dropout, 'use_rslora': rslora, 'target_modules': modules,
      'bias': 'none', 'fan_in_fan_out': False, 'init_lora_weights': True,
      'modules_to_save': saved or None, 'inference_mode': True,
      'base_model_name_or_path': base_model}
  with open(os.path.join(out, 'adapter_config.json'), 'w') as f:
    json.dump(adapter_config, f, indent=2)
  save_file(tensors, os.path.join(out, 'adapter_model.safetensors'))


def load_peft_adapter(folder: str, abstract_lora_tree: Any, num_layers: int
                      ) -> tuple[Any, dict[str, Any]]:
  """A PEFT adapter folder -> (LoRA tree shaped like `abstract_lora_tree`, from
  `jaxsft.adapters.lora.abstract_lora`, and the adapter's config as a dict). Tensors the tree
  does not ask for, or missing ones, are a `UserError` naming the adapter's target modules."""
  with open(os.path.join(folder, 'adapter_config.json')) as f:
    adapter_config = json.load(f)
  files = [name for name in ('adapter_model.safetensors',) if
           os.path.exists(os.path.join(folder, name))]
  if not files:
    raise UserError(f'{folder} has no adapter_model.safetensors (PEFT adapters saved '
                    'as .bin need `safe_serialization=True`).')
  tensors = {key.replace('.default.', '.').replace('.modules_to_save.', '.'): value
             for key, value in load_file(os.path.join(folder, files[0])).items()}
  out, used = {}, set()
  for path, leaf in _flat(unboxed(abstract_lora_tree)).items():
    parts = []
    for name in _peft_names(path, num_layers):
      if name not in tensors:
        raise UserError(f'{folder}: no tensor {name}; set lora.targets to the adapter\'s '
                        f'target_modules ({adapter_config.get("target_modules")}) and '
                        'lora.modules_to_save to its modules_to_save '
                        f'({adapter_config.get("modules_to_save")}).')
      used.add(name)
      value = tensors[name].astype(np.float32)
      parts.append(value if path[-1] == 'scale' else value.T)
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
