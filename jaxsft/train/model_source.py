"""Which model a run trains: the `LlamaConfig` of its `model` section (an HF folder or hub id, a
preset, or an architecture written out) with the run's execution settings applied, and the
folder whose weights it starts from."""

from __future__ import annotations

import glob
import os
from typing import Any

from jaxsft.adapters.lora import lora_scale
from jaxsft.errors import UserError
from jaxsft.interop import hf
from jaxsft.interop.hf_config import config_from_hf, read_hf_config, resolve_checkpoint_dir
from jaxsft.interop.presets import preset
from jaxsft.models.config import LlamaConfig

# The `LlamaConfig` fields a run sets (how to execute), as opposed to the architecture.
EXECUTION_FIELDS = ('dtype', 'param_dtype', 'scan_layers', 'remat_policy',
                    'attention_implementation', 'lora_scale', 'lora_dropout')


def model_config_from(config: Any, shapes_only: bool = False
                      ) -> tuple[LlamaConfig, str | None]:
  """The `LlamaConfig` of a run and the checkpoint folder to load (None: random init).

  `shapes_only` (memory plans, abstract states): a `model.path` that is not a local folder
  gives way to `model.preset` when one is set, so a 7B run can be planned without its weights.
  """
  m = config.model
  execution = {
      'dtype': m.dtype, 'param_dtype': m.param_dtype, 'scan_layers': m.scan_layers,
      'remat_policy': m.remat_policy, 'attention_implementation': m.attention_implementation,
      'lora_scale': lora_scale(config.lora.rank, config.lora.alpha, config.lora.rslora),
      'lora_dropout': config.lora.dropout if config.lora.enabled else 0.0}
  if m.path and not (shapes_only and m.preset and not os.path.isdir(m.path)):
    folder = resolve_checkpoint_dir(m.path)
    if not shapes_only or glob.glob(os.path.join(folder, '*.safetensors')):
      # Headers only (no tensor is read): a config.json that does not describe the weights stops
      # the run here, before its data is tokenized, not when the weights load.
      _, reader = hf.check_checkpoint(folder)
      reader.close()
    return config_from_hf(read_hf_config(folder), **execution), folder
  if m.preset:
    return preset(m.preset, **execution), None
  if m.architecture:
    return LlamaConfig(**dict(m.architecture), **execution), None
  raise UserError('no model: set model.path (an HF folder or hub id), model.preset or '
                  'model.architecture in the config.')


def execution_settings(model_config: LlamaConfig) -> dict[str, Any]:
  """The `EXECUTION_FIELDS` of `model_config` (to apply to a checkpoint's own config)."""
  return {name: getattr(model_config, name) for name in EXECUTION_FIELDS}
