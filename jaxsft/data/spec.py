"""One entry of `data.datasets` / `data.eval_datasets`: its keys, their defaults, and the
check that fills an entry in (unknown keys are errors)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
  spec = {**DATASET_DEFAULTS, **entry}
  if not spec['path']:
    raise UserError(f'{where}: "path" is required (a file, folder or hub dataset name).')
  if not spec['weight'] > 0:
    raise UserError(f'{where}: weight must be > 0, got {spec["weight"]}.')
  return spec
