"""Cleaning whole sources: `jaxsft data clean` (files in, files out) and `data.clean.enabled`
(a run's sources filtered before tokenization). The decisions are `jaxsft.data.clean`'s.

`clean_files` writes into its output folder:

* each source's kept records in the source's own format: a JSON list stays a JSON list (read as a
  stream, one item at a time), JSON lines stay JSON lines, parquet stays parquet (same schema);
  sources `datasets` reads otherwise (csv, arrow, folders, hub names) are written as JSON lines;
* `removed.jsonl`: one row per removed record: `source`, `index` (in that source), `reason`, and
  `duplicate_of` {source, index} (+ `similarity` for near duplicates), `eval` {file, index,
  ngram} for contamination, or `detail`;
* `clean_summary.json`: counts per reason (all sources and each), the settings, the evaluation
  sources and `datasets`: the config entries that train on the cleaned files.

`jaxsft data inspect` shows that summary when a source's folder holds one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np

from jaxsft.data.clean import REASONS, Cleaner, CleanSettings, summary_line
from jaxsft.data.contamination import EvalItem, read_eval_file
from jaxsft.data.formats import detect_format
from jaxsft.data.messages import BadRecord
from jaxsft.data.sources import load_source, source_format
from jaxsft.data.spec import DATASET_DEFAULTS
from jaxsft.errors import UserError

SUMMARY_FILE = 'clean_summary.json'
REMOVED_FILE = 'removed.jsonl'
_READ_SIZE = 1 << 20


def _json_list(path: str) -> Iterator[Any]:
  """The items of a JSON list file, one at a time (memory: one item and a read buffer)."""
  decoder = json.JSONDecoder()
  with open(path, encoding='utf-8') as f:
    buffer, position, done_lines, eof = '', 0, 0, False
    expect = '['  # then 'first' (an item or ']'), 'next' (',' or ']'), 'value' (an item)

    def fill() -> bool:
      nonlocal buffer, position, done_lines, eof
      more = f.read(_READ_SIZE)
      eof = not more
      done_lines += buffer.count('\n', 0, position)
      buffer, position = buffer[position:] + more, 0
      return bool(more)

    def error(what: str) -> UserError:
      line = done_lines + buffer.count('\n', 0, position) + 1
      return UserError(f'dataset file {path}, line {line}: invalid JSON list ({what}); fix that '
                       'line.')

    while True:
      while position < len(buffer) and buffer[position].isspace():
        position += 1
      if position == len(buffer):
        if fill():
          continue
        raise error('the file ends before the closing "]"')
      char = buffer[position]
      if expect == '[':
        if char != '[':
          raise error(f'expected "[", found {char!r}')
        position, expect = position + 1, 'first'
      elif expect == 'next' or (expect == 'first' and char == ']'):
        if char == ']':
          return
        if char != ',':
          raise error(f'expected "," or "]" after an item, found {char!r}')
        position, expect = position + 1, 'value'
      else:
        try:
          value, end = decoder.raw_decode(buffer, position)
        except json.JSONDecodeError as decode_error:
          if not eof and fill():
            continue
          raise error(decode_error.msg) from None
        if end == len(buffer) and not eof and fill():
          continue  # a number or literal may go on in the next read
        yield value
        position, expect = end, 'next'


def _json_lines(path: str) -> Iterator[Any]:
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError as error:
          raise UserError(f'dataset file {path}, line {number}: invalid JSON ({error.msg} at '
                          f'column {error.colno}); each line of a JSON lines file must be one '
                          'JSON object. Fix or remove that line.') from None


def _parquet(path: str) -> Iterator[Any]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
    yield from batch.to_pylist()


def _file_kind(path: str) -> str | None:
  """'json_list' | 'jsonl' | 'parquet' for a local file jaxsft rewrites in its own format."""
  if not os.path.isfile(path):
    return None
  extension = os.path.splitext(path)[1].lower()
  if extension == '.parquet':
    return 'parquet'
  if extension not in ('.json', '.jsonl'):
    return None
  with open(path, encoding='utf-8') as f:
    while chunk := f.read(4096):
      stripped = chunk.lstrip()
      if stripped:
        return 'json_list' if stripped[0] == '[' else 'jsonl'
  raise UserError(f'dataset file {path} is empty; it needs at least one record.')


class _Writer:
  """Kept records in a source's own format, written to `path + '.partial'` and renamed when
  complete (an interrupted clean leaves no half file under the final name)."""

  def __init__(self, kind: str, path: str, source: str):
    self.kind, self.path, self.partial = kind, path, path + '.partial'
    self.count, self.rows = 0, []
    self.schema = None
    if kind == 'parquet':
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
      self.schema = pq.read_schema(source)
      self.parquet = pq.ParquetWriter(self.partial, self.schema)
    else:
      self.file = open(self.partial, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
      if kind == 'json_list':
        self.file.write('[')

  def write(self, record: Any) -> None:
    if self.kind == 'parquet':
      self.rows.append(record)
      if len(self.rows) == 1024:
        self._flush()
    else:
      text = json.dumps(record, ensure_ascii=False)
      if self.kind == 'json_list':
        self.file.write(('\n' if not self.count else ',\n') + text)
      else:
        self.file.write(text + '\n')
    self.count += 1

  def _flush(self) -> None:
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    if self.rows:
      self.parquet.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
      self.rows = []

  def close(self, complete: bool) -> None:
    if self.kind == 'parquet':
      self._flush()
      self.parquet.close()
    else:
      if self.kind == 'json_list':
        self.file.write('\n]\n')
      self.file.close()
    if complete:
      os.replace(self.partial, self.path)
    else:
      os.remove(self.partial)


def _output_names(specs: Sequence[Mapping[str, Any]]) -> list[str]:
  names = []
  for spec in specs:
    path = os.path.expanduser(spec['path'])
    kind = _file_kind(path)
    if kind is None and os.path.exists(path):  # a csv or arrow file, a folder
      name = os.path.splitext(os.path.basename(path.rstrip('/')))[0] + '.jsonl'
    elif kind is None:  # a hub dataset: its name
      name = re.sub(r'[^\w.-]+', '_', spec['path']).strip('_') + '.jsonl'
    else:
      name = os.path.basename(path)
    names.append(name)
  return [f'{i}_{name}' if names.count(name) > 1 else name for i, name in enumerate(names)]


def _records(spec: Mapping[str, Any], label: str) -> tuple[str, Iterator[Any], str]:
  """(kind, records, format) of one source."""
  path = os.path.expanduser(spec['path'])
  kind = _file_kind(path)
  if kind is None:
    raw = load_source(spec, streaming=True)
    return 'jsonl', iter(raw), source_format(raw, spec, label)
  records = {'json_list': _json_list, 'jsonl': _json_lines, 'parquet': _parquet}[kind](path)
  fmt = spec['format']
  if fmt == 'auto':
    first = next(records, None)
    if first is None:
      raise UserError(f'dataset file {path} holds no records.')
    try:
      fmt = detect_format(first if isinstance(first, Mapping) else {}, spec['columns'])
    except BadRecord as error:
      raise BadRecord(f'{label}: {error}') from None
    records = itertools.chain([first], records)
  return kind, records, fmt


def clean_files(specs: Sequence[Mapping[str, Any]], settings: CleanSettings, out_dir: str, *,
                eval_items: Sequence[EvalItem] = (), num_proc: int = 1,
                on_bad_record: str = 'skip') -> dict[str, Any]:
  """Cleans `specs` (filled-in `data.datasets` entries, in order) into `out_dir`; returns the
  summary it writes to `clean_summary.json`."""
  os.makedirs(out_dir, exist_ok=True)
  names = _output_names(specs)
  for spec, name in zip(specs, names):
    source = os.path.expanduser(spec['path'])
    if os.path.exists(source) and os.path.abspath(source) == os.path.abspath(
        os.path.join(out_dir, name)):
      raise UserError(f'--out {out_dir} would overwrite the source {spec["path"]}; choose '
                      'another output folder.')
  outputs = []
  with Cleaner(settings, eval_items, num_proc=num_proc, on_bad_record=on_bad_record) as cleaner, \
      open(os.path.join(out_dir, REMOVED_FILE), 'w', encoding='utf-8') as removed:
    for spec, name in zip(specs, names):
      label = spec['path']
      kind, records, fmt = _records(spec, label)
      source = os.path.expanduser(spec['path'])
      writer = _Writer(kind, os.path.join(out_dir, name), source)
      complete = False
      try:
        for index, record, removal in cleaner.clean(records, label, fmt, spec['columns']):
          if removal is None:
            writer.write(record)
          else:
            removed.write(json.dumps({'source': label, 'index': index, 'reason': removal.reason,
                                      **removal.detail}, ensure_ascii=False) + '\n')
        complete = True
      finally:
        writer.close(complete)
      # The entry that trains on the output: the source's settings that are not defaults, less
      # those that located the original (a dataset_info.json, a hub split).
      entry = {'path': os.path.join(out_dir, name), 'format': fmt}
      entry.update({k: v for k, v in spec.items() if k in ('columns', 'weight')
                    and v != DATASET_DEFAULTS[k]})
      outputs.append(entry)
  summary = cleaner.summary()
  summary['against'] = sorted({item.source for item in eval_items})
  summary['datasets'] = outputs
  with open(os.path.join(out_dir, SUMMARY_FILE), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2, ensure_ascii=False)
    f.write('\n')
  return summary


def eval_items_from(paths: Sequence[str], where: str) -> list[EvalItem]:
  return [item for path in paths for item in read_eval_file(path, where)]


def _not_removed(_, index: int, removed: frozenset[int]) -> bool:
  return index not in removed


def _dataset_records(raw: datasets.Dataset | datasets.IterableDataset) -> Iterator[Any]:
  if isinstance(raw, datasets.IterableDataset):
    yield from raw
    return
  for batch in raw.iter(batch_size=1024):
    columns = list(batch)
    for i in range(len(batch[columns[0]]) if columns else 0):
      yield {name: batch[name][i] for name in columns}


class SourceCleaner:
  """`data.clean.enabled`: filters a run's training sources before tokenization, in order and
  across sources, as `jaxsft data clean` would. Bad records stay in, for the tokenizer to count
  or refuse under `data.on_bad_record`. Every process of a run makes the same pass (decisions
  are a function of the data), and the filter keeps indices, so a streaming run resumes on the
  same records."""

  def __init__(self, data_config: Any):
    self.settings = CleanSettings.from_config(data_config.clean)
    items = eval_items_from(self.settings.against, 'data.clean.against:')
    self.cleaner = Cleaner(self.settings, items, num_proc=data_config.num_proc,
                           on_bad_record=data_config.on_bad_record)

  @classmethod
  def create(cls, data_config: Any) -> SourceCleaner | None:
    clean = getattr(data_config, 'clean', None)  # configs saved before data.clean existed
    return cls(data_config) if clean is not None and clean.enabled else None

  def __call__(self, raw: datasets.Dataset | datasets.IterableDataset, spec: Mapping[str, Any],
               label: str) -> datasets.Dataset | datasets.IterableDataset:
    fmt = source_format(raw, spec, label)
    removed = [index for index, _, removal in self.cleaner.clean(
        _dataset_records(raw), label, fmt, spec['columns'])
               if removal is not None and removal.reason != 'bad_record']
    if not removed:
      return raw
    counts = self.cleaner.counts[label]
    if len(removed) == counts['records']:
      reasons = ', '.join(f'{r} {counts[r]}' for r in REASONS if counts[r])
      raise UserError(f'{label}: data.clean removed all {len(removed)} records ({reasons}); '
                      'take the source out of data.datasets.')
    if isinstance(raw, datasets.Dataset):
      return raw.select(np.setdiff1d(np.arange(len(raw)), removed))
    return raw.filter(_not_removed, with_indices=True,
                      fn_kwargs={'removed': frozenset(removed)})

  def close(self) -> None:
    self.cleaner.close()

  def summary(self) -> dict[str, Any]:
    summary = self.cleaner.summary()
    bad = summary['removed'].pop('bad_record')  # not removed here: the tokenizer counts them
    summary['kept'] += bad
    return summary


def clean_report(pipeline: Any) -> list[str]:
  """`data inspect`'s lines about cleaning: the run's own (`data.clean.enabled`) and the
  `clean_summary.json` of each `jaxsft data clean` folder its sources come from."""
  lines = []
  if getattr(pipeline, 'clean_summary', None):
    lines.append(f'  data.clean: {summary_line(pipeline.clean_summary)}')
  folders = sorted({os.path.dirname(os.path.abspath(os.path.expanduser(spec['path'])))
                    for spec in pipeline.specs})
  for folder in folders:
    path = os.path.join(folder, SUMMARY_FILE)
    if os.path.isfile(path):
      with contextlib.suppress(OSError, ValueError, KeyError):
        with open(path, encoding='utf-8') as f:
          lines.append(f'  jaxsft data clean ({path}): {summary_line(json.load(f))}')
  return ['', 'cleaning:', *lines] if lines else []
