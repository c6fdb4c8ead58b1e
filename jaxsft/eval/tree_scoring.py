"""Scoring the continuations of a shared context in one row: the context once, then each
continuation, each seeing the context and itself only.

A group (the choices of a multiple-choice question: one context, J continuations) is laid out
as `context, choice 1, ..., choice J` (each choice less its last token, which is only a
target), positions restarting at the context's length for every choice. The segment ids are
bit sets (`LlamaConfig.segment_sets`): choice j carries bit j, the context the union of its
choices' bits, so a choice attends to the context and to its own earlier tokens, and neither
the other choices nor the other groups of the row (whose bits differ). A row holds groups while
its tokens fit and its bits last (`MAX_BITS`). The first token of every choice is predicted
by the context's last position, the others by the choice's own positions; the LM head runs at
those positions only (`scoring._score`).

Against reading each request whole, a J-choice question costs its context once instead of J
times; against `shared_scoring` (contexts in a KV cache), nothing is copied and one program
reads everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxsft.eval.rows import pack_two_budgets

MAX_BITS = 30  # segment sets are int32: bit 31 stays clear, so every set is positive


def tree_length(context: Sequence[int], continuations: Sequence[Sequence[int]]) -> int:
  """Tokens a group takes in a row: the context, and each continuation less its last token."""
  return len(context) + sum(len(c) - 1 for c in continuations)


def assign_groups(lengths: Sequence[int], bits: Sequence[int], row_length: int
                  ) -> list[list[int]]:
  """Groups (by index) into rows with room for both their tokens and their bits."""
  return pack_two_budgets(lengths, row_length, bits, MAX_BITS)


def row_arrays(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
               rows: Sequence[Sequence[int]], num_rows: int, row_length: int, width: int
               ) -> tuple[list[np.ndarray], list[list[tuple[int, int]]]]:
  """`[inputs, positions, segment sets, scored index, targets]` for `rows` (group indices)
  padded to `num_rows`, and per row the `(group, choice)` of each run of scored positions, in
  order (choice j's run is as long as its continuation)."""
  inputs = np.zeros((num_rows, row_length), np.int32)
  positions = np.zeros((num_rows, row_length), np.int32)
  sets = np.zeros((num_rows, row_length), np.int32)
  index = np.zeros((num_rows, width), np.int32)
  targets = np.zeros((num_rows, width), np.int32)
  order: list[list[tuple[int, int]]] = []
  for r, row in enumerate(rows):
    at, bit, k = 0, 0, 0
    runs = []
    for g in row:
      context, continuations = groups[g]
      n = len(context)
      group_bits = ((1 << len(continuations)) - 1) << bit
      inputs[r, at:at + n] = context
      positions[r, at:at + n] = np.arange(n)
      sets[r, at:at + n] = group_bits
      last_context = at + n - 1
      at += n
      for j, continuation in enumerate(continuations):
        m = len(continuation)
        inputs[r, at:at + m - 1] = continuation[:-1]
        positions[r, at:at + m - 1] = np.arange(n, n + m - 1)
        sets[r, at:at + m - 1] = 1 << (bit + j)
        index[r, k] = last_context
        index[r, k + 1:k + m] = np.arange(at, at + m - 1)
        targets[r, k:k + m] = continuation
        runs.append((g, j))
        at += m - 1
        k += m
      bit += len(continuations)
    order.append(runs)
  return [inputs, positions, sets, index, targets], order


def scored_width(groups: Sequence[tuple[Any, Sequence[Sequence[int]]]],
                 rows: Sequence[Sequence[int]]) -> int:
  """The most scored positions of any row."""
  return max(sum(len(c) for g in row for c in groups[g][1]) for row in rows)
