"""Run configuration: one locked `ml_collections.ConfigDict` that holds every default.

A config file is Python with `get_config(arg: str | None = None)` that starts from
`default_config()` and overrides what it needs (the big_vision style). The command line adds
`--set key=value` overrides (`--set data.max_seq_len=1024`). The config is locked, so a
misspelled key is an error, never a silently ignored setting; the entries of `data.datasets`
are dicts checked against `DATASET_DEFAULTS` the same way.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

# One entry of `data.datasets` / `data.eval_datasets`. `path`: a local json/jsonl/parquet/arrow/
# csv file, a folder of them (or one written by `Dataset.save_to_disk`), or a hub dataset name.
DATASET_DEFAULTS: dict[str, Any] = {
    'path': '',
    'name': None,         # hub config (subset) name
    'split': 'train',
    'data_files': None,   # for hub/folder datasets: a glob or list of files inside
    'format': 'auto',     # auto | alpaca | sharegpt | messages | prompt_completion | text
    'columns': {},        # field renames, e.g. {'instruction': 'question', 'output': 'answer'}
    'weight': 1.0,        # sampling weight in the training mixture
}


def default_config() -> ml_collections.ConfigDict:
  """Every setting with its default, locked; `get_config` functions start here."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({
      'path': '',  # HF checkpoint folder or hub id
  })
  config.data = ml_collections.ConfigDict({
      'datasets': [],        # list of DATASET_DEFAULTS-shaped dicts (the training mixture)
      'eval_datasets': [],   # separate eval sources; else `eval_size` is held out of `datasets`
      'eval_size': 0.0,      # held out of each training source: < 1 a fraction, >= 1 a count
      'tokenizer': '',       # '' = the tokenizer saved with model.path
      'template': 'llama2',  # llama2 | llama3 | chatml | mistral | alpaca | jinja | a .jinja path
      'train_on': 'assistant',  # assistant | last | all
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
  })
  config.batch_size = 8      # packed rows per global batch
  config.lock()  # get_config functions may change settings, never invent them
  return config


def dataset_spec(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
  """Fills one `data.datasets` entry with defaults; unknown keys are errors."""
  if isinstance(entry, str):
    entry = {'path': entry}
  entry = dict(entry)
  unknown = sorted(set(entry) - set(DATASET_DEFAULTS))
  if unknown:
    raise ValueError(f'{where}: unknown keys {unknown}; known: {sorted(DATASET_DEFAULTS)}.')
  spec = {**DATASET_DEFAULTS, **entry}
  if not spec['path']:
    raise ValueError(f'{where}: "path" is required (a file, folder or hub dataset name).')
  if not spec['weight'] > 0:
    raise ValueError(f'{where}: weight must be > 0, got {spec["weight"]}.')
  return spec


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Runs `get_config` of a config file (`file.py` or `file.py:arg`) and applies overrides."""
  path, _, arg = path.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist.')
  spec = importlib.util.spec_from_file_location(f'_jaxsft_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path} must define get_config(arg=None).')
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  for override in overrides:
    apply_override(config, override)
  return config


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """`key.sub=value`; the value is a Python literal, or a plain string when it is not one."""
  key, sep, text = override.partition('=')
  if not sep:
    raise ValueError(f'override {override!r} must look like key=value (e.g. data.seed=1).')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if part not in node:
      raise KeyError(f'override {override!r}: no config section {".".join(parents[:i + 1])!r}.')
    node = node[part]
  if leaf not in node:
    raise KeyError(f'override {override!r}: unknown key {key!r}; known in this section: '
                   f'{sorted(node.keys())}.')
  if isinstance(node[leaf], float) and isinstance(value, int):
    value = float(value)
  node[leaf] = value
