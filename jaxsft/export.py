"""Back to the HF ecosystem: merged checkpoints, PEFT adapters, and adapters from PEFT.

  merged   an HF folder `transformers` (and vLLM / TGI) load: LoRA folded into the kernels,
           4-bit bases dequantized first, written in bf16 (or fp32/fp16) with the tokenizer.
  peft     `adapter_config.json` + `adapter_model.safetensors` with PEFT's names
           (`base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`, `[r, in]`;
           `lora_B.weight`, `[out, r]`), loadable with `peft.PeftModel.from_pretrained`.
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
from etils import epath

from jaxsft import hf, lora, quant
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
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  tensors = peft_tensors(lora_tree, num_layers)
  if jax.process_index() != 0:
    return
  path = epath.Path(out)
  path.mkdir(parents=True, exist_ok=True)
  modules = sorted({key.split('.')[-3] for key in tensors})
  adapter_config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': rank, 'lora_alpha': alpha,
      'lora_dropout': dropout, 'use_rslora': rslora, 'target_modules': modules,
      'bias': 'none', 'fan_in_fan_out': False, 'init_lora_weights': True,
      'modules_to_save': None, 'inference_mode': True, 'base_model_name_or_path': base_model}
  (path / 'adapter_config.json').write_text(json.dumps(adapter_config, indent=2))
  save_file(tensors, os.path.join(out, 'adapter_model.safetensors'))


def load_peft_adapter(folder: str, abstract_lora_tree: Any, num_layers: int
                      ) -> tuple[Any, dict[str, Any]]:
  """A PEFT adapter folder -> (LoRA tree shaped like `abstract_lora_tree`, adapter config)."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
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


def merged_params(params: Any, lora_tree: Any | None, scale: float) -> Any:
  """Dense params for export: LoRA merged, quantized kernels dequantized."""
  if lora_tree is not None:
    return lora.merge_lora(params, lora_tree, scale, quantized_dtype=jnp.float32)
  return quant.dequantize_params(params, jnp.float32)


def save_merged(out: str, model_config: Any, params: Any, lora_tree: Any | None, scale: float,
                dtype: Any = jnp.bfloat16, tokenizer_dir: str | None = None,
                chat_template: str | None = None) -> None:
  hf.save_checkpoint(out, model_config, merged_params(params, lora_tree, scale), dtype=dtype,
                     tokenizer_dir=tokenizer_dir)
  if chat_template is not None:
    write_chat_template(out, chat_template)


def write_chat_template(out: str, chat_template: str) -> None:
  """Makes `chat_template` the template of the tokenizer in `out`: `chat_template.jinja`,
  which transformers reads first, and no competing copy in `tokenizer_config.json`. The
  `{% generation %}` markers of jaxsft's templates render as nothing in `apply_chat_template`.
  """
  if jax.process_index() != 0:
    return
  path = epath.Path(out)
  path.mkdir(parents=True, exist_ok=True)
  (path / 'chat_template.jinja').write_text(chat_template)
  config_path = path / 'tokenizer_config.json'
  if config_path.exists():
    tokenizer_config = json.loads(config_path.read_text())
    if tokenizer_config.pop('chat_template', None) is not None:
      config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))


def load_run(workdir: str) -> tuple[Any, Any, str | None, Any, dict[str, Any]]:
  """A run's `(config, model_config, base folder, train state, meta)` from its work directory:
  the config and base identity recorded in its newest good checkpoint (not `config.json`,
  which a later failed start may have rewritten), its base weights, and the checkpoint's state.
  A LoRA run whose base changed on disk since training is refused."""
  # pylint: disable=import-outside-toplevel
  import flax.linen as nn
  import ml_collections

  from jaxsft import checkpoint, optim, train
  workdir = train.absolute_workdir(workdir)
  if not epath.Path(workdir).exists():
    raise UserError(f'the work directory {workdir} does not exist; pass the --workdir of a '
                    'jaxsft train run.')
  saved = checkpoint.Checkpointer(workdir)
  step = saved.latest_step()
  if step is None:
    raise UserError(f'{workdir}/checkpoints holds no checkpoint; is {workdir} the --workdir of '
                    'a jaxsft train run that saved one?')
  meta = saved.read_meta(step)
  config = ml_collections.ConfigDict(meta['config'])
  model_config, folder = train.model_config_from(config)
  if config.lora.enabled and meta.get('base') is not None:
    now = json.loads(json.dumps(checkpoint.base_identity(folder)))
    if now != meta['base']:
      raise UserError(f'the run in {workdir} trained adapters on the base {meta["base"]}, but '
                      f'{folder} now holds {now}; restore the original base at that path.')
  mesh, rules = train.mesh_and_rules(config)
  optimizer, _ = optim.make_optimizer(config.optim, max(int(config.train.num_steps), 1))
  with nn.logical_axis_rules(rules):
    state = train.init_train_state(config, model_config, folder, optimizer, mesh, rules)
  _, state, _, meta = saved.restore_latest(state)
  saved.close()
  return config, model_config, folder, state, meta


def export_run(workdir: str, fmt: str, out: str, dtype: Any = jnp.bfloat16) -> None:
  """`jaxsft export`: a run's newest checkpoint as a merged HF folder or a PEFT adapter, each
  with the run's tokenizer and the chat template it trained with."""
  if fmt not in ('merged', 'peft'):
    raise UserError(f'unknown export format {fmt!r}; use merged or peft.')
  config, model_config, folder, state, meta = load_run(workdir)
  if fmt == 'peft' and not config.lora.enabled:
    raise UserError('--format peft needs a LoRA run; this one fine-tuned every weight '
                    '(use --format merged).')
  scale = lora.lora_scale(config.lora.rank, config.lora.alpha, config.lora.rslora)
  tokenizer_dir = config.data.tokenizer or folder
  chat_template = meta.get('chat_template')
  if chat_template is None and tokenizer_dir:  # a checkpoint from before templates were saved
    from jaxsft.data import load_template, load_tokenizer  # pylint: disable=import-outside-toplevel
    chat_template = load_template(config.data.template, load_tokenizer(tokenizer_dir)).source
  if fmt == 'merged':
    if config.lora.enabled:
      save_merged(out, model_config, state.frozen, state.params, scale, dtype, tokenizer_dir,
                  chat_template)
    else:
      save_merged(out, model_config, state.params, None, scale, dtype, tokenizer_dir,
                  chat_template)
    return
  save_peft_adapter(out, state.params, model_config.num_layers, rank=config.lora.rank,
                    alpha=config.lora.alpha, dropout=config.lora.dropout,
                    rslora=config.lora.rslora, base_model=config.model.path)
  if tokenizer_dir and jax.process_index() == 0:
    hf.copy_tokenizer_files(tokenizer_dir, out)
  if chat_template is not None:
    write_chat_template(out, chat_template)
