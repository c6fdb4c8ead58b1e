"""Checks of a run config's values, before anything is read, built or compiled.

`check_config(config)` raises `UserError` with the setting, its value and the fix for the first
value that cannot work (a negative learning rate, a batch of 0 rows, a LoRA rank of 0, a mesh
shape that is not three sizes...). The trainer and `jaxsft plan` call it first, so a typo costs
seconds, not a compile.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from jaxsft.adapters.quant import KINDS as QUANT_KINDS
from jaxsft.adapters.targets import target_matcher
from jaxsft.data.clean import CleanSettings
from jaxsft.data.formats import FORMATS
from jaxsft.data.packing import OVERLONG_POLICIES, STRATEGIES
from jaxsft.data.sources import BAD_RECORD_POLICIES
from jaxsft.data.spec import dataset_spec
from jaxsft.data.templates import TRAIN_ON, check_train_on, template_kind
from jaxsft.errors import UserError
from jaxsft.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from jaxsft.parallel.mesh import check_mesh_shape
from jaxsft.train.optim import SCHEDULES

DTYPES = ('float32', 'bfloat16', 'float16')


def _fail(key: str, value: Any, need: str) -> None:
  raise UserError(f'config {key}={value!r}: {need}; set it with --config.{key}=... or in the '
                  'config file.')


def _number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, integer: bool = False) -> None:
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
    _fail(key, value, f'must be a finite {"integer" if integer else "number"}')
  if low is not None and (value <= low if low_open else value < low):
    _fail(key, value, f'must be {">" if low_open else ">="} {low:g}')
  if high is not None and value > high:
    _fail(key, value, f'must be <= {high:g}')


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    _fail(key, value, f'choose one of {list(choices)}')


def check_config(config: Any) -> None:
  """Raises `UserError` for the first setting of `config` whose value cannot work."""
  _number('batch_size', config.batch_size, low=1, integer=True)
  t = config.train
  _number('train.grad_accum_steps', t.grad_accum_steps, low=1, integer=True)
  if config.batch_size % t.grad_accum_steps:
    _fail('train.grad_accum_steps', t.grad_accum_steps,
          f'must divide batch_size={config.batch_size} (each micro-batch is batch_size / '
          'grad_accum_steps rows)')
  _number('train.num_steps', t.num_steps, low=0, integer=True)
  if t.num_steps == 0:
    _number('train.num_epochs', t.num_epochs, low=0, low_open=True)
  _number('train.log_every', t.log_every, low=1, integer=True)
  _number('train.eval_every', t.eval_every, low=0, integer=True)
  _number('train.sample_every', t.sample_every, low=0, integer=True)
  _number('train.neftune_alpha', t.neftune_alpha, low=0)
  _number('train.loss_chunk_size', t.loss_chunk_size, low=0, integer=True)

  o = config.optim
  _number('optim.learning_rate', o.learning_rate, low=0)
  _choice('optim.schedule', o.schedule, SCHEDULES)
  _number('optim.warmup_ratio', o.warmup_ratio, low=0, high=1)
  _number('optim.warmup_steps', o.warmup_steps, low=-1, integer=True)
  _number('optim.min_lr_ratio', o.min_lr_ratio, low=0, high=1)
  _number('optim.b1', o.b1, low=0, high=1)
  _number('optim.b2', o.b2, low=0, high=1)
  _number('optim.eps', o.eps, low=0)
  _number('optim.weight_decay', o.weight_decay, low=0)
  _number('optim.max_grad_norm', o.max_grad_norm, low=0)

  m = config.model
  _choice('model.dtype', m.dtype, DTYPES)
  _choice('model.param_dtype', m.param_dtype, DTYPES)
  _choice('model.remat_policy', m.remat_policy, REMAT_POLICIES)
  _choice('model.attention_implementation', m.attention_implementation,
          ATTENTION_IMPLEMENTATIONS)

  lora = config.lora
  if lora.enabled:
    _number('lora.rank', lora.rank, low=1, integer=True)
    _number('lora.alpha', lora.alpha, low=0, low_open=True)
    _number('lora.dropout', lora.dropout, low=0, high=1)
    if lora.dropout >= 1:
      _fail('lora.dropout', lora.dropout, 'must be below 1 (1 drops every input)')
    target_matcher(list(lora.targets), 'lora.targets')  # empty lists, bad regexes
  if check_quant_config(config):
    _number('quant.block_size', config.quant.block_size, low=1, integer=True)
    target_matcher(list(config.quant.targets), 'quant.targets')

  c = config.checkpoint
  _number('checkpoint.save_every', c.save_every, low=0, integer=True)
  _number('checkpoint.keep', c.keep, low=1, integer=True)

  check_mesh_shape(config.mesh.shape)

  d = config.data
  _number('data.max_seq_len', d.max_seq_len, low=2, integer=True)
  _choice('data.overlong', d.overlong, OVERLONG_POLICIES)
  _choice('data.packing', d.packing, STRATEGIES)
  _choice('data.on_bad_record', d.on_bad_record, BAD_RECORD_POLICIES)
  _choice('data.train_on', d.train_on, TRAIN_ON)
  check_train_on(d.train_on, d.train_on_reasoning)  # the combination
  _number('data.eval_size', d.eval_size, low=0)
  _number('data.num_proc', d.num_proc, low=1, integer=True)
  _number('data.map_batch_size', d.map_batch_size, low=1, integer=True)
  _number('data.pack_window', d.pack_window, low=1, integer=True)
  CleanSettings.from_config(d.clean)  # data.clean.*: thresholds, sizes, the against list
  template_kind(d.template)
  for key in ('datasets', 'eval_datasets'):
    for i, entry in enumerate(d[key]):
      spec = dataset_spec(entry, f'data.{key}[{i}]')  # unknown keys, path, weight
      if spec['format'] not in FORMATS:
        _fail(f'data.{key}[{i}].format', spec['format'], f'choose one of {list(FORMATS)}')
  if d.streaming and t.num_steps <= 0:
    _fail('train.num_steps', t.num_steps, 'must be > 0 with data.streaming=True (a stream has '
          'no length, so num_epochs cannot end it)')


def check_quant_config(config: Any) -> bool:
  """Whether the run quantizes its base weights; QLoRA needs LoRA (4-bit weights are frozen)."""
  if config.quant.kind == 'none':
    return False
  if config.quant.kind not in QUANT_KINDS:
    raise UserError(f'quant.kind={config.quant.kind!r}; choose none or one of {QUANT_KINDS}.')
  if not config.lora.enabled:
    raise UserError(f'quant.kind={config.quant.kind!r} freezes the base weights in 4 bits, so '
                    'only LoRA adapters can train; set lora.enabled=True (QLoRA).')
  return True


def check_batch_layout(config: Any, mesh: Any) -> None:
  """Each micro-batch's rows split evenly over the data x fsdp devices (that `grad_accum_steps`
  divides `batch_size` is `check_config`'s rule)."""
  rows_axes = mesh.shape['data'] * mesh.shape['fsdp']
  accum = config.train.grad_accum_steps
  if (config.batch_size // accum) % rows_axes:
    raise UserError(f'each micro-batch has {config.batch_size // accum} rows, which the '
                    f'{rows_axes} devices of the data x fsdp mesh axes cannot split evenly; '
                    'make batch_size / grad_accum_steps a multiple of that.')


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
