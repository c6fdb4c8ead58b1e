"""Batch sharding: the rows of a global batch split over the `data` x `fsdp` mesh axes, each
process holding its own rows."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = (('data', 'fsdp'), None)  # rows over data x fsdp, the sequence whole


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of every `[rows, T]` batch array on `mesh`."""
  return NamedSharding(mesh, PartitionSpec(*BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> one global array per key (rows of all processes, in order)."""
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local.items()}
