"""`jaxsft export`: a run back into the HF ecosystem, with the tokenizer and the chat template
it trained with.

  merged   an HF folder `transformers` (and vLLM / TGI) load: LoRA folded into the kernels,
           4-bit bases dequantized first, written in bf16 (or fp32/fp16).
  peft     `adapter_config.json` + `adapter_model.safetensors` (`jaxsft.interop.peft`),
           loadable with `peft.PeftModel.from_pretrained` on the original base.
  gguf     one `.gguf` file for llama.cpp / Ollama / LM Studio: the merged weights in f32,
           f16, bf16 or q8_0, the tokenizer and the chat template (`jaxsft.interop.gguf_file`;
           the `gguf` extra). Its `--out` is a file path: a new one, or an earlier jaxsft GGUF
           export (recognised by the record in its metadata), which is replaced whole.

An export writes only what it owns. `--out` is a new folder, an empty one, or an earlier jaxsft
export of the same format, recognised by the `jaxsft_export.json` it wrote (format, the files
written, the run and its step); other files there are left alone, and the files of the earlier
export are replaced (those the new one does not write are removed). A file an export would write
or that changes how the folder loads (`config.json`, weights, adapter and tokenizer files) and
that no earlier same-format export wrote is refused before anything is written, as is an export
over one of the other format, and any `--out` at or inside the run's base model or tokenizer
folder, the work directory itself or what the run writes there (`checkpoints/`, `config.json`,
...); a new folder inside the work directory (`WORKDIR/export/merged`) is fine. Paths compare
resolved (symlinks followed).

Everything is written into a folder beside the target (`.OUT.jaxsft-tmp-PID`), which then
becomes the target (a new or empty one) or whose files are moved into it one by one; a failed or
interrupted write leaves the target as it was (`jaxsft.train.export_target`, whose checks the
CLI runs before it imports JAX: a refusal costs no model load). Only process 0 checks and
writes, and its refusal stops every process.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from jaxsft.adapters.lora import dense_params
from jaxsft.data.templates import load_template
from jaxsft.data.tokenizer import load_tokenizer
from jaxsft.errors import UserError
from jaxsft.interop import gguf_file, hf, peft
from jaxsft.train.export_target import (
  EXPORT_FILES,
  FORMATS,
  GGUF_MARKER_KEY,
  MARKER,
  Staging,
  check_file_target,
  check_target,
  on_writer,
  recorded_folders,
  staging_path,
  write_errors,
)
from jaxsft.train.run import load_run
from jaxsft.train.workdir import absolute_workdir

__all__ = ['EXPORT_FILES', 'FORMATS', 'GGUF_MARKER_KEY', 'MARKER', 'check_target',
           'export_run']


def export_run(workdir: str, fmt: str, out: str, dtype: Any = 'bfloat16',
               gguf_type: str = 'f16') -> None:
  """A run's newest checkpoint as a merged HF folder, a PEFT adapter or a GGUF file (of
  `gguf_type`) in `out`, under the rules of the module docstring."""
  if fmt not in FORMATS:
    raise UserError(f'unknown export format {fmt!r}; use merged, peft or gguf.')
  if fmt == 'gguf':
    _export_gguf(workdir, out, gguf_type)
    return
  # Before the run loads: the base and tokenizer folders its config.json names, for a fast and
  # specific refusal. The checkpoint's own record (which a later failed start cannot rewrite)
  # is checked again once the run is loaded.
  def check_and_stage() -> Staging:
    check_target(out, fmt, workdir, recorded_folders(workdir))
    return Staging(out)

  staging = on_writer(check_and_stage)
  try:
    _export(workdir, fmt, out, dtype, staging)
  finally:
    if staging is not None:
      staging.clean_up()


def _dense_run_params(settings, state):
  """The run's parameters with its adapters folded in (the merged export's weights)."""
  if settings.lora is not None:
    return dense_params(state.frozen, state.params, settings.lora.scale)
  return dense_params(state.params, None, 1.0)


def _run_folders(settings, folder) -> list[tuple[str | None, str]]:
  """The folders an export must not write into: the run's base model and tokenizer."""
  return [(folder, "the run's base model folder"),
          (settings.data.tokenizer, "the run's tokenizer folder")]


def _chat_template(settings, meta: dict[str, Any], tokenizer_dir: str | None) -> str | None:
  """The template the run trained with: its checkpoint's record, else (a checkpoint from
  before templates were saved) `data.template` rendered for its tokenizer."""
  chat_template = meta.get('chat_template')
  if chat_template is None and tokenizer_dir:
    chat_template = load_template(settings.data.template, load_tokenizer(tokenizer_dir)).source
  return chat_template


def _export_gguf(workdir: str, out: str, gguf_type: str) -> None:
  on_writer(lambda: check_file_target(out, workdir, recorded_folders(workdir)))
  settings, model_config, folder, state, meta = load_run(workdir)
  gguf_file.check_gguf_model(model_config)
  tokenizer_dir = settings.data.tokenizer or folder
  on_writer(lambda: check_file_target(out, workdir, _run_folders(settings, folder)))
  chat_template = _chat_template(settings, meta, tokenizer_dir)
  params = _dense_run_params(settings, state)
  if jax.process_index() != 0:  # the tensors are gathered inside; process 0 writes
    gguf_file.save_gguf(os.devnull, model_config, params, tokenizer_dir=tokenizer_dir,
                        chat_template=chat_template, gguf_type=gguf_type)
    return
  temp = staging_path(out)
  source = {'workdir': absolute_workdir(workdir), 'step': int(state.step), 'type': gguf_type}
  try:
    with write_errors(out):
      os.makedirs(os.path.dirname(os.path.realpath(out)), exist_ok=True)
      gguf_file.save_gguf(temp, model_config, params, tokenizer_dir=tokenizer_dir,
                          chat_template=chat_template, gguf_type=gguf_type,
                          name=os.path.basename(absolute_workdir(workdir).rstrip('/')),
                          metadata={GGUF_MARKER_KEY: json.dumps(source, sort_keys=True)})
      os.replace(temp, os.path.realpath(out))
  finally:
    if os.path.lexists(temp):
      os.remove(temp)


def _export(workdir: str, fmt: str, out: str, dtype: Any, staging: Staging | None) -> None:
  settings, model_config, folder, state, meta = load_run(workdir)
  data = settings.data
  if fmt == 'peft' and settings.lora is None:
    raise UserError('--format peft needs a LoRA run; this one fine-tuned every weight '
                    '(use --format merged).')
  tokenizer_dir = data.tokenizer or folder
  previous = on_writer(lambda: check_target(out, fmt, workdir, _run_folders(settings, folder)))
  chat_template = _chat_template(settings, meta, tokenizer_dir)
  # Every process computes (merged weights may need gathering); the writers write on process 0.
  temp = staging_path(out)
  with write_errors(out):
    if fmt == 'merged':
      params = _dense_run_params(settings, state)
      hf.save_checkpoint(temp, model_config, params, dtype=dtype, tokenizer_dir=tokenizer_dir)
    else:
      peft.save_peft_adapter(temp, state.params, model_config.num_layers, settings.lora,
                             base_model=settings.model.path)
      if tokenizer_dir and jax.process_index() == 0:
        hf.copy_tokenizer_files(tokenizer_dir, temp)
    if chat_template is not None:
      hf.write_chat_template(temp, chat_template)
    if staging is not None:
      record = {'format': fmt, 'workdir': absolute_workdir(workdir), 'step': int(state.step)}
      if fmt == 'merged':
        record['dtype'] = str(jax.numpy.dtype(dtype))
      staging.commit(record, previous)
