"""Which model a run trains: `ModelSettings` (an HF folder or hub id, a preset, or an architecture
written out, and how to execute it) and `model_config_from`, its `LlamaConfig` with the
execution settings and the adapters' scale applied, and the folder whose weights it starts
from."""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

from jaxsft.adapters.lora import LoraSettings
from jaxsft.errors import UserError, check_choice, check_number
from jaxsft.interop import hf
from jaxsft.interop.hf_config import config_from_hf, read_hf_config, resolve_checkpoint_dir
from jaxsft.interop.presets import preset
from jaxsft.models.config import (ATTENTION_IMPLEMENTATIONS, MOE_EXCHANGES, REMAT_POLICIES,
                                  LlamaConfig)

DTYPES = ('float32', 'bfloat16', 'float16')
# The `LlamaConfig` fields a run sets (how to execute), as opposed to the architecture.
EXECUTION_FIELDS = ('dtype', 'param_dtype', 'scan_layers', 'remat_policy',
                    'attention_implementation', 'mlp_chunk_size', 'moe_exchange', 'lora_scale',
                    'lora_dropout')


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """The model of a run: `path` (an HF folder or hub id), else `preset` (a named architecture,
  random weights), else `architecture` (`LlamaConfig` fields); and how it runs: compute
  `dtype`, `param_dtype` of the weights, scanned layers, rematerialisation and the attention
  kernel. Invalid choices raise `UserError` when the settings are made."""

  path: str = ''
  preset: str = ''
  architecture: dict[str, Any] = dataclasses.field(default_factory=dict)
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat_policy: str = 'none'
  attention_implementation: str = 'auto'
  mlp_chunk_size: int = 0
  moe_exchange: str = 'weights'
  router_aux_loss_coef: float = -1.0  # -1: the architecture's own (config.json)

  def __post_init__(self):
    check_choice('model.dtype', self.dtype, DTYPES)
    check_choice('model.param_dtype', self.param_dtype, DTYPES)
    check_choice('model.remat_policy', self.remat_policy, REMAT_POLICIES)
    check_choice('model.attention_implementation', self.attention_implementation,
                 ATTENTION_IMPLEMENTATIONS)
    check_number('model.mlp_chunk_size', self.mlp_chunk_size, low=0, integer=True)
    check_choice('model.moe_exchange', self.moe_exchange, MOE_EXCHANGES)
    if self.router_aux_loss_coef != -1.0:
      check_number('model.router_aux_loss_coef', self.router_aux_loss_coef, low=0)


def model_config_from(model: ModelSettings, lora: LoraSettings | None = None,
                      shapes_only: bool = False) -> tuple[LlamaConfig, str | None]:
  """The `LlamaConfig` of `model` (applying `lora`'s scale and dropout when adapters train) and
  the checkpoint folder to load (None: random init).

  `shapes_only` (memory plans, abstract states): a `path` that is not a local folder gives way
  to `preset` when one is set, so a 7B run can be planned without its weights.
  """
  execution = {
      'dtype': model.dtype, 'param_dtype': model.param_dtype, 'scan_layers': model.scan_layers,
      'remat_policy': model.remat_policy,
      'attention_implementation': model.attention_implementation,
      'mlp_chunk_size': model.mlp_chunk_size, 'moe_exchange': model.moe_exchange}
  if model.router_aux_loss_coef >= 0:
    execution['router_aux_loss_coef'] = model.router_aux_loss_coef
  if model.path and not (shapes_only and model.preset and not os.path.isdir(model.path)):
    folder = resolve_checkpoint_dir(model.path)
    if not shapes_only or glob.glob(os.path.join(folder, '*.safetensors')):
      # Headers only (no tensor is read): a config.json that does not describe the weights stops
      # the run here, before its data is tokenized, not when the weights load.
      _, reader = hf.check_checkpoint(folder)
      reader.close()
    return config_from_hf(read_hf_config(folder), **execution).with_lora(lora), folder
  if model.preset:
    return preset(model.preset, **execution).with_lora(lora), None
  if model.architecture:
    return LlamaConfig(**dict(model.architecture), **execution).with_lora(lora), None
  raise UserError('no model: set model.path (an HF folder or hub id), model.preset or '
                  'model.architecture in the config.')


def execution_settings(model_config: LlamaConfig) -> dict[str, Any]:
  """The `EXECUTION_FIELDS` of `model_config` (to apply to a checkpoint's own config)."""
  return {name: getattr(model_config, name) for name in EXECUTION_FIELDS}
