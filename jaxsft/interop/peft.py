"""PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors` with
PEFT's names (`base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`, `[r, in]`;
`lora_B.weight`, `[out, r]`), which `peft.PeftModel.from_pretrained` loads, and back into a
jaxsft LoRA tree (scanned or unrolled layers).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxsft.errors import UserError

_PEFT_KEY = re.compile(r'^base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.'
                       r'(\w+)\.lora_([AB])\.weight$')


def _per_layer(tree: Any, num_layers: int) -> dict[tuple[int, str, str], dict[str, np.ndarray]]:
  """`{(layer, group, projection): {'a': [in, r], 'b': [r, out]}}` from a scanned or unrolled
  LoRA tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(tree)), sep=None)
  out: dict[tuple[int, str, str], dict[str, np.ndarray]] = {}
  for path, value in flat.items():
    top, group, projection, which = path
    value = np.asarray(value, np.float32)
    if top == 'layers':
      for layer in range(num_layers):
        out.setdefault((layer, group, projection), {})[which] = value[layer]
    else:
      out.setdefault((int(top.split('_')[1]), group, projection), {})[which] = value
  return out


def peft_tensors(lora_tree: Any, num_layers: int) -> dict[str, np.ndarray]:
  """PEFT's state dict (float32) of a LoRA tree."""
  tensors = {}
  for (layer, group, projection), pair in sorted(_per_layer(lora_tree, num_layers).items()):
    prefix = f'base_model.model.model.layers.{layer}.{group}.{projection}'
    tensors[f'{prefix}.lora_A.weight'] = np.ascontiguousarray(pair['a'].T)
    tensors[f'{prefix}.lora_B.weight'] = np.ascontiguousarray(pair['b'].T)
  return tensors


def save_peft_adapter(out: str, lora_tree: Any, num_layers: int, *, rank: int, alpha: float,
                      dropout: float, rslora: bool, base_model: str) -> None:
  """Writes `adapter_config.json` and `adapter_model.safetensors` (process 0 only)."""
  tensors = peft_tensors(lora_tree, num_layers)
  if jax.process_index() != 0:
    return
  os.makedirs(out, exist_ok=True)
  modules = sorted({key.split('.')[-3] for key in tensors})
  adapter_config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': rank, 'lora_alpha': alpha,
      'lora_dropout': dropout, 'use_rslora': rslora, 'target_modules': modules,
      'bias': 'none', 'fan_in_fan_out': False, 'init_lora_weights': True,
      'modules_to_save': None, 'inference_mode': True, 'base_model_name_or_path': base_model}
  with open(os.path.join(out, 'adapter_config.json'), 'w') as f:
    json.dump(adapter_config, f, indent=2)
  save_file(tensors, os.path.join(out, 'adapter_model.safetensors'))


def load_peft_adapter(folder: str, abstract_lora_tree: Any, num_layers: int
                      ) -> tuple[Any, dict[str, Any]]:
  """A PEFT adapter folder -> (LoRA tree shaped like `abstract_lora_tree`, adapter config)."""
  with open(os.path.join(folder, 'adapter_config.json')) as f:
    adapter_config = json.load(f)
  files = [name for name in ('adapter_model.safetensors',) if
           os.path.exists(os.path.join(folder, name))]
  if not files:
    raise UserError(f'{folder} has no adapter_model.safetensors (PEFT adapters saved '
                    'as .bin need `safe_serialization=True`).')
  tensors = load_file(os.path.join(folder, files[0]))
  found: dict[tuple[int, str, str], dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    match = _PEFT_KEY.match(key.replace('.default.', '.'))
    if not match:
      raise UserError(f'{folder}: unexpected adapter tensor {key!r}; jaxsft imports LoRA on '
                      'the decoder projections of LLaMA-family models.')
    layer, group, projection, which = match.groups()
    found.setdefault((int(layer), group, projection), {})['a' if which == 'A' else 'b'] = (
        value.T.astype(np.float32))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.unbox(abstract_lora_tree)),
                                         sep=None)
  out, used = {}, set()
  for path, leaf in flat.items():
    top, group, projection, which = path
    layers = range(num_layers) if top == 'layers' else [int(top.split('_')[1])]
    parts = []
    for layer in layers:
      pair = found.get((layer, group, projection))
      if pair is None or which not in pair:
        raise UserError(f'{folder}: no adapter for layer {layer} {group}.{projection}; set '
                        'lora.targets to the adapter\'s target_modules '
                        f'({adapter_config.get("target_modules")}).')
      used.add((layer, group, projection))
      parts.append(pair[which])
    value = np.stack(parts) if top == 'layers' else parts[0]
    if value.shape != tuple(leaf.shape):
      raise UserError(f'{folder}: {"/".join(path)} has shape {value.shape}, expected '
                      f'{tuple(leaf.shape)} (lora.rank must equal the adapter\'s r='
                      f'{adapter_config.get("r")}).')
    out[path] = jnp.asarray(value, leaf.dtype)
  leftover = sorted(set(found) - used)
  if leftover:
    raise UserError(f'{folder}: adapters for {leftover[:4]} are not in lora.targets; add '
                    f'{sorted({p for _, _, p in leftover})} to lora.targets.')
  return flax.traverse_util.unflatten_dict(out), adapter_config
