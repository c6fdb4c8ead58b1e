"""Device meshes and the logical-axis rules that place parameters and activations on them.

Every parameter carries logical axis names (`('embed', 'mlp')`); one rules table maps them to
the mesh axes `('data', 'fsdp', 'context', 'tensor')`. Changing a parallelism strategy means
changing the table, never the model.

- `data`, `fsdp`: rows of a batch; `fsdp` also shards the weights (gathered per layer).
- `context`: the tokens of each row (context parallelism, `jaxsft.parallel.context`); the
  weights shard over it too, so `fsdp x context` devices hold one copy of the model between them.
- `tensor`: heads, the MLP's hidden units and the vocabulary (tensor parallelism).

A three-size shape `(data, fsdp, tensor)` still works and means `context=1`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsft.errors import UserError
from jaxsft.parallel.context import axis_names

_LOG = logging.getLogger(__name__)

MESH_AXES = ('data', 'fsdp', 'context', 'tensor')

# (logical name, mesh axes). Batch splits over data and fsdp (FSDP is data parallel with sharded
# weights), a row's tokens over context; weights shard their `embed` dim over fsdp and context
# and their head/mlp/vocab dim over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('act_batch', ('data', 'fsdp')),
    ('act_length', 'context'),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('layers', None),
    ('vocab', 'tensor'),
    # Mixture of experts: each device of the fsdp axis holds its own experts (a kernel
    # `[E, D, F]` is split on E, then D over `context`), before `embed` takes `fsdp` for the
    # dense kernels (the first rule whose mesh axes are free wins).
    ('expert', 'fsdp'),
    ('embed', ('fsdp', 'context')),
    ('embed', 'context'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('expert_router', None),  # the router's output: one logit per expert
    ('norm', None),
    ('lora_rank', None),
)


def full_mesh_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """`shape` as one size per axis of `MESH_AXES`: a three-size `(data, fsdp, tensor)` shape
  gets `context=1`. Raises `UserError` unless the sizes are integers, each >= 1 or -1 (at most
  one -1); whether the devices fit is `make_mesh`'s question."""
  shape = tuple(shape)
  if len(shape) not in (3, len(MESH_AXES)) or any(isinstance(s, bool) or not isinstance(s, int)
                                                  for s in shape):
    raise UserError(f'mesh shape {shape}: give four integer sizes for {MESH_AXES}, e.g. '
                    '(1, 1, 4, 1), or three for (data, fsdp, tensor) with context=1.')
  if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise UserError(f'mesh shape {shape}: each size must be >= 1, or -1 (at most one) for the '
                    'remaining devices.')
  return shape[:2] + (1,) + shape[2:] if len(shape) == 3 else shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1, 1), devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A `('data', 'fsdp', 'context', 'tensor')` mesh; one size may be -1 for "all remaining
  devices"; a three-size shape means `(data, fsdp, tensor)` with `context=1`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(full_mesh_shape(shape))
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise UserError(f'mesh shape {tuple(shape)}: {len(devices)} devices are not divisible '
                      f'by {known}.')
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise UserError(f'mesh shape {tuple(shape)} needs {math.prod(shape)} devices; '
                    f'{len(devices)} are available. Use -1 for one axis to take the rest.')
  try:
    device_grid = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, MESH_AXES)


def logical_to_mesh_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PartitionSpec:
  """The mesh `PartitionSpec` for an array of `shape` with these logical axes.

  A dimension that its mesh axes do not divide is replicated instead (with a warning): XLA
  cannot place uneven shards, and replication is always correct.
  """
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  resolved = []
  for dim, axes in zip(shape, spec):
    names = axis_names(axes)
    if len(names) > 1:  # ('fsdp', 'context') with context=1 is 'fsdp': the spec a reader expects
      names = tuple(name for name in names if mesh.shape[name] > 1) or names[:1]
      axes = names[0] if len(names) == 1 else names
    size = math.prod(mesh.shape[a] for a in names)
    if names and dim % size:
      _LOG.warning('dimension of size %d (logical axes %s) is not divisible by mesh axes %s of '
                   'size %d; replicating it.', dim, tuple(logical_axes), names, size)
      axes = None
    resolved.append(axes)
  return PartitionSpec(*resolved)


def unboxed(tree: Any) -> Any:
  """`tree` with its `nn.LogicallyPartitioned` boxes replaced by their values. Not `nn.unbox`:
  under a set mesh (`jax.set_mesh`, the context a train step is traced in) that also constrains
  each value to its sharding, which on the sharding-less `ShapeDtypeStruct`s of `eval_shape`
  raises "The sharding on the input must be a `NamedSharding`"; shapes need no constraint."""
  return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                                is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """`NamedSharding`s for a tree of `nn.LogicallyPartitioned` boxes (e.g. from `eval_shape` of
  `init`); leaves without logical names are replicated. Returns the unboxed tree's structure."""

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = logical_to_mesh_spec(leaf.names, leaf.value.shape, mesh, rules)
    else:
      spec = PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map(one, abstract_tree,
                                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """A device mesh: its `shape` over `MESH_AXES` (`('data', 'fsdp', 'context', 'tensor')`; one
  size may be -1 for the remaining devices; three sizes mean `(data, fsdp, tensor)` with
  `context=1`, and are stored as four) and `rules`, `(logical name, mesh axes)` pairs that
  override `DEFAULT_RULES`. A shape of other sizes raises `UserError` when made."""

  shape: tuple[int, ...] = (-1, 1, 1, 1)
  rules: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, 'shape', full_mesh_shape(self.shape))
    rules = []
    for rule in self.rules:
      name, axes = rule
      rules.append((name, tuple(axes) if isinstance(axes, list) else axes))
    object.__setattr__(self, 'rules', tuple(rules))

  def rules_table(self) -> tuple[tuple[str, Any], ...]:
    """`rules` first, then every `DEFAULT_RULES` entry they do not override."""
    overridden = {name for name, _ in self.rules}
    return self.rules + tuple(rule for rule in DEFAULT_RULES if rule[0] not in overridden)


def mesh_and_rules(settings: MeshSettings = MeshSettings(),
                   devices: Sequence[jax.Device] | None = None
                   ) -> tuple[Mesh, tuple[tuple[str, Any], ...]]:
  """The mesh of `settings` over `devices` (default: all) and its rules table
  (`MeshSettings.rules_table`), for `flax.linen.logical_axis_rules` and the sharding builders."""
  return make_mesh(settings.shape, devices), settings.rules_table()
