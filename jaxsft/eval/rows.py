"""Shared pieces of the scorers: the result of a request, length buckets, first-fit packing,
and where a call's rows go on the variables' mesh."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxsft.parallel.batch import batch_sharding

MIN_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class Scored:
  """One request's result: the summed log-probability of its continuation (nats), whether
  every continuation token is the model's argmax, and the per-token log-probabilities."""

  logprob: float
  is_greedy: bool
  token_logprobs: tuple[float, ...]


def bucket(length: int, limit: int = 1 << 30, smallest: int = MIN_BUCKET) -> int:
  """The smallest power of two >= `length` (at least `smallest`), at most `limit`."""
  size = smallest
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


def mesh_of(variables: Any):
  for leaf in jax.tree_util.tree_leaves(variables):
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def placement(variables: Any, rows: int):
  """Rows per call rounded up to the devices that split them, the rows' sharding and the
  replicated output sharding, on the variables' mesh (all None without one)."""
  mesh = mesh_of(variables)
  if mesh is None:
    return rows, None, None
  split = mesh.shape['data'] * mesh.shape['fsdp']
  return -(-rows // split) * split, batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())


def put(arrays, sharding):
  return [jax.device_put(a, sharding) if sharding is not None else a for a in arrays]
