"""Scoring requests that share a context (the choices of a multiple-choice question), each
context read once, everything packed.

A call holds `B` cache rows of length `P`, each packed with whole contexts (segment ids 1..m,
positions restarting), prefilled into a KV cache (`decode=True`). Choice `j` of every context
of cache row `r` goes into continuation row `(r, j)`, each continuation carrying its context's
segment id and continuing its positions; the continuation rows are read against copies of their
cache row. A continuation therefore sees its own context and its own earlier tokens, and nothing
of the other contexts or choices, as if read alone. Its first token is predicted by the
context's last position in the prefill, the others by the continuation's own positions. The LM
head runs at those positions only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.eval.rows import (
    Scored,
    bucket,
    head_logits,
    pack_two_budgets,
    placement,
    put,
    target_logprobs,
)
from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama, head_kernel


def _cache_rows(cache: Any, rows: jax.Array, scanned: bool) -> Any:
  """The KV cache with its batch rows gathered (`rows`); the index scalar(s) as they are."""
  axis = 1 if scanned else 0
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if 'cache_index' in jax.tree_util.keystr(path) else
      jnp.take(x, rows, axis=axis), cache)


@functools.partial(jax.jit, static_argnames=('model_config', 'out_sharding'))
def _score(variables: Any, context_bp, context_pos_bp, context_seg_bp, last_bm, first_bmj,
           owner_q, cont_qc, cont_pos_qc, cont_seg_qc, next_qc, *, model_config: LlamaConfig,
           out_sharding: Any = None):
  """First-token scores `[B, M, J]` (context m of cache row b, choice j) and in-continuation
  scores `[Q, C]` (each continuation position predicting the next token of its continuation)."""
  model = Llama(model_config, decode=True)
  b, p = context_bp.shape
  c = cont_qc.shape[1]
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((b, p + c),
                                                                          jnp.int32)))['cache']
  cache = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  hidden_bpd, mutated = model.apply({**variables, 'cache': cache}, context_bp, context_pos_bp,
                                    context_seg_bp, return_hidden=True, mutable=['cache'])
  cache = _cache_rows(mutated['cache'], owner_q, model_config.scanned)
  hidden_qcd, _ = model.apply({**variables, 'cache': cache}, cont_qc, cont_pos_qc, cont_seg_qc,
                              return_hidden=True, mutable=['cache'])
  kernel = head_kernel(model_config, variables)
  last_bmd = jnp.take_along_axis(hidden_bpd, last_bm[..., None], axis=1)
  first = target_logprobs(head_logits(last_bmd, kernel), first_bmj)
  following = [x[..., 0] for x in target_logprobs(head_logits(hidden_qcd, kernel),
                                                   next_qc[..., None])]
  outputs = (*first, *following)
  if out_sharding is not None:
    outputs = tuple(jax.lax.with_sharding_constraint(x, out_sharding) for x in outputs)
  return outputs


def score_shared(model_config: LlamaConfig, variables: Any,
                 requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                 groups: list[list[int]], rows_per_call: int, progress: Any = None
                 ) -> dict[int, Scored]:
  """`Scored` of every request in `groups` (lists of request indices with one context)."""
  # Continuation rows per cache row: the usual number of choices. A larger group (the same
  # question twice in a task) is split, each part reading the context once.
  sizes = [len(g) for g in groups]
  choices = max(set(sizes), key=sizes.count)
  groups = [g[k:k + choices] for g in groups for k in range(0, len(g), choices)]
  context_length = [len(requests[g[0]][0]) for g in groups]
  continuation_need = [max(len(requests[i][1]) for i in g) for g in groups]
  p = bucket(max(context_length))
  # Continuation rows as long as the contexts of a cache row need on average, so that neither
  # kind of row is mostly padding.
  ratio = sum(continuation_need) / sum(context_length)
  c = bucket(max(max(continuation_need), int(np.ceil(p * ratio))), smallest=8)
  rows = [[groups[i] for i in row] for row in pack_two_budgets(context_length, p,
                                                             continuation_need, c)]
  contexts_per_row = max(len(row) for row in rows)
  rows_per_call, rows_sharding, out_sharding = placement(variables, rows_per_call)
  out: dict[int, Scored] = {}
  for start in range(0, len(rows), rows_per_call):
    chunk = rows[start:start + rows_per_call]
    arrays, layout = _arrays(requests, chunk, rows_per_call, p, c, contexts_per_row, choices)
    context_arrays = put(arrays[:5], rows_sharding)
    results = _score(variables, *context_arrays, *arrays[5:], model_config=model_config,
                     out_sharding=out_sharding)
    first_lp, first_greedy, next_lp, next_greedy = (np.asarray(x) for x in results)
    for i, (r, m, j, q, offset, n) in layout.items():
      token_logprobs = (float(first_lp[r, m, j]),
                        *(float(x) for x in next_lp[q, offset:offset + n - 1]))
      greedy = bool(first_greedy[r, m, j]) and bool(next_greedy[q, offset:offset + n - 1].all())
      out[i] = Scored(float(sum(token_logprobs)), greedy, token_logprobs)
    if progress is not None:
      progress.update(len(layout))
  return out


def _arrays(requests, chunk, b: int, p: int, c: int, m: int, choices: int):
  """The call's arrays, and where each request's scores are: request index -> (cache row,
  context slot, choice, continuation row, offset in it, continuation length)."""
  q = b * choices
  context = np.zeros((b, p), np.int32)
  context_pos, context_seg = np.zeros_like(context), np.zeros_like(context)
  last = np.zeros((b, m), np.int32)
  first = np.zeros((b, m, choices), np.int32)
  owner = np.repeat(np.arange(b, dtype=np.int32), choices)
  cont = np.zeros((q, c), np.int32)
  cont_pos, cont_seg, following = np.zeros_like(cont), np.zeros_like(cont), np.zeros_like(cont)
  fill = np.zeros((q,), np.int64)
  layout = {}
  for r, row in enumerate(chunk):
    at = 0
    for slot, members in enumerate(row):
      tokens = requests[members[0]][0]
      n_ctx = len(tokens)
      context[r, at:at + n_ctx] = tokens
      context_pos[r, at:at + n_ctx] = np.arange(n_ctx)
      context_seg[r, at:at + n_ctx] = slot + 1
      last[r, slot] = at + n_ctx - 1
      at += n_ctx
      for j, i in enumerate(members):
        continuation = requests[i][1]
        n = len(continuation)
        row_q = r * choices + j
        offset = int(fill[row_q])
        first[r, slot, j] = continuation[0]
        cont[row_q, offset:offset + n] = continuation
        cont_pos[row_q, offset:offset + n] = n_ctx + np.arange(n)
        cont_seg[row_q, offset:offset + n] = slot + 1
        following[row_q, offset:offset + n - 1] = continuation[1:]
        fill[row_q] += n
        layout[i] = (r, slot, j, row_q, offset, n)
  return (context, context_pos, context_seg, last, first, owner, cont, cont_pos, cont_seg,
          following), layout
