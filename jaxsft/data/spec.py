"""One entry of `data.datasets` / `data.eval_datasets`: its keys, their defaults, and the
check that fills an entry in (unknown keys, and `columns` keys its format does not read, are
errors). An entry naming a LLaMA-Factory `dataset_info.json` becomes the entry it describes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxsft.data.dataset_info import dataset_info_entry
from jaxsft.data.formats import FORMATS, check_columns
from jaxsft.errors import UserError, did_you_mean

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
    # A LLaMA-Factory dataset_info.json; `name` then names a dataset in it, whose description
    # gives path, format and columns (jaxsft.data.dataset_info).
    'dataset_info': '',
}


def dataset_spec(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
  """Fills one `data.datasets` entry with defaults; unknown keys are errors."""
  if isinstance(entry, str):
    entry = {'path': entry}
  entry = dict(entry)
  unknown = sorted(set(entry) - set(DATASET_DEFAULTS))
  if unknown:
    hint = did_you_mean(unknown[0], list(DATASET_DEFAULTS))
    raise UserError(f'{where}: unknown keys {unknown}.{hint} Known: {sorted(DATASET_DEFAULTS)}.')
  if entry.get('dataset_info'):
    entry = dataset_info_entry(entry, where)
  spec = {**DATASET_DEFAULTS, **entry}
  if spec['format'] not in FORMATS:
    raise UserError(f'{where}: unknown format {spec["format"]!r}; choose one of {FORMATS}.')
  if not hasattr(spec['columns'], 'items'):  # a dict, or a ConfigDict from a config file
    raise UserError(f'{where}: "columns" must be an object of field renames, got '
                    f'{spec["columns"]!r}.')
  check_columns(spec['format'], spec['columns'], where)
  if not spec['path']:
    raise UserError(f'{where}: "path" is required (a file, folder or hub dataset name).')
  if not spec['weight'] > 0:
    raise UserError(f'{where}: weight must be > 0, got {spec["weight"]}.')
  return spec
