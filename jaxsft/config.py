"""Run configuration: one locked `ml_collections.ConfigDict` that holds every default.

A config file is Python with `get_config(arg: str | None = None)` that starts from
`default_config()` and overrides what it needs (the big_vision style). The command line adds
`--config.key=value` overrides (`--config.data.max_seq_len=1024`, applied by
`apply_override`). The config is locked, so a misspelled key is an error, never a silently
ignored setting; the entries of `data.datasets` are dicts checked against
`jaxsft.data.spec.DATASET_DEFAULTS` the same way.

Only the CLI reads this module: the trainer, the data pipeline and the evaluators take a config
and never know the defaults.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import traceback
from collections.abc import Sequence
from typing import Any

import ml_collections

from jaxsft.adapters.targets import DEFAULT_TARGETS
from jaxsft.errors import UserError, did_you_mean
from jaxsft.train.loss import DEFAULT_CHUNK_SIZE


def default_config() -> ml_collections.ConfigDict:
  """Every setting with its default, locked; `get_config` functions start here."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({
      'path': '',            # HF checkpoint folder or hub id; '' = build from `preset`/`architecture`
      'preset': '',          # jaxsft.interop.presets name; the architecture without weights (random init)
      'architecture': {},    # LlamaConfig fields for a random-init model (e.g. the demo's)
      'dtype': 'bfloat16',   # compute dtype of activations and matmuls
      'param_dtype': 'float32',  # master weights (LoRA: the frozen base's); bfloat16 = pure
      'scan_layers': True,
      'remat_policy': 'none',  # none | full | save_dots | save_dots_with_batch | save_attention_out
      'attention_implementation': 'auto',  # auto | blocked | xla | cudnn | splash
      'mlp_chunk_size': 0,   # tokens per MLP chunk on each device (long rows); 0 = whole row
      'moe_exchange': 'weights',  # MoE over fsdp: weights (gathered per layer) | tokens (sent)
      # Mixture of experts: the load-balancing loss's weight in the training loss; -1 = the
      # checkpoint's router_aux_loss_coef (0.001 for Qwen3-MoE and Mixtral); 0 = log it only.
      'router_aux_loss_coef': -1.0,
  })
  config.lora = ml_collections.ConfigDict({
      'enabled': False,      # False = full fine-tuning
      'rank': 16,
      'alpha': 32.0,
      'dropout': 0.05,
      'targets': list(DEFAULT_TARGETS),
      'rslora': False,       # scale alpha / sqrt(rank) instead of alpha / rank
      'dora': False,         # DoRA (PEFT's use_dora): a learned magnitude per output feature
      'init_from': '',       # a PEFT adapter folder to start from (same rank and targets)
      # Norms trained whole (PEFT's modules_to_save), e.g. ['q_norm', 'k_norm'] (Qwen3).
      'modules_to_save': [],
  })
  config.quant = ml_collections.ConfigDict({
      'kind': 'none',        # none | nf4 | int4: 4-bit frozen base weights (QLoRA; needs LoRA)
      'block_size': 64,      # inputs per absmax block
      'double_quant': True,  # 8-bit absmax values (blocks of 256), as bitsandbytes
      'double_quant_rounding': 'min_error',  # min_error (never worse than bnb) | nearest
      'targets': list(DEFAULT_TARGETS),
  })
  config.optim = ml_collections.ConfigDict({
      'learning_rate': 2e-5,
      'schedule': 'cosine',  # constant | linear | cosine (after warmup)
      'warmup_steps': -1,    # >= 0 overrides warmup_ratio
      'warmup_ratio': 0.03,
      'min_lr_ratio': 0.0,   # the schedule ends at learning_rate * min_lr_ratio
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
      'weight_decay': 0.0,   # AdamW; never on norms, biases and DoRA magnitudes
      'max_grad_norm': 1.0,  # global-norm clipping; 0 = off
  })
  config.train = ml_collections.ConfigDict({
      'num_steps': 0,        # > 0: train this many steps; else num_epochs over the data
      'num_epochs': 1.0,
      'grad_accum_steps': 1,  # micro-batches per step (batch_size rows split evenly)
      'neftune_alpha': 0.0,  # NEFTune noise on input embeddings; 0 = off (5 is the paper's)
      # Positions per row whose logits exist at once in the fused LM head + loss; only chunks
      # holding supervised tokens are computed. 0 = whole [B, T, V] logits (the reference).
      'loss_chunk_size': DEFAULT_CHUNK_SIZE,
      'seed': 0,             # model init, LoRA init, dropout, NEFTune
      'log_every': 10,       # steps between log lines
      'eval_every': 0,       # steps between eval-loss passes; 0 = only at the end
      # Trackers fed each logged step: 'tensorboard', 'wandb', 'mlflow' (extras of those
      # names; where each writes: jaxsft/train/trackers.py). [] = metrics.jsonl only.
      'report_to': ['tensorboard'],
      'run_name': '',        # the trackers' run name; '' = the work directory's name
      'sample_prompts': [],  # user prompts answered greedily every sample_every steps, logged
      'sample_every': 0,     # 0 = never
      'sample_max_new_tokens': 64,
      'progress_bar': True,
  })
  config.checkpoint = ml_collections.ConfigDict({
      'save_every': 0,       # steps between checkpoints; 0 = only at the end (and on SIGTERM)
      'keep': 3,             # the newest checkpoints kept
      'async_save': True,    # write in the background while training continues
      'resume': True,        # continue from the newest checkpoint in the work directory
  })
  config.distributed = ml_collections.ConfigDict({
      'coordinator_address': '',  # host:port of process 0; '' = auto (TPU pods, SLURM, env)
      'num_processes': 0,    # with coordinator_address
      'process_id': -1,      # with coordinator_address
  })
  config.mesh = ml_collections.ConfigDict({
      'shape': (-1, 1, 1, 1),  # ('data', 'fsdp', 'context', 'tensor'); -1 = the remaining
                               # devices; three sizes = (data, fsdp, tensor) with context 1
      'rules': (),           # extra (logical name, mesh axes) pairs that override the defaults
  })
  config.demo = ml_collections.ConfigDict({
      'enabled': False,      # configs/demo.py: synthetic tasks, a tokenizer and a model from scratch
      'num_train': 4000,
      'num_eval': 200,
      'show_examples': 4,
  })
  config.data = ml_collections.ConfigDict({
      'datasets': [],        # list of jaxsft.data.spec.DATASET_DEFAULTS-shaped dicts (the training mixture)
      'eval_datasets': [],   # separate eval sources; else `eval_size` is held out of `datasets`
      'eval_size': 0.0,      # held out of each training source: < 1 a fraction, >= 1 a count
      'tokenizer': '',       # '' = the tokenizer saved with model.path
      'template': 'llama2',  # llama2 | llama3 | chatml | qwen3 | mistral | alpaca | jinja | .jinja path
      'train_on': 'assistant',  # assistant | last | all; a message's loss_weight 0 masks its turn
      'train_on_reasoning': True,  # False: think blocks of trained turns are not supervised
      'max_seq_len': 2048,   # tokens per packed row
      'overlong': 'truncate',   # truncate | drop: examples longer than max_seq_len + 1 tokens
      'packing': 'bfd',      # bfd | greedy | none
      'on_bad_record': 'error',  # error | skip (skips are counted and logged)
      'seed': 0,             # shuffling and mixture sampling
      'streaming': False,    # read sources lazily (corpora larger than memory or disk cache)
      'pack_window': 16384,  # streaming: examples packed together (and shuffled) per window
      'num_proc': 1,         # tokenization worker processes (datasets.map)
      'map_batch_size': 1000,   # records per tokenizer call
      'cache_dir': '',       # datasets cache; '' = the HF default
      # What `jaxsft data clean` removes (jaxsft.data.clean); `enabled` does it on the fly.
      'clean': ml_collections.ConfigDict({
          'enabled': False,       # clean data.datasets before tokenizing, in every run
          'exact_dedup': True,    # equal text, ignoring case, whitespace and punctuation
          'near_dedup': True,     # MinHash LSH over word shingles (datasketch)
          'near_threshold': 0.7,  # estimated Jaccard similarity of the shingle sets
          'shingle_words': 2,     # words per shingle
          'num_perm': 128,        # MinHash permutations
          'seed': 1,              # of the MinHash permutations
          'degenerate': True,     # empty answers, one short unit repeated ('!!!!!!!!')
          'against': [],          # evaluation files (json/jsonl/parquet) to decontaminate against
          'ngram': 13,            # words of an overlap that marks contamination (GPT-3)
      }),
  })
  config.batch_size = 8      # packed rows per global batch
  config.lock()  # get_config functions may change settings, never invent them
  return config


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Runs `get_config` of a config file (`file.py` or `file.py:arg`), checks that each setting
  keeps the type of its default (`check_types`), locks the result and applies `key.sub=value`
  overrides (`apply_override`).

  Whatever goes wrong in the file (a syntax error, an exception in `get_config`, a missing
  import, a value of the wrong type, a result that is not a `ConfigDict`) is a `UserError` of one
  line naming the file and the line.
  """
  path, _, arg = path.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'config file {path!r} does not exist; pass a Python file with '
                    'get_config(), e.g. --config configs/demo.py.')
  spec = importlib.util.spec_from_file_location(f'_jaxsft_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as error:  # the file is the user's code: anything it raises is theirs to fix
    raise _config_file_error(path, error) from error
  if not callable(getattr(module, 'get_config', None)):
    raise UserError(f'config file {path} must define get_config(arg=None).')
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as error:
    raise _config_file_error(path, error) from error
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f'config file {path}: get_config() returned {_short(config)} (a '
                    f'{type(config).__name__}), not an ml_collections.ConfigDict; start from '
                    'config = jaxsft.config.default_config(), change settings and return config.')
  check_types(config, path)
  config.lock()
  for override in overrides:
    apply_override(config, override)
  return config


def _short(value: Any, limit: int = 80) -> str:
  """`repr(value)` on one line, cut to `limit` characters."""
  text = ' '.join(repr(value).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


# ml_collections' message for a value whose type is not the field's (a locked config is typed).
_OVERRIDE_TYPE = re.compile(r"Could not override field '([^']+)' \(reference\)\. (.*) is of "
                            r"original type <class '([^']+)'> and cannot be casted to type "
                            r"<class '([^']+)'>", re.DOTALL)


def _config_file_error(path: str, error: Exception) -> UserError:
  """One line for an exception a config file raised: the file, its line, what went wrong."""
  def same_file(name: str | None) -> bool:
    return bool(name) and os.path.abspath(name) == os.path.abspath(path)

  line = next((frame.lineno for frame in reversed(traceback.extract_tb(error.__traceback__))
               if same_file(frame.filename)), None)
  text = ' '.join(str(error).split())
  if isinstance(error, SyntaxError) and same_file(error.filename):
    line, text = error.lineno, error.msg  # the line is the error's own, not a frame's
  where = f'config file {path}, line {line}' if line else f'config file {path}'
  if isinstance(error, UserError):  # from a jaxsft helper the file called: already one line
    return UserError(f'{where}: {text}')
  if isinstance(error, (AttributeError, KeyError)):  # a setting the locked defaults do not have
    key = re.search(r'Key "([^"]+)" does not exist', text)
    if key:
      suggestion = re.search(r'Did you mean "([^"]+)"', text)
      hint = f' Did you mean {suggestion.group(1)!r}?' if suggestion else ''
      return UserError(f'{where}: unknown setting {key.group(1)!r}.{hint} Every setting is '
                       'listed in jaxsft/config.py; a config may change settings, not invent '
                       'them.')
  mismatch = _OVERRIDE_TYPE.search(str(error)) if isinstance(error, TypeError) else None
  if mismatch:
    field, value, got, want = mismatch.groups()
    want, got = want.rsplit('.', 1)[-1], got.rsplit('.', 1)[-1]
    shown = ' '.join(value.split())[:80]  # ml_collections writes the value with str()
    shown = repr(shown) if got == 'str' else shown
    return UserError(f'{where}: {field} takes {_TAKES_BY_NAME.get(want, want)}, not {shown} '
                     f'(a {got}); each setting keeps the type of its default in '
                     'jaxsft/config.py.')
  return UserError(f'{where}: {type(error).__name__}: {text}; fix the config file (--debug '
                   'shows the traceback).')


# What a setting takes, by the type of its default.
_TAKES = {bool: 'True or False', int: 'an integer', float: 'a number', str: 'a string',
          list: 'a list', tuple: 'a tuple or list', ml_collections.ConfigDict: 'a dict'}
_TAKES_BY_NAME = {kind.__name__: takes for kind, takes in _TAKES.items()}
_ITEMS = {bool: 'True or False values', int: 'integers', float: 'numbers', str: 'strings'}


def _type_problem(value: Any, default: Any) -> str | None:
  """What a setting whose default is `default` takes, when `value` is not that; else None.
  An integer is a number (`learning_rate = 1`); `None` is never a value."""
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif isinstance(default, str):
    ok = isinstance(value, str)
  elif isinstance(default, (list, tuple)):
    ok = isinstance(value, (list, tuple))
    if ok and default and any(_type_problem(x, default[0]) for x in value):
      # A non-empty default gives the type of the items too (lora.targets, mesh.shape).
      return f'{_TAKES[type(default)]} of {_ITEMS.get(type(default[0]), "values")}'
  elif isinstance(default, (dict, ml_collections.ConfigDict)):
    ok = isinstance(value, (dict, ml_collections.ConfigDict))
  else:
    return None
  return None if ok else _TAKES.get(type(default), type(default).__name__)


def _default_value(key: str, fallback: Any) -> Any:
  """The value of setting `key` (`a.b`) in `default_config()`, or `fallback` when the defaults
  have no such setting."""
  node: Any = default_config()
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return fallback
    node = node[part]
  return node


def _assignment_line(path: str, name: str) -> int | None:
  """The first line of the config file at `path` that assigns setting `name` (`a.b = ...`)."""
  pattern = re.compile(rf'\b{re.escape(name)}\s*=[^=]')
  with open(path, encoding='utf-8', errors='replace') as f:
    return next((i for i, line in enumerate(f, 1) if pattern.search(line)), None)


def check_types(config: ml_collections.ConfigDict, path: str | None = None, *,
                defaults: ml_collections.ConfigDict | None = None, prefix: str = '') -> None:
  """Raises `UserError` for the first setting of `config` whose value is not of its default's
  type in `default_config()` (ints, floats, bools, strings, lists), or that the defaults do not
  have or that `config` lacks; the message names the config file `path` and the line that
  assigns the setting when it finds one.

  ml_collections refuses most wrong types when they are assigned to the locked defaults, but
  not `None`, not a section replaced by a dict, and not a `ConfigDict` built from scratch; a
  value of the wrong type would otherwise fail later, deep in the run.
  """
  defaults = default_config() if defaults is None else defaults

  def where(name: str) -> str:
    """The file, and the line assigning `name` or the section holding it, if any does."""
    if not path:
      return 'config'
    parts = name.split('.')
    lines = (_assignment_line(path, '.'.join(parts[:n])) for n in range(len(parts), 0, -1))
    line = next((line for line in lines if line), None)
    return f'config file {path}, line {line}' if line else f'config file {path}'

  for key in config.keys():
    if key not in defaults:
      raise UserError(f'{where(prefix + key)}: unknown setting {prefix + key!r}.'
                      f'{did_you_mean(prefix + key, _all_keys(default_config()))} Every setting '
                      'is listed in jaxsft/config.py; a config may change settings, not invent '
                      'them.')
  for key, default in defaults.items():
    name = prefix + key
    if key not in config:
      raise UserError(f'{where(name)}: the config lacks the setting {name!r}; start from '
                      'jaxsft.config.default_config() and set settings one by one (assigning a '
                      'dict to a section such as data.clean replaces all of it).')
    value = config[key]
    if isinstance(default, ml_collections.ConfigDict) and default.keys():  # a section
      if not isinstance(value, ml_collections.ConfigDict):
        raise UserError(f'{where(name)}: {name}={_short(value)} replaces a section of '
                        f'settings; set them one by one, e.g. '
                        f'{name}.{next(iter(default.keys()))}=...')
      check_types(value, path, defaults=default, prefix=f'{name}.')
      continue
    takes = _type_problem(value, default)
    if takes:
      kind = 'None' if value is None else f'a {type(value).__name__} ({_short(value)})'
      raise UserError(f'{where(name)}: {name} is {kind}, but {name} takes '
                      f'{takes} (its default is {_short(default)}); each setting keeps the '
                      'type of its default in jaxsft/config.py.')


def _all_keys(node: Any, prefix: str = '') -> list[str]:
  keys = []
  for name, value in node.items():
    keys.append(prefix + name)
    if isinstance(value, ml_collections.ConfigDict):
      keys += _all_keys(value, f'{prefix}{name}.')
  return keys


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """`key.sub=value`; the value is a Python literal, or a plain string when it is not one.

  Raises `UserError` naming the closest valid key for an unknown one, and the expected type for
  a value of the wrong type.
  """
  key, sep, text = override.partition('=')
  if not sep:
    raise UserError(f'override {override!r} must look like key=value (e.g. data.seed=1).')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      section = '.'.join(parents[:i + 1])
      raise UserError(f'--config.{key}: there is no config section {section!r}.'
                      f'{did_you_mean(key, _all_keys(config))} Every setting is listed in '
                      'jaxsft/config.py.')
    node = node[part]
  if leaf not in node:
    raise UserError(f'--config.{key}: unknown key.{did_you_mean(key, _all_keys(config))} Every '
                    'setting is listed in jaxsft/config.py.')
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict) and current.keys():
    raise UserError(f'--config.{key}: {key} is a section of settings; set them one by one, '
                    f'e.g. --config.{key}.{next(iter(current.keys()))}=...')
  if isinstance(current, bool) and isinstance(value, str) and value.lower() in ('true', 'false'):
    value = value.lower() == 'true'
  elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  elif isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  elif isinstance(current, list) and isinstance(value, tuple):
    value = list(value)
  # The type is the default's (a config file may have filled a list the default leaves empty:
  # data.datasets of dicts still takes a list of paths).
  takes = _type_problem(value, _default_value(key, current))
  if takes is None:  # checked first: ml_collections takes None, and a bool for a float
    try:
      node[leaf] = value
      return
    except (TypeError, ValueError):
      pass
  example = {list: "a list, e.g. \"['a', 'b']\"", tuple: 'a tuple, e.g. "(1, -1, 1)"',
             bool: 'True or False'}.get(type(current), type(current).__name__)
  if takes and ' of ' in takes:  # the items are wrong (lora.targets=['q_proj', 1])
    example = takes
  got = 'None' if value is None else f'{type(value).__name__} {_short(value)}'
  raise UserError(f'--config.{key}={text}: expected {example}, got {got}; each setting keeps '
                  'the type of its default in jaxsft/config.py.')
