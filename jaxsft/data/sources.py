"""Dataset sources -> tokenized examples, through HF `datasets`.

Local files and hub names go through the same `datasets.load_dataset` call (a local file picks
its builder from the extension), so caching, `num_proc` workers and streaming behave the same
for both. Tokenization is one batched `map` whose output columns are:

  input_ids  [n] int32   token ids (empty when the record was dropped)
  loss_mask  [n] int8    1 = supervised token
  num_tokens     int32   len(input_ids)
  status         int8    KEPT | TRUNCATED | DROPPED_OVERLONG | DROPPED_UNSUPERVISED | BAD_RECORD
  index          int64   the record's index in its source
  sample         int32   0, or k for the k-th extra sample of a record that trains one sample
                         per assistant turn (`samples`: Qwen3 reasoning in several turns)
  turns_trained  int32   assistant turns the row supervises
  turns_masked   int32   assistant turns a message's loss_weight 0 masks (on a record's first row)

Dropped records stay in the table (with a status) so their counts survive the `datasets` cache,
and the training plan indexes only kept rows. A row is an example (a sample); a record is one
row or, expanded per assistant turn, several adjacent rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np

from jaxsft.data.formats import FORMATS, detect_format, to_messages, to_tools
from jaxsft.data.messages import BadRecord
from jaxsft.data.packing import OVERLONG_POLICIES, fit_length
from jaxsft.data.samples import Sample, render_samples
from jaxsft.data.templates import ChatTemplate, check_train_on, tokenize_rendered
from jaxsft.errors import UserError

BAD_RECORD_POLICIES = ('error', 'skip')

KEPT, TRUNCATED, DROPPED_OVERLONG, DROPPED_UNSUPERVISED, BAD_RECORD = range(5)
STATUS_NAMES = ('kept', 'truncated', 'dropped_overlong', 'dropped_unsupervised', 'bad_records')
# Bump when the tokenized columns change meaning, to invalidate `datasets` caches.
_CODE_VERSION = 'jaxsft-tokenize-2'
# `.txt`: one `text` record per line (LLaMA-Factory's pre-training demos).
_BUILDERS = {'.json': 'json', '.jsonl': 'json', '.parquet': 'parquet', '.arrow': 'arrow',
             '.csv': 'csv', '.txt': 'text'}
_EMPTY_IDS, _EMPTY_MASK = np.zeros(0, np.int32), np.zeros(0, np.int8)
FEATURES = datasets.Features({
    'input_ids': datasets.Sequence(datasets.Value('int32')),
    'loss_mask': datasets.Sequence(datasets.Value('int8')),
    'num_tokens': datasets.Value('int32'),
    'status': datasets.Value('int8'),
    'index': datasets.Value('int64'),
    'sample': datasets.Value('int32'),
    'turns_trained': datasets.Value('int32'),
    'turns_masked': datasets.Value('int32'),
})
# The columns `SourceStats.add` counts.
STATS_COLUMNS = ('status', 'num_tokens', 'sample', 'turns_trained', 'turns_masked')


@dataclasses.dataclass
class SourceStats:
  """Example counts by outcome for one source (or a sum of sources), and what per-turn loss
  control and per-turn samples did."""

  kept: int = 0
  truncated: int = 0
  dropped_overlong: int = 0
  dropped_unsupervised: int = 0
  bad_records: int = 0
  tokens: int = 0  # tokens of kept examples (after truncation)
  extra_samples: int = 0  # examples beyond a record's first (one sample per assistant turn)
  turns_trained: int = 0  # assistant turns supervised in kept examples
  turns_masked: int = 0   # assistant turns of kept examples' records masked by loss_weight 0

  @property
  def examples(self) -> int:
    return (self.kept + self.truncated + self.dropped_overlong + self.dropped_unsupervised +
            self.bad_records)

  @property
  def records(self) -> int:
    return self.examples - self.extra_samples

  def add(self, status: np.ndarray, num_tokens: np.ndarray, sample: np.ndarray | None = None,
          turns_trained: np.ndarray | None = None, turns_masked: np.ndarray | None = None
          ) -> None:
    """Counts rows of the tokenized columns (`STATS_COLUMNS`)."""
    status = np.asarray(status, np.int64)
    counts = np.bincount(status, minlength=len(STATUS_NAMES))
    for name, count in zip(STATUS_NAMES, counts):
      setattr(self, name, getattr(self, name) + int(count))
    kept = status <= TRUNCATED
    self.tokens += int(np.asarray(num_tokens, np.int64)[kept].sum())
    if sample is not None:
      self.extra_samples += int((np.asarray(sample) > 0).sum())
    for name, values in (('turns_trained', turns_trained), ('turns_masked', turns_masked)):
      if values is not None:
        setattr(self, name, getattr(self, name) + int(np.asarray(values, np.int64)[kept].sum()))

  def add_rows(self, rows: Mapping[str, Any]) -> None:
    """`add` of a tokenized table or a dict of its columns."""
    self.add(*(np.asarray(rows[name]) for name in STATS_COLUMNS))

  def __iadd__(self, other: SourceStats) -> SourceStats:
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
    return self

  def summary(self, streamed: bool = False) -> str:
    """One line of counts. `streamed`: the counts of a stream that is read as training goes
    (`data.streaming=True`): said to be so far, or not known yet rather than zeros."""
    if streamed and not self.examples:
      return ('streamed (data.streaming=True): records and tokens are not known in advance; '
              'they are counted as the stream is read')
    prefix = 'streamed, counted as read so far: ' if streamed else ''
    expanded = (f' ({self.examples} examples: {self.extra_samples} more from training each '
                'assistant turn of conversations whose template renders earlier reasoning '
                'differently)' if self.extra_samples else '')
    masked = (f', {self.turns_masked} masked by loss_weight' if self.turns_masked else '')
    return (f'{prefix}{self.records} records{expanded}: {self.kept + self.truncated} kept '
            f'({self.truncated} truncated), {self.dropped_overlong} dropped as too long, '
            f'{self.dropped_unsupervised} dropped with no supervised token, '
            f'{self.bad_records} bad records skipped; {self.tokens} tokens; '
            f'{self.turns_trained} assistant turns trained{masked}')


def load_source(spec: Mapping[str, Any], *, streaming: bool = False, cache_dir: str = ''
                ) -> datasets.Dataset | datasets.IterableDataset:
  """Raw records of one `data.datasets` entry (see `jaxsft.config.DATASET_DEFAULTS`)."""
  path = os.path.expanduser(spec['path'])
  kwargs: dict[str, Any] = {'split': spec['split'], 'streaming': streaming,
                            'cache_dir': cache_dir or None}
  if os.path.isfile(path):
    extension = os.path.splitext(path)[1].lower()
    if extension not in _BUILDERS:
      raise UserError(f'dataset file {path}: unknown extension {extension!r}; use one of '
                      f'{sorted(_BUILDERS)} or a folder/hub name.')
    if not _has_content(path):
      raise UserError(f'dataset file {path} is empty; it needs at least one record.')
    builder, kwargs['data_files'], kwargs['split'] = _BUILDERS[extension], path, 'train'
  elif os.path.isdir(path) and (os.path.isfile(os.path.join(path, 'dataset_dict.json')) or
                                os.path.isfile(os.path.join(path, 'state.json'))):
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
      loaded = loaded[spec['split']]
    return loaded.to_iterable_dataset() if streaming else loaded
  elif not os.path.isdir(path) and (path.startswith(('/', './', '../', '~')) or
                                    os.path.splitext(path)[1].lower() in _BUILDERS):
    raise UserError(f'dataset {spec["path"]!r} does not exist; fix its "path" in data.datasets '
                    '(a file, a folder, or a hub dataset name).')
  else:  # a folder of data files or a hub dataset name
    builder = path
    if spec.get('name'):
      kwargs['name'] = spec['name']
    if spec.get('data_files'):
      kwargs['data_files'] = spec['data_files']
  try:
    return datasets.load_dataset(builder, **kwargs)
  except Exception as error:
    if os.path.isfile(path) and path.lower().endswith(('.json', '.jsonl')):
      find_json_error(path)  # raises, naming the line, when the file does not parse
    raise UserError(f'could not load dataset {spec["path"]!r} (split {spec["split"]!r}): '
                    f'{error}') from error


def _has_content(path: str) -> bool:
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 16):
      if chunk.strip():
        return True
  return False


def find_json_error(path: str) -> None:
  """Raises `UserError` naming the line of a JSON/JSONL file that does not parse (`datasets`
  reports a byte position at best); returns when the file parses. Run only after a failed
  load, so a large file is not read twice."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as error:
    line = data[:error.start].count(b'\n') + 1
    raise UserError(f'dataset file {path}, line {line}: byte {error.start} is not UTF-8 '
                    f'({error.reason}); JSON data files are UTF-8 text: convert it (e.g. '
                    'iconv -f latin1 -t utf-8) or check that it is the file you meant.') from None
  stripped = text.lstrip()
  if stripped.startswith('[') or not path.endswith('.jsonl'):
    try:
      records = json.loads(text)
    except json.JSONDecodeError as error:
      raise UserError(f'dataset file {path}, line {error.lineno} column {error.colno}: invalid '
                      f'JSON ({error.msg}); fix that line.') from None
    if isinstance(records, list) and not records:
      raise UserError(f'dataset file {path} holds an empty list; it needs at least one record.')
    return
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      json.loads(line)
    except json.JSONDecodeError as error:
      raise UserError(f'dataset file {path}, line {number}: invalid JSON ({error.msg} at column '
                      f'{error.colno}); each line of a .jsonl file must be one JSON object. Fix '
                      'or remove that line.') from None


def column_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str]:
  names = dataset.column_names
  if names is None:  # a streaming source whose schema is unknown until read
    names = list(next(iter(dataset)))
  return names


def source_format(dataset: datasets.Dataset | datasets.IterableDataset, spec: Mapping[str, Any],
                  label: str) -> str:
  """The format of a whole source: forced in the config, else detected from its columns."""
  if spec['format'] != 'auto':
    if spec['format'] not in FORMATS:
      raise UserError(f'{label}: unknown format {spec["format"]!r}; choose one of {FORMATS}.')
    return spec['format']
  try:
    return detect_format(dict.fromkeys(column_names(dataset)), spec['columns'])
  except BadRecord as error:
    raise BadRecord(f'{label}: {error}') from None


def encode_records(batch: dict[str, list[Any]], indices: list[int], *, label: str, format: str,  # pylint: disable=redefined-builtin
                   columns: Mapping[str, str], tokenizer: Any, template: ChatTemplate,
                   train_on: str, train_on_reasoning: bool, max_tokens: int, overlong: str,
                   on_bad_record: str) -> dict[str, list[Any]]:
  """The `datasets.map` function: a batch of raw records -> the columns in FEATURES, one row per
  sample, in record order (a bad record is one row)."""
  def bad(index: int, error: BadRecord) -> None:
    if on_bad_record == 'error':
      raise BadRecord(f'{label}, record {index}: {error} (set data.on_bad_record="skip" to '
                      'skip such records and count them)') from None

  conversations, tools, positions = [], [], []
  for position, index in enumerate(indices):
    record = {name: values[position] for name, values in batch.items()}
    try:
      conversation, record_tools = to_messages(record, format, columns), to_tools(record, format,
                                                                                  columns)
    except BadRecord as error:
      bad(index, error)
      continue
    conversations.append(conversation)
    tools.append(record_tools)
    positions.append(position)
  samples: list[list[Sample] | None] = [None] * len(indices)
  for position, result in zip(positions, render_samples(
      conversations, template, tokenizer, train_on, tools=tools,
      train_on_reasoning=train_on_reasoning)):
    if isinstance(result, BadRecord):
      bad(indices[position], result)
    else:
      samples[position] = result
  flat = [sample for record_samples in samples for sample in record_samples or ()]
  examples = iter(tokenize_rendered([s.text for s in flat], [s.spans for s in flat], tokenizer))
  rows: dict[str, list[Any]] = {name: [] for name in FEATURES}

  def add(index: int, k: int, status: int, ids: np.ndarray = _EMPTY_IDS,
          mask: np.ndarray = _EMPTY_MASK, trained: int = 0, masked: int = 0) -> None:
    for name, value in (('input_ids', ids), ('loss_mask', mask), ('num_tokens', len(ids)),
                        ('status', status), ('index', index), ('sample', k),
                        ('turns_trained', trained), ('turns_masked', masked)):
      rows[name].append(value)

  for index, record_samples in zip(indices, samples):
    if record_samples is None:
      add(index, 0, BAD_RECORD)
    for k, sample in enumerate(record_samples or ()):
      example = next(examples)
      fitted = fit_length(example, max_tokens, overlong)
      if fitted is None:
        add(index, k, DROPPED_UNSUPERVISED if not example['loss_mask'][1:].any()
            else DROPPED_OVERLONG)
      else:
        add(index, k, KEPT if fitted is example else TRUNCATED, fitted['input_ids'],
            fitted['loss_mask'], sample.turns_trained, sample.turns_masked)
  return rows


class TokenizerView:
  """What the data path needs of a transformers fast tokenizer, cheap to pickle.

  `datasets` pickles the map function's arguments to hash them and to ship them to `num_proc`
  workers; dill walks a transformers tokenizer's Python-side vocabulary (1.6 s for 32k pieces,
  measured), while this view is one JSON string and a few fields.
  """

  def __init__(self, tokenizer: Any):
    self.tokenizer_json = tokenizer.backend_tokenizer.to_str()
    self.special_tokens_map = dict(getattr(tokenizer, 'special_tokens_map', {}) or {})
    self.bos_token_id = getattr(tokenizer, 'bos_token_id', None)
    self.eos_token_id = getattr(tokenizer, 'eos_token_id', None)
    self.eos_token = getattr(tokenizer, 'eos_token', None)
    self.add_bos_token = getattr(tokenizer, 'add_bos_token', True)
    self._backend = tokenizer.backend_tokenizer

  @property
  def backend_tokenizer(self) -> Any:
    if self._backend is None:
      from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
      self._backend = Tokenizer.from_str(self.tokenizer_json)
    return self._backend

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, '_backend': None}

  def fingerprint(self) -> str:
    fields = {k: v for k, v in self.__dict__.items() if k != '_backend'}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def tokenize_source(dataset: datasets.Dataset | datasets.IterableDataset,
                    spec: Mapping[str, Any], label: str, *, tokenizer: Any,
                    template: ChatTemplate, data_config: Any
                    ) -> datasets.Dataset | datasets.IterableDataset:
  """Maps a raw source to tokenized columns (cached on disk for non-streaming sources)."""
  # A run saved before `train_on_reasoning` existed (evaluated from its work directory) lacks it.
  train_on_reasoning = getattr(data_config, 'train_on_reasoning', True)
  check_train_on(data_config.train_on, train_on_reasoning)
  if data_config.overlong not in OVERLONG_POLICIES:
    raise UserError(f'data.overlong={data_config.overlong!r}; choose one of '
                    f'{OVERLONG_POLICIES}.')
  if data_config.on_bad_record not in BAD_RECORD_POLICIES:
    raise UserError(f'data.on_bad_record={data_config.on_bad_record!r}; choose one of '
                    f'{BAD_RECORD_POLICIES}.')
  fn_kwargs = {
      'label': label, 'format': source_format(dataset, spec, label),
      'columns': dict(spec['columns']), 'tokenizer': TokenizerView(tokenizer),
      'template': template,
      'train_on': data_config.train_on, 'train_on_reasoning': train_on_reasoning,
      'max_tokens': data_config.max_seq_len + 1,
      'overlong': data_config.overlong, 'on_bad_record': data_config.on_bad_record}
  kwargs: dict[str, Any] = {
      'batched': True, 'with_indices': True, 'batch_size': data_config.map_batch_size,
      'fn_kwargs': fn_kwargs, 'remove_columns': column_names(dataset), 'features': FEATURES}
  if isinstance(dataset, datasets.Dataset):
    kwargs['num_proc'] = data_config.num_proc if data_config.num_proc > 1 else None
    kwargs['desc'] = f'Tokenizing {label}'
    kwargs['new_fingerprint'] = _map_fingerprint(dataset, fn_kwargs)
  return dataset.map(encode_records, **kwargs)


def _map_fingerprint(dataset: datasets.Dataset, fn_kwargs: Mapping[str, Any]) -> str:
  """The cache key of the tokenized table (`datasets` would otherwise pickle everything)."""
  tokenizer = fn_kwargs['tokenizer']
  digest = hashlib.sha256()
  for part in (dataset._fingerprint, tokenizer.fingerprint(),  # pylint: disable=protected-access
               fn_kwargs['template'].source,
               json.dumps({k: v for k, v in fn_kwargs.items() if k not in ('tokenizer', 'template')},
                          sort_keys=True, default=str), _CODE_VERSION):
    digest.update(part.encode())
  return digest.hexdigest()[:32]


def read_column(table: datasets.Dataset, name: str) -> np.ndarray:
  """A scalar column as a numpy array, straight from Arrow."""
  return table.data.column(name).to_numpy()
