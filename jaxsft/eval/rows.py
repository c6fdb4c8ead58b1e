"""Shared pieces of the scorers: the result of a request, length buckets, the log-probabilities
of targets, and where a call's rows go on the variables' mesh."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxsft.parallel.batch import batch_sharding
from jaxsft.parallel.mesh import DEFAULT_RULES

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


def target_logprobs(logits_nv: jax.Array, targets_nk: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """Log-probabilities (float32) of `targets_nk` (k targets per position) under `logits_nv`
  `[..., V]`, and whether each target is the argmax (the first maximum, as `torch.argmax`)."""
  logits_nv = logits_nv.astype(jnp.float32)
  chosen_nk = jnp.take_along_axis(logits_nv, targets_nk, axis=-1)
  logprob_nk = chosen_nk - jax.nn.logsumexp(logits_nv, axis=-1, keepdims=True)
  return logprob_nk, jnp.argmax(logits_nv, axis=-1)[..., None] == targets_nk


def head_logits(hidden_nd: jax.Array, kernel_dv: jax.Array) -> jax.Array:
  """The LM head at chosen positions only, accumulated in float32."""
  return jnp.einsum('...d,dv->...v', hidden_nd, kernel_dv, preferred_element_type=jnp.float32)


def mesh_of(variables: Any):
  for leaf in jax.tree_util.tree_leaves(variables):
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def mesh_context(variables: Any):
  """The variables' mesh and the default logical rules as the tracing context (a kernel that
  runs per device, like TPU splash attention, needs it to find its shards); a no-op without a
  mesh."""
  mesh = mesh_of(variables)
  if mesh is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(DEFAULT_RULES))
  return stack


def row_split(variables: Any) -> int:
  """How many devices of the variables' mesh split a call's rows (1 without a mesh)."""
  mesh = mesh_of(variables)
  return 1 if mesh is None else mesh.shape['data'] * mesh.shape['fsdp']


def placement(variables: Any, rows: int):
  """Rows per call rounded up to the devices that split them, the rows' sharding and the
  replicated output sharding, on the variables' mesh (all None without one)."""
  mesh = mesh_of(variables)
  if mesh is None:
    return rows, None, None
  split = row_split(variables)
  return -(-rows // split) * split, batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())


def even_calls(rows: int, rows_per_call: int, split: int = 1) -> int:
  """Rows per call for `rows` rows in as many calls as `rows_per_call` needs, spread evenly (a
  multiple of `split`, the devices that share the rows): 56 rows at 16 per call run as 4 calls
  of 14, not 3 of 16 and one of 8 padded to 16."""
  calls = max(1, -(-rows // rows_per_call))
  per_call = -(-rows // calls)
  return -(-per_call // split) * split


def round_up(value: int, multiple: int = 8) -> int:
  """`value` rounded up to a multiple of `multiple` (scored positions per row: the LM head runs
  at each, so a power-of-two bucket would waste up to half of them)."""
  return -(-value // multiple) * multiple


def pack_two_budgets(lengths: Sequence[int], capacity: int, needs: Sequence[int],
                     need_capacity: int) -> list[list[int]]:
  """Items (by index) into rows, longest first into the first row with room under both
  budgets (first-fit decreasing): `lengths` against `capacity` (tokens), `needs` against
  `need_capacity` (continuation tokens of a cache row, bits of a tree row)."""
  rows: list[list[int]] = []
  room: list[list[int]] = []
  for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    for r, (free, free_need) in enumerate(room):
      if lengths[index] <= free and needs[index] <= free_need:
        rows[r].append(index)
        room[r] = [free - lengths[index], free_need - needs[index]]
        break
    else:
      rows.append([index])
      room.append([capacity - lengths[index], need_capacity - needs[index]])
  return rows


def put(arrays, sharding):
  return [jax.device_put(a, sharding) if sharding is not None else a for a in arrays]
