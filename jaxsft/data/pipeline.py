"""The data pipeline of a run: sources -> tokenized examples -> packed, sharded batches.

Training data is an endless sequence of *windows*. A window is a set of examples drawn from the
sources by their mixture weights, packed into rows (`data.packing`), rows shuffled; batches are
consecutive `batch_size` rows of the window sequence, and each JAX process takes its own
contiguous slice of every global batch.

* In-memory (map-style) mode a window is one mixture epoch: source s contributes
  `round(p_s * N)` examples (N = all training examples, p_s its normalized weight), read from an
  endless stream of per-cycle seeded permutations of the source, so a down-weighted source shows
  new examples each epoch and an up-weighted one repeats in a fresh order. Every process plans
  the same global windows from the example lengths alone and reads only its own rows.
* Streaming mode reads `data.pack_window` examples per window, from this process's shards only
  (`datasets.distributed.split_dataset_by_node`), so each process packs its own rows.

Everything is a pure function of `data.seed`, the window index and the sources, so the iterator
state is a few integers (plus the `datasets` stream positions in streaming mode):
`BatchIterator.state()` -> a JSON-serializable dict; `Pipeline.train_batches(state)` resumes on
exactly the batches the run would have seen.

A batch is a dict of int32 numpy arrays `[batch_size // process_count, max_seq_len]` with keys
`inputs, targets, loss_mask, segment_ids, positions` (see `packing.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np

from jaxsft.data.batches import Batch, BatchIterator, InMemoryBatches, StreamingBatches, seeded_rng
from jaxsft.data.clean import summary_line
from jaxsft.data.clean_io import SourceCleaner
from jaxsft.data.packing import STRATEGIES, assign_rows, fill_rows
from jaxsft.data.sources import (
  STATS_COLUMNS,
  TRUNCATED,
  SourceStats,
  load_source,
  read_column,
  tokenize_source,
)
from jaxsft.data.spec import dataset_spec
from jaxsft.data.templates import load_template
from jaxsft.errors import UserError

_LOG = logging.getLogger(__name__)


def mixture_counts(weights: Sequence[float], total: int) -> np.ndarray:
  """Largest-remainder split of `total` examples by weight (sums exactly to `total`)."""
  share = np.asarray(weights, np.float64) / np.sum(weights) * total
  counts = np.floor(share).astype(np.int64)
  order = np.argsort(-(share - counts), kind='stable')
  counts[order[:total - counts.sum()]] += 1
  return counts


@dataclasses.dataclass
class _Source:
  label: str
  spec: dict[str, Any]
  table: datasets.Dataset | None  # tokenized (map-style mode)
  train_rows: np.ndarray          # table rows of kept training examples
  eval_rows: np.ndarray
  num_tokens: np.ndarray          # per table row

  def __post_init__(self):
    # Built once: `with_format` copies the Dataset object, a cost per batch otherwise.
    self.arrow_table = self.table.with_format('arrow') if self.table is not None else None


class Pipeline:
  """Training and eval batches of one run, built from the `data` section of the config.

  A batch is this process's slice of a global batch of packed rows (`packing.pack`): int32
  arrays `[batch_size / process_count, data.max_seq_len]` under the keys of `packing.ROW_KEYS`.
  `train_batches()` is endless and resumable from its `state()`; `eval_batches()` is one pass.
  """

  def __init__(self, data_config: Any, tokenizer: Any, *, batch_size: int,
               process_index: int | None = None, process_count: int | None = None):
    import jax  # pylint: disable=import-outside-toplevel
    self.config = data_config
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if batch_size % self.process_count:
      raise UserError(f'batch_size={batch_size} must be divisible by the number of JAX '
                      f'processes ({self.process_count}); each process feeds an equal slice.')
    if data_config.packing not in STRATEGIES:
      raise UserError(f'data.packing={data_config.packing!r}; choose one of {STRATEGIES}.')
    if not data_config.datasets and not data_config.eval_datasets:
      raise UserError('data.datasets is empty; add at least one {"path": ...} entry.')
    self.template = load_template(data_config.template, tokenizer)
    self.seq_len = data_config.max_seq_len
    self.local_batch_size = batch_size // self.process_count
    self.specs = [dataset_spec(entry, f'data.datasets[{i}]')
                  for i, entry in enumerate(data_config.datasets)]
    self.eval_specs = [dataset_spec(entry, f'data.eval_datasets[{i}]')
                       for i, entry in enumerate(data_config.eval_datasets)]
    self.stats: dict[str, SourceStats] = {}
    self.stream_labels: list[str] = []  # the training streams' labels (data.streaming)
    self._permutations: dict[tuple[int, int], np.ndarray] = {}
    # data.clean.enabled: one pass over the training sources before tokenizing (clean_io).
    self._cleaner = SourceCleaner.create(data_config)
    self.clean_summary: dict[str, Any] | None = None
    try:
      if data_config.streaming:
        self._init_streaming()
      else:
        self._init_in_memory()
    finally:
      if self._cleaner is not None:
        self._cleaner.close()
        self.clean_summary = self._cleaner.summary()
        _LOG.info('data clean: %s', summary_line(self.clean_summary))
    for label, stats in self.stats.items():
      _LOG.info('data %s: %s', label, stats.summary(streamed=self.is_streamed(label)))
      if stats.truncated or stats.dropped_overlong or stats.bad_records:
        _LOG.warning('data %s: %d truncated, %d dropped as longer than %d tokens, %d bad records '
                     'skipped.', label, stats.truncated, stats.dropped_overlong,
                     data_config.max_seq_len + 1, stats.bad_records)

  # ----------------------------------------------------------------------------- in memory

  def _tokenized(self, spec: dict[str, Any], label: str, clean: bool = False
                 ) -> tuple[datasets.Dataset, np.ndarray, np.ndarray]:
    """A source's tokenized table, the table rows it keeps and every row's token count; its
    record counts go into `self.stats`."""
    raw = load_source(spec, cache_dir=self.config.cache_dir)
    if clean and self._cleaner is not None:
      raw = self._cleaner(raw, spec, label)
    table = tokenize_source(raw, spec, label, tokenizer=self.tokenizer, template=self.template,
                            data_config=self.config)
    columns = {name: read_column(table, name) for name in STATS_COLUMNS}
    status, num_tokens = columns['status'], columns['num_tokens']
    self.stats[label] = SourceStats()
    self.stats[label].add_rows(columns)
    return table, np.flatnonzero(status <= TRUNCATED), num_tokens

  def _init_in_memory(self) -> None:
    self.sources: list[_Source] = []
    self.eval_sources: list[_Source] = []
    for i, spec in enumerate(self.specs):
      label = f'datasets[{i}] {spec["path"]}'
      table, kept, num_tokens = self._tokenized(spec, label, clean=True)
      held_out = self._eval_count(len(kept), label)
      order = seeded_rng(self.config.seed, 'eval', i).permutation(len(kept))
      eval_rows = np.sort(kept[order[:held_out]])
      train_rows = np.sort(kept[order[held_out:]])
      if not len(train_rows):
        raise UserError(f'{label}: no training examples left ({self.stats[label].summary()}).')
      self.sources.append(_Source(label, spec, table, train_rows, eval_rows, num_tokens))
      if held_out:
        self.eval_sources.append(_Source(label, spec, table, eval_rows, eval_rows, num_tokens))
    for i, spec in enumerate(self.eval_specs):
      label = f'eval_datasets[{i}] {spec["path"]}'
      table, kept, num_tokens = self._tokenized(spec, label)
      self.eval_sources.append(_Source(label, spec, table, kept, kept, num_tokens))
    self.weights = [s.spec['weight'] for s in self.sources]
    self.epoch_examples = int(sum(len(s.train_rows) for s in self.sources))
    self.window_counts = (mixture_counts(self.weights, self.epoch_examples) if self.sources
                          else np.zeros(0, np.int64))

  def _eval_count(self, available: int, label: str) -> int:
    size = self.config.eval_size
    if size <= 0:
      return 0
    count = int(round(size * available)) if size < 1 else int(size)
    if count >= available:
      raise UserError(f'{label}: data.eval_size={size} holds out {count} of {available} '
                      'examples, leaving none to train on.')
    return count

  def _cycle_permutation(self, source: int, cycle: int) -> np.ndarray:
    key = (source, cycle)
    if key not in self._permutations:
      if len(self._permutations) > 64:
        self._permutations.clear()
      self._permutations[key] = seeded_rng(self.config.seed, 'cycle', source, cycle).permutation(
          len(self.sources[source].train_rows))
    return self._permutations[key]

  def _stream_rows(self, source: int, start: int, count: int) -> np.ndarray:
    """Table rows at positions [start, start + count) of source's endless shuffled stream."""
    n = len(self.sources[source].train_rows)
    positions = np.arange(start, start + count)
    out = np.empty(count, np.int64)
    for cycle in np.unique(positions // n):
      chosen = positions // n == cycle
      out[chosen] = self.sources[source].train_rows[
          self._cycle_permutation(source, int(cycle))[positions[chosen] % n]]
    return out

  def _plan_window(self, window: int) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Window `window` of the in-memory plan: (example refs (source, table row), global rows
    as lists of indices into the refs)."""
    refs = [(s, int(row)) for s, count in enumerate(self.window_counts)
            for row in self._stream_rows(s, window * int(count), int(count))]
    order = seeded_rng(self.config.seed, 'window', window).permutation(len(refs))
    refs = [refs[i] for i in order]
    lengths = [int(self.sources[s].num_tokens[row]) - 1 for s, row in refs]
    rows = assign_rows(lengths, self.seq_len, self.config.packing)
    row_order = seeded_rng(self.config.seed, 'rows', window).permutation(len(rows))
    return refs, [rows[i] for i in row_order]

  def _read(self, sources: Sequence[_Source], refs: Sequence[tuple[int, int]]
            ) -> list[dict[str, np.ndarray]]:
    """Token ids and loss masks of table rows, one Arrow `take` per source."""
    examples: list[dict[str, np.ndarray] | None] = [None] * len(refs)
    by_source: dict[int, list[int]] = {}
    for i, (s, _) in enumerate(refs):
      by_source.setdefault(s, []).append(i)
    for s, members in by_source.items():
      table = sources[s].arrow_table[[refs[i][1] for i in members]]
      columns = {}
      for name in ('input_ids', 'loss_mask'):
        column = table[name].combine_chunks()
        # `offsets` index into the whole child array `values`, also for a sliced column.
        columns[name] = (column.values.to_numpy(), column.offsets.to_numpy())
      for j, i in enumerate(members):
        examples[i] = {name: values[offsets[j]:offsets[j + 1]]
                       for name, (values, offsets) in columns.items()}
    return examples

  # ----------------------------------------------------------------------------- streaming

  def _init_streaming(self) -> None:
    from datasets.distributed import split_dataset_by_node  # pylint: disable=import-outside-toplevel
    if self.config.eval_size and self.config.eval_size < 1:
      raise UserError('data.streaming=True: data.eval_size must be a count of records (>= 1) '
                      'or 0; a fraction needs the source length, which a stream does not have.')
    self.streams: list[datasets.IterableDataset] = []
    eval_examples: list[dict[str, np.ndarray]] = []
    for i, spec in enumerate(self.specs):
      label = f'datasets[{i}] {spec["path"]}'
      raw = load_source(spec, streaming=True, cache_dir=self.config.cache_dir)
      if self._cleaner is not None:
        raw = self._cleaner(raw, spec, label)
      held_out = int(self.config.eval_size)
      if held_out:
        eval_examples += self._read_all(raw.take(held_out), spec, f'{label} (eval)')
        raw = raw.skip(held_out)
      raw = split_dataset_by_node(raw, rank=self.process_index, world_size=self.process_count)
      self.streams.append(tokenize_source(raw, spec, label, tokenizer=self.tokenizer,
                                          template=self.template, data_config=self.config))
      self.stream_labels.append(label)
      self.stats[label] = SourceStats()
    for i, spec in enumerate(self.eval_specs):
      label = f'eval_datasets[{i}] {spec["path"]}'
      raw = load_source(spec, streaming=True, cache_dir=self.config.cache_dir)
      eval_examples += self._read_all(raw, spec, label)
    self.eval_examples = eval_examples
    self.weights = [s['weight'] for s in self.specs]

  def _read_all(self, raw: datasets.IterableDataset, spec: dict[str, Any], label: str
                ) -> list[dict[str, np.ndarray]]:
    tokenized = tokenize_source(raw, spec, label, tokenizer=self.tokenizer,
                                template=self.template, data_config=self.config)
    self.stats[label] = stats = SourceStats()
    examples = []
    for example in tokenized:
      stats.add_rows({name: [example[name]] for name in STATS_COLUMNS})
      if example['status'] <= TRUNCATED:
        examples.append({k: np.asarray(example[k]) for k in ('input_ids', 'loss_mask')})
    return examples

  # ----------------------------------------------------------------------------- batches

  def fingerprint(self) -> str:
    """What a saved iterator state depends on; resuming under a different one is an error."""
    keys = {'seed': self.config.seed, 'max_seq_len': self.seq_len, 'batch_size': self.batch_size,
            'packing': self.config.packing, 'streaming': self.config.streaming,
            'pack_window': self.config.pack_window, 'eval_size': self.config.eval_size,
            'specs': self.specs}
    if self.clean_summary is not None:  # only then: fingerprints of earlier runs stay valid
      keys['clean'] = self.clean_summary['settings']
    if self.config.streaming:  # each process reads its own shards
      keys['process_count'] = self.process_count
    else:  # one global plan: any number of processes continues it
      keys['sizes'] = [len(s.train_rows) for s in self.sources]
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]

  def train_batches(self, state: dict[str, Any] | None = None) -> BatchIterator:
    """The endless training batches of this process, from the start or from a saved state."""
    if not self.specs:
      raise UserError('data.datasets is empty; training needs at least one {"path": ...} '
                      'entry (data.eval_datasets alone only serve eval_batches).')
    if self.config.streaming:
      return StreamingBatches(self, state)
    return InMemoryBatches(self, state)

  def eval_batches(self) -> Iterator[Batch]:
    """One pass over the eval examples, packed in a fixed order; the last global batch is
    padded with empty rows (segment_ids 0, no loss)."""
    if self.config.streaming:
      examples = self.eval_examples
    else:
      refs = [(s, int(row)) for s, source in enumerate(self.eval_sources)
              for row in source.eval_rows]
      examples = self._read(self.eval_sources, refs) if refs else []
    if not examples:
      return
    rows = assign_rows([len(e['input_ids']) - 1 for e in examples], self.seq_len,
                       self.config.packing)
    rows += [[] for _ in range(-len(rows) % self.batch_size)]
    for start in range(0, len(rows), self.batch_size):
      mine = start + self.process_index * self.local_batch_size
      yield fill_rows(examples, rows[mine:mine + self.local_batch_size], self.seq_len)

  def is_streamed(self, label: str) -> bool:
    """Whether `self.stats[label]` counts a training stream as it is read (`data.streaming`),
    rather than a source read whole (in memory, or a stream's held-out and eval records)."""
    return label in self.stream_labels

  def total_stats(self) -> SourceStats:
    total = SourceStats()
    for stats in self.stats.values():
      total += stats
    return total
