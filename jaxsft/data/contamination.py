"""Evaluation data in training records: n-gram overlap, as the GPT-3 paper measures it.

GPT-3 (Brown et al. 2020, appendix C) calls a benchmark example dirty when it shares an N-gram
with the training data, N = 13 words at most, ignoring case, punctuation and whitespace; shorter
examples need a whole-example match, and below 8 words matches are mostly spurious. LLaMA
(Touvron et al. 2023) reports overlap the same way (LLaMA 2 with token n-grams). Here, the other
way round (a training record is removed when it contains evaluation text):

* every string field of an evaluation item (question, prompt, choices, answer, ...) is compared
  on its own, as words (`jaxsft.data.normalize.words`);
* a field of at least `ngram` words contributes all its `ngram`-word windows; a field of 8 to
  `ngram - 1` words contributes itself whole (GPT-3's short examples); shorter fields (an answer
  "Paris", a choice "yes") are no evidence and are left out;
* a training record is contaminated when any window of its words equals one of those: the report
  names the first such window, the evaluation file (or benchmark task) and the item's index.

Evaluation files are JSON (a list of items), JSONL or parquet; jaxsft benchmark tasks are
resolved to items by the CLI (`jaxsft.cli.data_clean`), since the data layer imports no
evaluation code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from jaxsft.data.normalize import hash_windows, word_hashes, words
from jaxsft.errors import UserError

MIN_WORDS = 8  # GPT-3: shorter matches are mostly spurious collisions
EVAL_EXTENSIONS = ('.json', '.jsonl', '.parquet')


@dataclasses.dataclass(frozen=True)
class EvalItem:
  source: str               # the evaluation file, or `benchmark:TASK`
  index: int                # the item's position in it
  texts: tuple[str, ...]    # its string fields, compared each on its own


def strings(value: Any) -> list[str]:
  """Every string in an item (object values and list elements, at any depth), in order."""
  if isinstance(value, str):
    return [value]
  if isinstance(value, dict):
    return [s for v in value.values() for s in strings(v)]
  if isinstance(value, (list, tuple)):
    return [s for v in value for s in strings(v)]
  return []


def read_eval_file(path: str, where: str = '--against') -> list[EvalItem]:
  """The items of a JSON / JSONL / parquet evaluation file."""
  if not os.path.isfile(path):
    raise UserError(f'{where} {path}: no such file; give a JSON, JSONL or parquet file of '
                    'evaluation items (their string fields are compared).')
  extension = os.path.splitext(path)[1].lower()
  if extension not in EVAL_EXTENSIONS:
    raise UserError(f'{where} {path}: unknown extension {extension!r}; use one of '
                    f'{list(EVAL_EXTENSIONS)}.')
  if extension == '.parquet':
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    records = pq.read_table(path).to_pylist()
  else:
    with open(path, encoding='utf-8') as f:
      text = f.read()
    records = None
    if extension == '.json' or text.lstrip().startswith('['):
      try:
        records = json.loads(text)
      except json.JSONDecodeError as error:
        if extension == '.json' and text.lstrip().startswith('['):
          raise UserError(f'{where} {path}, line {error.lineno}: invalid JSON ({error.msg}).'
                          ) from None
      if records is not None and not isinstance(records, list):
        raise UserError(f'{where} {path}: expected a list of items, got '
                        f'{type(records).__name__}.')
    if records is None:
      records = []
      for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as error:
            raise UserError(f'{where} {path}, line {number}: invalid JSON ({error.msg}); each '
                            'line must be one item.') from None
  return [EvalItem(path, i, tuple(strings(r))) for i, r in enumerate(records)]


class ContaminationIndex:
  """The word windows of evaluation items, for lookups of training records' windows."""

  def __init__(self, items: Iterable[EvalItem], ngram: int):
    self.items = list(items)
    self.ngram = ngram
    shortest = min(MIN_WORDS, ngram)
    keys, owners = [], []
    for number, item in enumerate(self.items):
      for text in item.texts:
        hashes = word_hashes(words(text))
        if len(hashes) >= shortest:
          windows = hash_windows(hashes, min(ngram, len(hashes)))
          keys.append(windows)
          owners.append(np.full(len(windows), number, np.int64))
    keys_array = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    owners_array = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    # Sorted for binary search; a window in several items reports the first of them.
    order = np.lexsort((owners_array, keys_array))
    keys_array, owners_array = keys_array[order], owners_array[order]
    first = np.ones(len(keys_array), bool)
    first[1:] = keys_array[1:] != keys_array[:-1]
    self.keys, self.owners = keys_array[first], owners_array[first]
    self.lengths = sorted({min(ngram, len(words(t))) for item in self.items for t in item.texts
                           if len(words(t)) >= shortest}, reverse=True)
    self.comparable = len(np.unique(self.owners))  # items with a field long enough to compare

  def __len__(self) -> int:
    return len(self.keys)

  def matches(self, hashes: np.ndarray, lengths: np.ndarray
              ) -> dict[int, tuple[EvalItem, int, int]]:
    """For consecutive records (word hashes `hashes`, `lengths[r]` words each): record ->
    (the evaluation item, the start and the length of its first matching window)."""
    found: dict[int, tuple[EvalItem, int, int]] = {}
    if not len(self.keys) or not len(hashes):
      return found
    record_of = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    for n in self.lengths:  # the longest windows first
      windows = hash_windows(hashes, n)
      if not len(windows):
        continue
      positions = np.arange(len(windows))
      slots = np.minimum(np.searchsorted(self.keys, windows), len(self.keys) - 1)
      hits = (self.keys[slots] == windows) & (record_of[positions] ==
                                               record_of[positions + n - 1])
      for position in np.flatnonzero(hits):
        record = int(record_of[position])
        if record not in found:
          found[record] = (self.items[int(self.owners[slots[position]])],
                           int(position - starts[record]), n)
    return found
