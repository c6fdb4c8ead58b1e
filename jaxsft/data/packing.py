"""Examples -> fixed-length packed rows; and the length policy that comes first.

An example `{'input_ids', 'loss_mask'}` of n tokens becomes n - 1 positions of a row: inputs
`ids[:-1]`, targets `ids[1:]`, loss mask `loss_mask[1:]` (a target is trained iff its token is
supervised). Examples are never split across rows. Rows carry `segment_ids` (1, 2, ... per
example, 0 for padding) and `positions` restarting at 0 per example, so attention and RoPE
treat each example as if it were alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from sortedcontainers import SortedList

from jaxsft.errors import UserError

STRATEGIES = ('bfd', 'greedy', 'none')
OVERLONG_POLICIES = ('truncate', 'drop')
ROW_KEYS = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')


@dataclasses.dataclass
class LengthStats:
  """What the length policy did; logged by the pipeline and `jaxsft data inspect`."""

  kept: int = 0
  truncated: int = 0
  dropped: int = 0
  dropped_unsupervised: int = 0  # no supervised token at all (even before truncation)


def fit_length(example: dict[str, list[int]], max_tokens: int, policy: str = 'truncate'
               ) -> dict[str, list[int]] | None:
  """Applies the length policy to one example; None means drop it.

  `example`: `{'input_ids', 'loss_mask'}`, equal-length sequences of n tokens (as
  `encode_messages` returns). Returns an example of at most `max_tokens` tokens (a row of
  `seq_len` positions holds `seq_len + 1` tokens), or None when `policy` is `drop` and it is
  longer, or when no token after the first is supervised (nothing to train on, at any length).
  `truncate` cuts the response side first (the tail); when the prompt alone fills the budget it
  cuts the prompt's start instead, so the example keeps supervised tokens (up to half the
  budget). An example whose tokens fit is returned unchanged.
  """
  if policy not in OVERLONG_POLICIES:
    raise UserError(f'overlong policy {policy!r}; choose one of {OVERLONG_POLICIES}.')
  ids, mask = example['input_ids'], example['loss_mask']
  supervised = np.flatnonzero(np.asarray(mask[1:])) + 1
  if not len(supervised):
    return None
  if len(ids) <= max_tokens:
    return example
  if policy == 'drop':
    return None
  first_supervised = int(supervised[0])
  if first_supervised < max_tokens - 1:
    start = 0
  else:
    keep_response = min(len(ids) - first_supervised, max_tokens // 2)
    start = first_supervised + keep_response - max_tokens
  return {'input_ids': ids[start:start + max_tokens], 'loss_mask': mask[start:start + max_tokens]}


def apply_length_policy(examples: Sequence[dict[str, list[int]]], max_tokens: int,
                        policy: str = 'truncate') -> tuple[list[dict[str, list[int]]], LengthStats]:
  """`fit_length` over examples (`{'input_ids', 'loss_mask'}` of n_i tokens each): the kept
  examples in order, each at most `max_tokens` tokens, and counts of what was kept, truncated,
  dropped for length and dropped for having no supervised token."""
  stats = LengthStats()
  kept = []
  for example in examples:
    fitted = fit_length(example, max_tokens, policy)
    if fitted is None:
      if not np.any(np.asarray(example['loss_mask'][1:])):
        stats.dropped_unsupervised += 1
      else:
        stats.dropped += 1
      continue
    stats.truncated += fitted is not example
    stats.kept += 1
    kept.append(fitted)
  return kept, stats


def assign_rows(lengths: Sequence[int], capacity: int, strategy: str = 'bfd') -> list[list[int]]:
  """Groups example indices into rows whose lengths sum to at most `capacity`.

  `bfd`: best-fit decreasing, O(n log n): longest first, each into the fullest row it fits.
  `greedy`: first-fit in the given order. `none`: one example per row.
  """
  if strategy not in STRATEGIES:
    raise UserError(f'packing strategy {strategy!r}; choose one of {STRATEGIES}.')
  empty = [i for i, n in enumerate(lengths) if n < 1]
  if empty:
    raise UserError(f'{len(empty)} examples have fewer than 2 tokens (nothing to predict), e.g. '
                    f'index {empty[0]}; apply the length policy first.')
  too_long = [i for i, n in enumerate(lengths) if n > capacity]
  if too_long:
    raise UserError(f'{len(too_long)} examples are longer than the row ({capacity} tokens), '
                    f'e.g. index {too_long[0]} with {lengths[too_long[0]]}; apply the length '
                    'policy first.')
  if strategy == 'none':
    return [[i] for i in range(len(lengths))]
  if strategy == 'greedy':
    return _first_fit(lengths, capacity)
  return _best_fit_decreasing(lengths, capacity)


def _best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  rows: list[list[int]] = []
  # (free space, row id), sorted; the first entry with space >= n is the best fit. SortedList
  # keeps insertions and removals O(log n), where bisect.insort on a list shifts O(n) entries.
  free = SortedList()
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    n = lengths[i]
    slot = free.bisect_left((n, -1))
    if slot == len(free):
      rows.append([i])
      free.add((capacity - n, len(rows) - 1))
    else:
      space, row = free.pop(slot)
      rows[row].append(i)
      free.add((space - n, row))
  return rows


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """First fit with a max-segment-tree over rows' free space: O(n log n)."""
  size = 1
  while size < max(1, len(lengths)):
    size *= 2
  tree = np.zeros(2 * size, np.int64)  # leaves: free space of row r (0 until the row opens)
  rows: list[list[int]] = []
  for i, n in enumerate(lengths):
    if tree[1] >= n:
      node = 1
      while node < size:
        node = 2 * node if tree[2 * node] >= n else 2 * node + 1
      row = node - size
      rows[row].append(i)
    else:
      row = len(rows)
      rows.append([i])
      node = row + size
      tree[node] = capacity
    node = row + size
    tree[node] -= n
    node //= 2
    while node:
      tree[node] = max(tree[2 * node], tree[2 * node + 1])
      node //= 2
  return rows


def pack(examples: Sequence[dict[str, list[int]]], seq_len: int, strategy: str = 'bfd'
         ) -> dict[str, np.ndarray]:
  """Packs examples into rows that never let one example see another.

  `examples`: `{'input_ids', 'loss_mask'}` of n_i tokens each, 2 <= n_i <= `seq_len + 1` (apply
  the length policy first); an example takes n_i - 1 positions of a row. `strategy`: `bfd`
  (best-fit decreasing), `greedy` (first fit in order) or `none` (one example per row).
  Returns int32 arrays `[R, seq_len]` under the keys of `ROW_KEYS`: `inputs` (ids[:-1]),
  `targets` (ids[1:]), `loss_mask` (loss_mask[1:], 1 = trained), `segment_ids` (1, 2, ... per
  example in its row, 0 for padding) and `positions` (0.. per example, 0 in padding). Every row
  holds at least one example; R is the number of rows the strategy needs.
  """
  lengths = [len(e['input_ids']) - 1 for e in examples]
  return fill_rows(examples, assign_rows(lengths, seq_len, strategy), seq_len)


def fill_rows(examples: Sequence[dict[str, Sequence[int]]], rows: Sequence[Sequence[int]],
              seq_len: int) -> dict[str, np.ndarray]:
  """Lays out `rows` (lists of indices into `examples`) as int32 arrays `[len(rows), seq_len]`;
  an empty row is all padding."""
  out = {key: np.zeros((len(rows), seq_len), np.int32) for key in ROW_KEYS}
  for r, members in enumerate(rows):
    start = 0
    for segment, i in enumerate(members, start=1):
      ids, mask = examples[i]['input_ids'], examples[i]['loss_mask']
      n = len(ids) - 1
      end = start + n
      if end > seq_len:
        raise ValueError(f'row {r} holds {end} positions, more than seq_len={seq_len}.')
      out['inputs'][r, start:end] = ids[:-1]
      out['targets'][r, start:end] = ids[1:]
      out['loss_mask'][r, start:end] = mask[1:]
      out['segment_ids'][r, start:end] = segment
      out['positions'][r, start:end] = np.arange(n)
      start = end
  return out


def packing_efficiency(rows: dict[str, np.ndarray]) -> float:
  """Real (non-padding, `segment_ids` > 0) positions / capacity (R x T) of packed rows
  (`[R, T]` arrays, as `pack` returns); a fraction in [0, 1], 0.0 for no rows."""
  return float((rows['segment_ids'] > 0).mean()) if rows['segment_ids'].size else 0.0


def pad_rows(rows: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Packed rows with empty rows appended so that their count is a multiple of `multiple`.

  `rows`: arrays `[R, T]` (as `pack` returns; any key, any trailing shape, equal R).
  `multiple`: rows a global batch must divide into, e.g. the mesh's data x fsdp devices.
  Returns arrays `[R + p, T]`, p = -R mod `multiple`, of the same keys and dtypes: rows 0..R-1
  are `rows` (not modified; the same dict when p = 0), rows R.. are all zeros, i.e. padding
  exactly as the padding inside a row: `segment_ids` 0 and `loss_mask` 0, so they add nothing to
  the loss and no real token attends to them. The real rows are the first R (`pack` never makes
  an empty row, so a row is padding iff its `segment_ids` are all 0), as in the last batch of
  `Pipeline.eval_batches`.
  """
  if multiple < 1:
    raise ValueError(f'multiple={multiple}; rows can only be padded to a multiple >= 1.')
  counts = {key: value.shape[0] for key, value in rows.items()}
  if len(set(counts.values())) > 1:
    raise ValueError(f'rows disagree on their number of rows: {counts}.')
  count = next(iter(counts.values()), 0)
  missing = -count % multiple
  if not missing:
    return rows
  # Zeros are the padding of every key: `fill_rows` writes the same into a row's empty tail.
  return {key: np.concatenate([value, np.zeros((missing,) + value.shape[1:], value.dtype)])
          for key, value in rows.items()}
