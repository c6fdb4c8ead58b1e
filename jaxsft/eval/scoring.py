"""Log-probabilities of continuations: shared contexts read once, the rest packed per row.

A request is `(context, continuation)` token lists: the model reads `context + continuation`
(less its last token) and is scored on predicting the continuation. Three paths, all running
the LM head only at the scored positions (`return_hidden`), never over whole rows of context:
- Requests that share their context (the choices of a multiple-choice question) read it once,
  as a tree in a row (`eval.tree_scoring`: the context, then each continuation seeing the
  context and itself only). A four-choice question costs one context, not four.
- Shared contexts whose tree does not fit a row, or models with a sliding window (whose
  distances a tree's row order does not keep), read the context once through a KV cache
  (`eval.shared_scoring`) where that saves more than it costs.
- The rest are packed into rows the way training packs examples (segment ids keep them apart,
  positions restart), so short requests waste no compute on padding.
Every call of a path has one shape: XLA compiles a handful of programs per task, not one per
request.

Rows are split over the `data` x `fsdp` axes of the variables' mesh when they have one; the
per-token results come back replicated, so every process of a multi-host run holds them all.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.data.packing import assign_rows, fill_rows
from jaxsft.eval import rows as rows_lib
from jaxsft.eval.rows import (
    Scored,
    bucket,
    even_calls,
    head_logits,
    placement,
    put,
    round_up,
    target_logprobs,
)
from jaxsft.eval.shared_scoring import score_shared
from jaxsft.eval.tree_scoring import MAX_BITS, assign_groups, scored_width, tree_length
from jaxsft.eval.tree_scoring import row_arrays as tree_row_arrays
from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama, head_kernel


@functools.partial(jax.jit, static_argnames=('model_config', 'out_sharding'))
def _score(variables: Any, inputs_bt, positions_bt, segments_bt, index_bk, targets_bk, *,
           model_config: LlamaConfig, out_sharding: Any = None):
  """Log-probability of `targets_bk` at positions `index_bk` of each row, and whether each is
  the argmax (the first maximum, as `torch.argmax`)."""
  model = Llama(model_config)
  kernel = head_kernel(model_config, variables)
  if kernel is None:  # LoRA adapts the head: the model applies it over the whole row
    logits_btv = model.apply(variables, inputs_bt, positions_bt, segments_bt)
    logits_bkv = jnp.take_along_axis(logits_btv, index_bk[..., None], axis=1)
  else:
    hidden_btd = model.apply(variables, inputs_bt, positions_bt, segments_bt, return_hidden=True)
    logits_bkv = head_logits(jnp.take_along_axis(hidden_btd, index_bk[..., None], axis=1), kernel)
  logprob_bk, greedy_bk = (x[..., 0] for x in target_logprobs(logits_bkv, targets_bk[..., None]))
  if out_sharding is not None:
    logprob_bk = jax.lax.with_sharding_constraint(logprob_bk, out_sharding)
    greedy_bk = jax.lax.with_sharding_constraint(greedy_bk, out_sharding)
  return logprob_bk, greedy_bk


def score_requests(model_config: LlamaConfig, variables: Any,
                   requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   rows_per_call: int = 8, max_length: int | None = None,
                   progress: Any = None) -> list[Scored]:
  """`Scored` for each `(context, continuation)` (both non-empty); a request longer than
  `max_length + 1` tokens is left-truncated, as lm-eval's `hf` backend does."""
  limit = max_length or model_config.max_position_embeddings
  by_context: dict[tuple[int, ...], list[int]] = {}
  for i, (context, continuation) in enumerate(requests):
    if len(context) + len(continuation) <= limit + 1:
      by_context.setdefault(tuple(context), []).append(i)
  # A LoRA-adapted LM head has no dense kernel to apply at chosen positions: pack everything.
  shared = [members for members in by_context.values() if len(members) > 1] \
      if 'lm_head' not in variables.get('lora', {}) else []
  results: list[Scored | None] = [None] * len(requests)
  # Groups whose tree fits a row are read as trees (`eval.tree_scoring`); a model with a
  # sliding window measures distances in positions, which a tree's row order does not keep.
  trees = [g for g in shared if model_config.sliding_window is None and len(g) <= MAX_BITS
           and tree_length(requests[g[0]][0], [requests[i][1] for i in g]) <= limit]
  for i, scored in _score_trees(model_config, variables, requests, trees, rows_per_call, limit,
                                progress).items():
    results[i] = scored
  in_trees = {i for g in trees for i in g}
  shared = [g for g in shared if not in_trees.intersection(g)]
  if not _sharing_pays(requests, shared):
    shared = []
  in_shared = in_trees | {i for members in shared for i in members}
  packed = [i for i in range(len(requests)) if i not in in_shared]
  if shared:
    for i, scored in score_shared(model_config, variables, requests, shared, rows_per_call,
                                  progress).items():
      results[i] = scored
  window = limit + 1
  flat = [(list(requests[i][0]) + list(requests[i][1]))[-window:] for i in packed]
  for i, scored in zip(packed, _score_packed(
      model_config, variables, [(tokens, len(requests[i][1])) for i, tokens in zip(packed, flat)],
      rows_per_call, limit, progress)):
    results[i] = scored
  return results


def _sharing_pays(requests, groups: list[list[int]]) -> bool:
  """Whether reading each shared context once saves more than it costs. A continuation read
  against a cached context costs about twice a packed token (the cache row is copied for it and
  attended to whole), so sharing pays when the context tokens saved exceed the continuation
  tokens (measured on CPU: docs/benchmarks.md)."""
  saved = sum((len(g) - 1) * len(requests[g[0]][0]) for g in groups)
  continuations = sum(len(requests[i][1]) for g in groups for i in g)
  return bool(groups) and saved > continuations


def _score_trees(model_config: LlamaConfig, variables: Any, requests, trees: list[list[int]],
                 rows_per_call: int, limit: int, progress: Any) -> dict[int, Scored]:
  """Each group of `trees` (request indices sharing a context) read as one tree of a row."""
  if not trees:
    return {}
  groups = [(list(requests[g[0]][0]), [list(requests[i][1]) for i in g]) for g in trees]
  lengths = [tree_length(*group) for group in groups]
  row_length = bucket(max(lengths), limit)
  rows = assign_groups(lengths, [len(g) for g in trees], row_length)
  width = round_up(scored_width(groups, rows))
  rows_per_call, rows_sharding, out_sharding = placement(variables, rows_per_call)
  rows_per_call = even_calls(len(rows), rows_per_call, rows_lib.row_split(variables))
  tree_config = model_config.replace(segment_sets=True)
  results: dict[int, Scored] = {}
  for start in range(0, len(rows), rows_per_call):
    chunk = rows[start:start + rows_per_call]
    arrays, order = tree_row_arrays(groups, chunk, rows_per_call, row_length, width)
    with rows_lib.mesh_context(variables):
      logprob_bk, greedy_bk = _score(variables, *put(arrays, rows_sharding),
                                     model_config=tree_config, out_sharding=out_sharding)
    logprob_bk, greedy_bk = np.asarray(logprob_bk), np.asarray(greedy_bk)
    for r, runs in enumerate(order):
      counts = [len(groups[g][1][j]) for g, j in runs]
      for (g, j), scored in zip(runs, _split_row(logprob_bk[r], greedy_bk[r], counts)):
        results[trees[g][j]] = scored
      if progress is not None:
        progress.update(len(runs))
  return results


def _score_packed(model_config: LlamaConfig, variables: Any,
                  requests: Sequence[tuple[Sequence[int], int]], rows_per_call: int, limit: int,
                  progress: Any) -> list[Scored]:
  """`(tokens, continuation_length)` requests packed into rows."""
  if not requests:
    return []
  lengths = [len(tokens) - 1 for tokens, _ in requests]
  row_length = bucket(max(lengths), limit)
  rows = assign_rows(lengths, row_length, 'bfd')
  # As training lays out examples, with the continuation as the supervised part.
  examples = [{'input_ids': tokens, 'loss_mask': [0] * (len(tokens) - count) + [1] * count}
              for tokens, count in requests]
  scored_per_row = max(sum(requests[i][1] for i in row) for row in rows)
  width = round_up(scored_per_row)
  rows_per_call, rows_sharding, out_sharding = placement(variables, rows_per_call)
  rows_per_call = even_calls(len(rows), rows_per_call, rows_lib.row_split(variables))
  results: list[Scored | None] = [None] * len(requests)
  for start in range(0, len(rows), rows_per_call):
    chunk = rows[start:start + rows_per_call]
    arrays = _row_arrays(examples, chunk, rows_per_call, row_length, width)
    placed = put(arrays, rows_sharding)
    with rows_lib.mesh_context(variables):
      logprob_bk, greedy_bk = _score(variables, *placed, model_config=model_config,
                                     out_sharding=out_sharding)
    logprob_bk, greedy_bk = np.asarray(logprob_bk), np.asarray(greedy_bk)
    for r, row in enumerate(chunk):
      for i, scored in zip(row, _split_row(logprob_bk[r], greedy_bk[r],
                                           [requests[i][1] for i in row])):
        results[i] = scored
      if progress is not None:
        progress.update(len(row))
  return results


def _split_row(logprob_k: np.ndarray, greedy_k: np.ndarray, counts: Sequence[int]
               ) -> list[Scored]:
  """A row's scored positions, in order, cut into consecutive runs of `counts` tokens: one
  `Scored` per request."""
  out, k = [], 0
  for count in counts:
    token_logprobs = logprob_k[k:k + count]
    out.append(Scored(float(token_logprobs.sum()), bool(greedy_k[k:k + count].all()),
                      tuple(float(x) for x in token_logprobs)))
    k += count
  return out


def _row_arrays(examples, chunk, rows: int, row_length: int, width: int):
  """The packed rows of `chunk` (`data.packing.fill_rows`) and, per row, the positions of its
  continuation tokens `[rows, width]` (in request order) and the tokens they predict."""
  laid = fill_rows(examples, list(chunk) + [[]] * (rows - len(chunk)), row_length)
  index = np.zeros((rows, width), np.int32)
  targets = np.zeros((rows, width), np.int32)
  for r in range(len(chunk)):
    scored = np.flatnonzero(laid['loss_mask'][r])
    index[r, :len(scored)] = scored
    targets[r, :len(scored)] = laid['targets'][r, scored]
  return laid['inputs'], laid['positions'], laid['segment_ids'], index, targets
