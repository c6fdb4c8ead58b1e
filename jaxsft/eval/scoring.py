"""Log-probabilities of continuations, many requests packed per row.

A request is `(tokens, continuation_length)`: the model reads `tokens[:-1]` and is scored on
predicting the last `continuation_length` tokens. Requests are packed into rows the way training
packs examples (segment ids keep them apart, positions restart), so a multiple-choice task with
short answers wastes no compute on padding, and every row of a call has one length: XLA compiles
one program per (row length, scored positions) bucket, a handful per task. The LM head runs only
at the scored positions (`return_hidden`), never over whole rows of context.

Rows are split over the `data` x `fsdp` axes of the variables' mesh when they have one; the
per-token results come back replicated, so every process of a multi-host run holds them all.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama, head_kernel
from jaxsft.parallel.batch import batch_sharding

MIN_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class Scored:
  """One request's result: the summed log-probability of its continuation (nats), whether
  every continuation token is the model's argmax, and the per-token log-probabilities."""

  logprob: float
  is_greedy: bool
  token_logprobs: tuple[float, ...]


def bucket(length: int, limit: int) -> int:
  """The smallest power of two >= `length` (at least `MIN_BUCKET`), at most `limit`."""
  size = MIN_BUCKET
  while size < length:
    size *= 2
  return max(min(size, limit), length)


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
  """First-fit decreasing: request indices per row, every row's lengths summing to at most
  `row_length`."""
  rows: list[list[int]] = []
  room: list[int] = []
  for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    for r, free in enumerate(room):
      if lengths[index] <= free:
        rows[r].append(index)
        room[r] -= lengths[index]
        break
    else:
      rows.append([index])
      room.append(row_length - lengths[index])
  return rows


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
    hidden_bkd = jnp.take_along_axis(hidden_btd, index_bk[..., None], axis=1)
    logits_bkv = jnp.einsum('bkd,dv->bkv', hidden_bkd, kernel,
                            preferred_element_type=jnp.float32)
  logits_bkv = logits_bkv.astype(jnp.float32)
  target_bk = jnp.take_along_axis(logits_bkv, targets_bk[..., None], axis=-1)[..., 0]
  logprob_bk = target_bk - jax.nn.logsumexp(logits_bkv, axis=-1)
  greedy_bk = jnp.argmax(logits_bkv, axis=-1) == targets_bk
  if out_sharding is not None:
    logprob_bk = jax.lax.with_sharding_constraint(logprob_bk, out_sharding)
    greedy_bk = jax.lax.with_sharding_constraint(greedy_bk, out_sharding)
  return logprob_bk, greedy_bk


def _mesh_of(variables: Any):
  for leaf in jax.tree_util.tree_leaves(variables):
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def score_requests(model_config: LlamaConfig, variables: Any,
                   requests: Sequence[tuple[Sequence[int], int]], *, rows_per_call: int = 8,
                   max_length: int | None = None, progress: Any = None) -> list[Scored]:
  """`Scored` for each `(tokens, continuation_length)`; `tokens` holds at least 2 ids and at
  most `max_length + 1` (left-truncate before)."""
  if not requests:
    return []
  limit = max_length or model_config.max_position_embeddings
  lengths = [len(tokens) - 1 for tokens, _ in requests]
  row_length = bucket(max(lengths), limit)
  rows = pack_rows(lengths, row_length)
  scored_per_row = max(sum(requests[i][1] for i in row) for row in rows)
  width = bucket(scored_per_row, row_length) if scored_per_row > 8 else 8
  mesh = _mesh_of(variables)
  rows_sharding = out_sharding = None
  if mesh is not None:
    split = mesh.shape['data'] * mesh.shape['fsdp']
    rows_per_call = -(-rows_per_call // split) * split
    rows_sharding = batch_sharding(mesh)
    out_sharding = NamedSharding(mesh, PartitionSpec())
  results: list[Scored | None] = [None] * len(requests)
  for start in range(0, len(rows), rows_per_call):
    chunk = rows[start:start + rows_per_call]
    arrays = _row_arrays(requests, chunk, rows_per_call, row_length, width)
    placed = [jax.device_put(a, rows_sharding) if rows_sharding is not None else a
              for a in arrays]
    logprob_bk, greedy_bk = _score(variables, *placed, model_config=model_config,
                                   out_sharding=out_sharding)
    logprob_bk, greedy_bk = np.asarray(logprob_bk), np.asarray(greedy_bk)
    for r, row in enumerate(chunk):
      k = 0
      for i in row:
        count = requests[i][1]
        token_logprobs = logprob_bk[r, k:k + count]
        results[i] = Scored(float(token_logprobs.sum()), bool(greedy_bk[r, k:k + count].all()),
                            tuple(float(x) for x in token_logprobs))
        k += count
      if progress is not None:
        progress.update(len(row))
  return results


def _row_arrays(requests, chunk, rows: int, row_length: int, width: int):
  inputs = np.zeros((rows, row_length), np.int32)
  positions = np.zeros_like(inputs)
  segments = np.zeros_like(inputs)
  index = np.zeros((rows, width), np.int32)
  targets = np.zeros((rows, width), np.int32)
  for r, row in enumerate(chunk):
    at, k = 0, 0
    for segment, i in enumerate(row, start=1):
      tokens, count = requests[i]
      n = len(tokens) - 1
      inputs[r, at:at + n] = tokens[:-1]
      positions[r, at:at + n] = np.arange(n)
      segments[r, at:at + n] = segment
      index[r, k:k + count] = np.arange(at + n - count, at + n)
      targets[r, k:k + count] = tokens[-count:]
      at, k = at + n, k + count
  return inputs, positions, segments, index, targets
