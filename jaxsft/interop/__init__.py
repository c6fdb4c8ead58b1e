"""The HF ecosystem in and out: `config.json` <-> `LlamaConfig` (`hf_config`), safetensors
weights and tokenizer files (`hf`), the safetensors headers and their checks against
`config.json` before any tensor is read (`hf_headers`), PEFT LoRA adapters (`peft`) and named
architectures without weights (`presets`).

Usable in research code without the trainer: it may import `models`, `adapters`, `parallel`
and `errors`, never `data`, `train`, `eval`, the CLI or the config defaults.
"""

from jaxsft.interop.hf import (
    abstract_params,
    check_checkpoint,
    copy_tokenizer_files,
    load_checkpoint,
    param_shardings,
    save_checkpoint,
    write_chat_template,
)
from jaxsft.interop.hf_config import config_from_hf, config_to_hf, load_config
from jaxsft.interop.peft import load_peft_adapter, save_peft_adapter
from jaxsft.interop.presets import preset

__all__ = ['abstract_params', 'check_checkpoint', 'config_from_hf', 'config_to_hf',
           'copy_tokenizer_files', 'load_checkpoint', 'load_config', 'load_peft_adapter',
           'param_shardings', 'preset', 'save_checkpoint', 'save_peft_adapter',
           'write_chat_template']
