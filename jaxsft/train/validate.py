"""Checks that no single part's settings can make: the `data` section's values (the data part
takes its config section), the batch against the mesh, the tokenizer against the model.

Each part's settings check themselves when made (`LoraSettings`, `OptimizerSettings`, ...;
`jaxsft.train.run.run_settings` makes them all from a config), so a typo costs seconds, not a
compile.
"""

from __future__ import annotations

from typing import Any

from jaxsft.data.clean import CleanSettings
from jaxsft.data.formats import FORMATS
from jaxsft.data.packing import OVERLONG_POLICIES, STRATEGIES
from jaxsft.data.sources import BAD_RECORD_POLICIES
from jaxsft.data.spec import dataset_spec
from jaxsft.data.templates import TRAIN_ON, check_train_on, template_kind
from jaxsft.errors import UserError, check_choice, check_number


def check_data_config(d: Any) -> None:
  """Raises `UserError` for the first setting of a run's `data` section whose value cannot
  work (the other parts check themselves when their settings are made; `run_settings` adds
  where to set it)."""
  check_number('data.max_seq_len', d.max_seq_len, low=2, integer=True)
  check_choice('data.overlong', d.overlong, OVERLONG_POLICIES)
  check_choice('data.packing', d.packing, STRATEGIES)
  check_choice('data.on_bad_record', d.on_bad_record, BAD_RECORD_POLICIES)
  check_choice('data.train_on', d.train_on, TRAIN_ON)
  check_train_on(d.train_on, d.train_on_reasoning)  # the combination
  check_number('data.eval_size', d.eval_size, low=0)
  check_number('data.num_proc', d.num_proc, low=1, integer=True)
  check_number('data.map_batch_size', d.map_batch_size, low=1, integer=True)
  check_number('data.pack_window', d.pack_window, low=1, integer=True)
  CleanSettings.from_config(d.clean)  # data.clean.*: thresholds, sizes, the against list
  template_kind(d.template)
  for key in ('datasets', 'eval_datasets'):
    for i, entry in enumerate(d[key]):
      spec = dataset_spec(entry, f'data.{key}[{i}]')  # unknown keys, path, weight
      if spec['format'] not in FORMATS:
        check_choice(f'data.{key}[{i}].format', spec['format'], FORMATS)


def check_batch_layout(batch_size: int, grad_accum_steps: int, mesh: Any,
                       max_seq_len: int | None = None) -> None:
  """Each micro-batch's rows (`batch_size / grad_accum_steps`) split evenly over the data x
  fsdp devices of `mesh`, and each row (`max_seq_len` tokens) into two chunks per device of
  its `context` axis (cross-part rules: the batch, the data and the mesh)."""
  rows_axes = mesh.shape['data'] * mesh.shape['fsdp']
  if (batch_size // grad_accum_steps) % rows_axes:
    raise UserError(f'each micro-batch has {batch_size // grad_accum_steps} rows, which the '
                    f'{rows_axes} devices of the data x fsdp mesh axes cannot split evenly; '
                    'make batch_size / grad_accum_steps a multiple of that.')
  context = mesh.shape.get('context', 1)
  if max_seq_len is not None and context > 1 and max_seq_len % (2 * context):
    multiple = 2 * context
    raise UserError(f'data.max_seq_len={max_seq_len}: context parallelism over {context} '
                    f'devices splits each row into {multiple} equal chunks; set '
                    f'--config.data.max_seq_len={max_seq_len // multiple * multiple or multiple}'
                    f' (a multiple of {multiple}).')


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, where: str) -> None:
  """Refuses a tokenizer that cannot be the model's: more ids than embedding rows (they would
  read garbage, NaN on some backends, not fail), or a vocabulary far smaller than the model's
  (a folder that loaded without its model files)."""
  size = len(tokenizer)
  if size > vocab_size:
    raise UserError(f'the tokenizer at {where} has {size} tokens but the model\'s vocabulary '
                    f'is {vocab_size}; use the tokenizer saved with the model, or resize the '
                    'model\'s embeddings (added special tokens need rows too).')
  if size < vocab_size // 2:
    raise UserError(f'the tokenizer at {where} has {size} tokens but the model\'s vocabulary is '
                    f'{vocab_size}: it cannot be this model\'s tokenizer (is its tokenizer.json '
                    'or tokenizer.model missing?); point data.tokenizer at the model\'s '
                    'tokenizer.')
