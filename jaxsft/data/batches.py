"""Batch iterators over a `Pipeline`'s windows, with a position that resumes exactly.

`InMemoryBatches` walks the planned global windows and reads only this process's rows;
`StreamingBatches` packs windows of this process's streams. `state()` is a small JSON dict;
`Pipeline.train_batches(state)` continues from it on exactly the batches the run would have
seen. A batch is a dict of int32 `[batch_size // process_count, max_seq_len]` arrays.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxsft.data.packing import assign_rows, fill_rows
from jaxsft.data.sources import STATS_COLUMNS, TRUNCATED
from jaxsft.errors import UserError

STATE_VERSION = 1
Batch = dict[str, np.ndarray]


def seeded_rng(*keys: Any) -> np.random.Generator:
  """A generator seeded by a tuple of ints and strings (stable across processes and runs)."""
  words = [int(k) if not isinstance(k, str) else
           int.from_bytes(hashlib.sha256(k.encode()).digest()[:4], 'little') for k in keys]
  return np.random.default_rng(words)


class BatchIterator(Iterator[Batch]):
  """Endless batches with a serializable position (`state()`)."""

  def __init__(self, pipeline: Any):
    self.pipeline = pipeline
    self.window = 0
    self.row = 0  # next row (global for in-memory, local for streaming) within the window

  def state(self) -> dict[str, Any]:
    return {'version': STATE_VERSION, 'fingerprint': self.pipeline.fingerprint(),
            'streaming': bool(self.pipeline.config.streaming),
            'process_index': self.pipeline.process_index, 'window': self.window,
            'row': self.row}

  def _check_state(self, state: dict[str, Any]) -> None:
    if state.get('version') != STATE_VERSION:
      raise UserError(f'data iterator state version {state.get("version")} is not '
                      f'{STATE_VERSION}; it was saved by another jaxsft version.')
    if state['fingerprint'] != self.pipeline.fingerprint():
      raise UserError('the saved data iterator state belongs to a different data setup (seed, '
                      'sources, max_seq_len, batch_size, packing, or the process count of a '
                      'stream changed); '
                      'resuming would not see the same batches. Restore those settings.')
    if state.get('streaming') and state['process_index'] != self.pipeline.process_index:
      raise UserError(f'data state of process {state["process_index"]} given to process '
                      f'{self.pipeline.process_index}.')

  @property
  def epoch(self) -> int:
    """Completed passes over the training data (in memory: one window is one epoch)."""
    return self.window


class InMemoryBatches(BatchIterator):

  def __init__(self, pipeline: Any, state: dict[str, Any] | None):
    super().__init__(pipeline)
    if state is not None:
      self._check_state(state)
      self.window, self.row = state['window'], state['row']
    self._plan = (-1, [], [])

  def _window_plan(self, window: int):
    if self._plan[0] != window:
      self._plan = (window, *self.pipeline._plan_window(window))  # pylint: disable=protected-access
    return self._plan[1], self._plan[2]

  def __next__(self) -> Batch:
    p = self.pipeline
    first = p.process_index * p.local_batch_size
    chosen: list[tuple[int, int]] = []
    batch_rows: list[list[int]] = []
    for position in range(p.batch_size):
      refs, rows = self._window_plan(self.window)
      if first <= position < first + p.local_batch_size:
        base = len(chosen)
        chosen += [refs[i] for i in rows[self.row]]
        batch_rows.append(list(range(base, len(chosen))))
      self.row += 1
      if self.row == len(rows):
        self.window, self.row = self.window + 1, 0
    return fill_rows(p._read(p.sources, chosen), batch_rows, p.seq_len)  # pylint: disable=protected-access


class StreamingBatches(BatchIterator):

  def __init__(self, pipeline: Any, state: dict[str, Any] | None):
    super().__init__(pipeline)
    self.streams = [copy.deepcopy(s) for s in pipeline.streams]
    self.epochs = [0] * len(self.streams)
    if state is not None:
      self._check_state(state)
      self.window, self.row = state['window'], state['row']
      self.epochs = list(state['epochs'])
      for stream, epoch, saved in zip(self.streams, self.epochs, state['streams']):
        stream.set_epoch(epoch)
        stream.load_state_dict(saved)
    self._iterators = [iter(s) for s in self.streams]
    self._load_window()

  @property
  def epoch(self) -> int:
    """Passes this process has completed over its part of every source."""
    return min(self.epochs)

  def state(self) -> dict[str, Any]:
    return {**super().state(), 'epochs': list(self._window_epochs),
            'streams': copy.deepcopy(self._window_streams)}

  def _next_example(self, s: int) -> dict[str, Any]:
    for _ in range(2):
      for example in self._iterators[s]:
        self.pipeline.stats[self.pipeline.stream_labels[s]].add_rows(
            {name: [example[name]] for name in STATS_COLUMNS})
        if example['status'] <= TRUNCATED:
          return example
      self.epochs[s] += 1  # this process's part of the source is used up: next epoch
      self.streams[s].set_epoch(self.epochs[s])
      self._iterators[s] = iter(self.streams[s])
    raise UserError(f'{self.pipeline.stream_labels[s]}: no usable examples on process '
                    f'{self.pipeline.process_index} (every record was dropped or skipped).')

  def _load_window(self) -> None:
    """Reads the current window's examples; the state saved is the streams' position at the
    window's start, so a resume re-reads and re-packs the same window."""
    p = self.pipeline
    self._window_epochs = list(self.epochs)
    self._window_streams = [s.state_dict() for s in self.streams]
    rng = seeded_rng(p.config.seed, 'stream-window', p.process_index, self.window)
    counts = rng.multinomial(p.config.pack_window, np.asarray(p.weights) / np.sum(p.weights))
    examples = [{k: np.asarray(e[k]) for k in ('input_ids', 'loss_mask')}
                for s, count in enumerate(counts) for e in
                (self._next_example(s) for _ in range(count))]
    examples = [examples[i] for i in rng.permutation(len(examples))]
    rows = assign_rows([len(e['input_ids']) - 1 for e in examples], p.seq_len, p.config.packing)
    self._examples = examples
    self._rows = [rows[i] for i in rng.permutation(len(rows))]

  def __next__(self) -> Batch:
    p = self.pipeline
    chosen, batch_rows = [], []
    for _ in range(p.local_batch_size):
      base = len(chosen)
      chosen += [self._examples[i] for i in self._rows[self.row]]
      batch_rows.append(list(range(base, len(chosen))))
      self.row += 1
      if self.row == len(self._rows):
        self.window, self.row = self.window + 1, 0
        self._load_window()
    return fill_rows(chosen, batch_rows, p.seq_len)
