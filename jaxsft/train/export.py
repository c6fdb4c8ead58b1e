"""`jaxsft export`: a run back into the HF ecosystem, with the tokenizer and the chat template
it trained with.

  merged   an HF folder `transformers` (and vLLM / TGI) load: LoRA folded into the kernels,
           4-bit bases dequantized first, written in bf16 (or fp32/fp16).
  peft     `adapter_config.json` + `adapter_model.safetensors` (`jaxsft.interop.peft`),
           loadable with `peft.PeftModel.from_pretrained` on the original base.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxsft.adapters.lora import dense_params, lora_scale
from jaxsft.data.templates import load_template
from jaxsft.data.tokenizer import load_tokenizer
from jaxsft.errors import UserError
from jaxsft.interop import hf, peft
from jaxsft.train.workdir import load_run

FORMATS = ('merged', 'peft')


def export_run(workdir: str, fmt: str, out: str, dtype: Any = jnp.bfloat16) -> None:
  """A run's newest checkpoint as a merged HF folder or a PEFT adapter in `out`."""
  if fmt not in FORMATS:
    raise UserError(f'unknown export format {fmt!r}; use merged or peft.')
  config, model_config, folder, state, meta = load_run(workdir)
  if fmt == 'peft' and not config.lora.enabled:
    raise UserError('--format peft needs a LoRA run; this one fine-tuned every weight '
                    '(use --format merged).')
  tokenizer_dir = config.data.tokenizer or folder
  chat_template = meta.get('chat_template')
  if chat_template is None and tokenizer_dir:  # a checkpoint from before templates were saved
    chat_template = load_template(config.data.template, load_tokenizer(tokenizer_dir)).source
  if fmt == 'merged':
    scale = lora_scale(config.lora.rank, config.lora.alpha, config.lora.rslora)
    if config.lora.enabled:
      params = dense_params(state.frozen, state.params, scale)
    else:
      params = dense_params(state.params, None, scale)
    hf.save_checkpoint(out, model_config, params, dtype=dtype, tokenizer_dir=tokenizer_dir)
  else:
    peft.save_peft_adapter(out, state.params, model_config.num_layers, rank=config.lora.rank,
                           alpha=config.lora.alpha, dropout=config.lora.dropout,
                           rslora=config.lora.rslora, base_model=config.model.path)
    if tokenizer_dir and jax.process_index() == 0:
      hf.copy_tokenizer_files(tokenizer_dir, out)
  if chat_template is not None:
    hf.write_chat_template(out, chat_template)
