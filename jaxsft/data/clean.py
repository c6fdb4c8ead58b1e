"""Clean training records before they are tokenized: exact and near duplicates, evaluation data
(contamination), empty and degenerate answers.

A record's text is its conversation (`to_messages`): the content, reasoning and tool calls of
every message but the system prompt, which many datasets share in every record and which would
make all their short records look alike. Its *words* are that text lower-cased with punctuation
and whitespace dropped (`words`), CJK characters one word each (CJK text has no spaces).

* Exact duplicates: equal word sequences (a 64-bit BLAKE2 hash of them), so case, whitespace
  and punctuation edits are exact duplicates.
* Near duplicates: MinHash signatures over the set of `shingle_words`-word shingles, indexed in
  `datasketch`'s `MinHashLSH`. The LSH parameters are chosen for recall (false negatives weigh
  four times false positives) and every candidate is then verified: a record is a near duplicate
  when the signature estimate of its Jaccard similarity with a kept record is >= the threshold.
  Signatures: `jaxsft.data.minhash` (datasketch's MinHash, computed for many records at once).
* Contamination: `jaxsft.data.contamination` (n-gram overlap with evaluation items).
* Degenerate: an assistant turn that is empty (and calls no tool), or whose text is one short
  unit repeated (`'!!!!!!!!'`, `'ha ha ha ha'`; 8 or more characters without whitespace, the
  unit at most 16 characters long and seen at least 4 times).

Records are judged in order, against the records kept before them (across sources too): the
first of a group of duplicates is kept, and a removed record never becomes a reference. The
per-record work (parsing, words, hashes, signatures, n-gram lookups) runs in `num_proc` worker
processes on chunks of records; the order-dependent decisions run in this process, so results do
not depend on `num_proc`. Memory grows with the kept records only (their hashes, LSH keys and
signatures), never with the records themselves: records stream through.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import multiprocessing
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxsft.data.contamination import ContaminationIndex, EvalItem
from jaxsft.data.formats import to_messages
from jaxsft.data.messages import BadRecord
from jaxsft.data.minhash import Signature, SignatureRows, permutations, shingles, signatures
from jaxsft.data.normalize import record_text, word_hashes, words
from jaxsft.errors import UserError

REASONS = ('bad_record', 'empty_answer', 'degenerate', 'contaminated', 'exact_duplicate',
           'near_duplicate')
CHUNK = 512  # records per worker task
_LSH_WEIGHTS = (0.2, 0.8)  # (false positive, false negative): candidates are verified anyway

_REPEATED = re.compile(r'(.{1,16}?)\1{3,}', re.S)
_U32 = np.uint32


@dataclasses.dataclass(frozen=True)
class CleanSettings:
  """The `data.clean` section of a config (defaults in `jaxsft/config.py`), checked."""

  exact_dedup: bool
  near_dedup: bool
  near_threshold: float
  shingle_words: int
  num_perm: int
  seed: int
  degenerate: bool
  against: tuple[str, ...]
  ngram: int

  @classmethod
  def from_config(cls, clean: Any) -> CleanSettings:
    """Raises `UserError` naming the first `data.clean` value that cannot work."""
    def fail(key: str, need: str) -> None:
      raise UserError(f'config data.clean.{key}={clean[key]!r}: {need}; set it with '
                      f'--config.data.clean.{key}=... or in the config file.')

    for key in ('exact_dedup', 'near_dedup', 'degenerate'):
      if not isinstance(clean[key], bool):
        fail(key, 'must be True or False')
    threshold = clean['near_threshold']
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
        0 < threshold <= 1):
      fail('near_threshold', 'must be a Jaccard similarity in (0, 1], e.g. 0.7')
    for key, low in (('shingle_words', 1), ('num_perm', 16), ('ngram', 1), ('seed', 0)):
      if isinstance(clean[key], bool) or not isinstance(clean[key], int) or clean[key] < low:
        fail(key, f'must be an integer >= {low}')
    against = clean['against']
    if isinstance(against, str) or not all(isinstance(p, str) and p for p in against):
      fail('against', 'must be a list of evaluation files, e.g. "[\'eval/gsm8k.jsonl\']"')
    return cls(clean['exact_dedup'], clean['near_dedup'], float(threshold),
               clean['shingle_words'], clean['num_perm'], clean['seed'], clean['degenerate'],
               tuple(against), clean['ngram'])

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'against': list(self.against)}


def degenerate(messages: list[Mapping[str, Any]]) -> tuple[str, str] | None:
  """(reason, what) for an empty or degenerate answer, else None."""
  for i, message in enumerate(messages):
    if message.get('role') not in ('assistant', 'text'):
      continue
    content = message.get('content') or ''
    if not content.strip() and not message.get('tool_calls'):
      return 'empty_answer', f'message {i} ({message["role"]}) is empty'
    compact = ''.join(content.split())
    if len(compact) >= 8:
      match = _REPEATED.fullmatch(compact)
      if match:
        return 'degenerate', f'message {i} ({message["role"]}) is {match.group(1)!r} repeated'
  return None


@dataclasses.dataclass
class _Features:
  """What the workers compute for a chunk of records."""

  early: list[tuple[str, dict[str, Any]] | None]  # removal decided from the record alone
  exact: list[int]                                 # 64-bit hash of the words
  signature_rows: np.ndarray                       # row of `signatures` per record, -1: none
  signatures: np.ndarray                           # uint32 [rows, num_perm]


class _Worker:
  """The per-record work, in a worker process or in this one."""

  def __init__(self, settings: CleanSettings, index: ContaminationIndex | None,
               on_bad_record: str):
    self.settings = settings
    self.index = index
    self.on_bad_record = on_bad_record
    self.perms = permutations(settings.num_perm, settings.seed) if settings.near_dedup else None

  def __call__(self, task: tuple[list[Any], str, dict[str, str], int, str]) -> _Features:
    records, fmt, columns, first, label = task
    early: list[tuple[str, dict[str, Any]] | None] = []
    exact, tokens = [], []
    for offset, record in enumerate(records):
      try:
        messages = to_messages(record, fmt, columns)
      except BadRecord as error:
        if self.on_bad_record == 'error':
          raise BadRecord(f'{label}, record {first + offset}: {error} (set '
                          'data.on_bad_record="skip" to skip such records and count them)'
                          ) from None
        early.append(('bad_record', {'detail': str(error)}))
        exact.append(0)
        tokens.append([])
        continue
      found = degenerate(messages) if self.settings.degenerate else None
      record_words = words(record_text(messages))
      if found is None and self.settings.degenerate and not record_words:
        found = ('degenerate', 'the conversation has no words (letters or digits)')
      early.append((found[0], {'detail': found[1]}) if found else None)
      exact.append(int.from_bytes(hashlib.blake2b(' '.join(record_words).encode(),
                                                  digest_size=8).digest(), 'little'))
      tokens.append(record_words)
    lengths = np.array([len(t) for t in tokens], np.int64)
    flat = np.array(word_hashes([w for t in tokens for w in t]), np.uint64)
    if self.index is not None:
      for position, match in self.index.matches(flat, lengths).items():
        if early[position] is None:
          item, start, length = match
          early[position] = ('contaminated', {'eval': {
              'file': item.source, 'index': item.index,
              'ngram': ' '.join(tokens[position][start:start + length])}})
    rows = np.full(len(records), -1, np.int64)
    sigs = np.zeros((0, self.settings.num_perm), _U32)
    if self.perms is not None:
      wanted = np.array([e is None and n > 0 for e, n in zip(early, lengths)], bool)
      rows[wanted] = np.arange(int(wanted.sum()))
      hashes, starts = shingles(flat, lengths, wanted, self.settings.shingle_words)
      if len(starts):
        sigs = signatures(hashes, starts, self.perms)
    return _Features(early, exact, rows, sigs)


@dataclasses.dataclass
class Removal:
  reason: str
  detail: dict[str, Any]


class Cleaner:
  """Judges records in order against everything kept so far (all sources). Use as a context
  manager when `num_proc > 1` (it owns the worker pool)."""

  def __init__(self, settings: CleanSettings, eval_items: Iterable[EvalItem] = (), *,
               num_proc: int = 1, on_bad_record: str = 'skip'):
    self.settings = settings
    eval_items = list(eval_items)
    self.index = ContaminationIndex(eval_items, settings.ngram) if eval_items else None
    self.worker = _Worker(settings, self.index, on_bad_record)
    self.num_proc = num_proc
    self._pool = None
    self._exact: dict[int, int] = {}
    self._refs: list[tuple[str, int]] = []  # kept record -> (source, index)
    self._lsh = None
    self._signatures = None
    if settings.near_dedup:
      from datasketch import MinHashLSH  # pylint: disable=import-outside-toplevel
      self._lsh = MinHashLSH(threshold=settings.near_threshold, num_perm=settings.num_perm,
                             weights=_LSH_WEIGHTS)
      self._signatures = SignatureRows(settings.num_perm)
    self.counts: dict[str, dict[str, int]] = {}

  def __enter__(self) -> Cleaner:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._pool is not None:
      self._pool.terminate()
      self._pool.join()
      self._pool = None

  def _map(self, tasks: Iterator[tuple]) -> Iterator[_Features]:
    """Worker results in task order, at most 2 tasks per worker in flight (bounded memory)."""
    if self.num_proc <= 1:
      yield from map(self.worker, tasks)
      return
    if self._pool is None:
      # Workers run Python and numpy only, never JAX; fork shares the contamination index.
      context = multiprocessing.get_context(
          'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn')
      self._pool = context.Pool(self.num_proc, _init_worker, (self.worker,))
    pending: collections.deque = collections.deque()
    for task in tasks:
      pending.append(self._pool.apply_async(_run_worker, (task,)))
      if len(pending) >= 2 * self.num_proc:
        yield pending.popleft().get()
    while pending:
      yield pending.popleft().get()

  def clean(self, records: Iterable[Any], source: str, fmt: str,
            columns: Mapping[str, str] | None = None
            ) -> Iterator[tuple[int, Any, Removal | None]]:
    """(index, record, removal or None) for each record of one source, in order."""
    counts = self.counts.setdefault(source, {'records': 0, 'kept': 0, **dict.fromkeys(REASONS, 0)})
    chunks: collections.deque = collections.deque()

    def tasks() -> Iterator[tuple]:
      chunk, first = [], 0
      for record in records:
        chunk.append(record)
        if len(chunk) == CHUNK:
          chunks.append(chunk)
          yield chunk, fmt, dict(columns or {}), first, source
          chunk, first = [], first + CHUNK
      if chunk:
        chunks.append(chunk)
        yield chunk, fmt, dict(columns or {}), first, source

    index = 0
    for features in self._map(tasks()):
      for offset, record in enumerate(chunks.popleft()):
        removal = self._judge(features, offset, source, index)
        counts['records'] += 1
        counts[removal.reason if removal else 'kept'] += 1
        yield index, record, removal
        index += 1

  def _judge(self, features: _Features, offset: int, source: str, index: int) -> Removal | None:
    early = features.early[offset]
    if early is not None:
      return Removal(*early)
    key = features.exact[offset]
    if self.settings.exact_dedup and key in self._exact:
      return Removal('exact_duplicate', {'duplicate_of': self._ref(self._exact[key])})
    row = features.signature_rows[offset]
    signature = features.signatures[row] if row >= 0 else None
    if self._lsh is not None and signature is not None:
      candidates = sorted(self._lsh.query(Signature(signature)))
      if candidates:
        similar = (self._signatures.data[candidates] == signature).mean(axis=1)
        best = int(np.argmax(similar))  # ties: the earliest kept record
        if similar[best] >= self.settings.near_threshold:
          return Removal('near_duplicate', {'duplicate_of': self._ref(candidates[best]),
                                            'similarity': round(float(similar[best]), 4)})
    kept = len(self._refs)
    self._refs.append((source, index))
    if self.settings.exact_dedup:
      self._exact.setdefault(key, kept)
    if self._lsh is not None and signature is not None:
      self._signatures.append(signature)
      self._lsh.insert(kept, Signature(signature), check_duplication=False)
    elif self._signatures is not None:
      self._signatures.append(np.zeros(self.settings.num_perm, _U32))  # keeps rows = kept ids
    return None

  def _ref(self, kept: int) -> dict[str, Any]:
    source, index = self._refs[kept]
    return {'source': source, 'index': index}

  def summary(self) -> dict[str, Any]:
    """Counts per reason, over all sources and per source."""
    total = {'records': 0, 'kept': 0, **dict.fromkeys(REASONS, 0)}
    for counts in self.counts.values():
      for key, value in counts.items():
        total[key] += value
    return {'records': total.pop('records'), 'kept': total.pop('kept'), 'removed': total,
            'sources': {source: {'records': c['records'], 'kept': c['kept'],
                                 'removed': {r: c[r] for r in REASONS}}
                        for source, c in self.counts.items()},
            'settings': self.settings.as_dict(),
            'eval_items': {'items': len(self.index.items) if self.index else 0,
                           'comparable': self.index.comparable if self.index else 0}}


_WORKER: _Worker | None = None


def _init_worker(worker: _Worker) -> None:
  global _WORKER  # pylint: disable=global-statement
  _WORKER = worker


def _run_worker(task: tuple) -> _Features:
  return _WORKER(task)


def summary_line(summary: Mapping[str, Any]) -> str:
  """`N records, K kept; removed: exact_duplicate 3, near_duplicate 1` (reasons with counts)."""
  removed = ', '.join(f'{reason} {count}' for reason, count in summary['removed'].items()
                      if count)
  return (f'{summary["records"]} records, {summary["kept"]} kept; removed: '
          f'{removed or "none"}')
