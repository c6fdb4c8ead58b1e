"""`jaxsft plan`: per-device memory of a run, from shapes alone.

The train step is lowered and compiled ahead of time from abstract shapes
(`jax.ShapeDtypeStruct`s with their shardings), so no weight is read or allocated; the shapes
come from the checkpoint's `config.json` when `model.path` is on disk, else from
`model.preset`. The report
splits the per-device bytes into frozen weights (dense or 4-bit), trained weights, optimizer
state, and the compiled program's temporaries (activations, gradients, workspace), and gives a
verdict against a device memory size.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.adapters.quant import QuantizedKernel
from jaxsft.data.packing import ROW_KEYS
from jaxsft.parallel.batch import batch_sharding
from jaxsft.parallel.mesh import mesh_and_rules
from jaxsft.train.model_source import model_config_from
from jaxsft.train.optim import make_optimizer
from jaxsft.train.state import abstract_train_state, state_shardings
from jaxsft.train.step import jit_train_step
from jaxsft.train.validate import check_batch_layout, check_config

GIB = 1024 ** 3


def _device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (abstract arrays) under `shardings`."""
  total = 0
  for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    total += int(np.prod(sharding.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class MemoryPlan:
  frozen_bytes: int
  trained_bytes: int
  optimizer_bytes: int
  temporary_bytes: int
  frozen_parameters: int
  quantized_bits_per_parameter: float | None

  @property
  def total_bytes(self) -> int:
    return self.frozen_bytes + self.trained_bytes + self.optimizer_bytes + self.temporary_bytes


def plan(config: Any, devices: Any = None) -> MemoryPlan:
  """Compiles the train step from abstract shapes and measures per-device memory (on `devices`,
  default all)."""
  check_config(config)
  mesh, rules = mesh_and_rules(config.mesh, devices)
  check_batch_layout(config, mesh)
  model_config, _ = model_config_from(config, shapes_only=True)
  optimizer, schedule = make_optimizer(config.optim, 1000)
  state = abstract_train_state(config, model_config, optimizer)
  shardings = state_shardings(config, model_config, optimizer, mesh, rules)
  rows = batch_sharding(mesh)
  batch = {key: jax.ShapeDtypeStruct((config.batch_size, config.data.max_seq_len), jnp.int32,
                                     sharding=rows)
           for key in ROW_KEYS}
  state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jit_train_step(config, model_config, optimizer, schedule, shardings,
                                    rows).lower(state, batch).compile()
  analysis = compiled.memory_analysis()
  temporary = int(getattr(analysis, 'temp_size_in_bytes', 0) or 0)
  frozen_tree = state.frozen if state.frozen is not None else {}
  frozen_shardings = shardings.frozen if state.frozen is not None else {}
  kernels = [x for x in jax.tree_util.tree_leaves(
      state.frozen, is_leaf=lambda x: isinstance(x, QuantizedKernel))
             if isinstance(x, QuantizedKernel)] if state.frozen is not None else []
  bits = (8 * sum(k.nbytes() for k in kernels) / sum(int(np.prod(k.shape)) for k in kernels)
          if kernels else None)
  frozen_parameters = sum(int(np.prod(k.shape)) for k in jax.tree_util.tree_leaves(
      frozen_tree, is_leaf=lambda x: isinstance(x, QuantizedKernel)))
  return MemoryPlan(
      frozen_bytes=_device_bytes(frozen_tree, frozen_shardings),
      trained_bytes=_device_bytes(state.params, shardings.params),
      optimizer_bytes=_device_bytes(state.opt_state, shardings.opt_state),
      temporary_bytes=temporary, frozen_parameters=frozen_parameters,
      quantized_bits_per_parameter=bits)


def max_seq_len(config: Any, device_memory_gib: float, multiple: int = 256,
                limit: int = 131072, devices: Any = None,
                cache: dict[int, MemoryPlan] | None = None) -> tuple[int, MemoryPlan | None]:
  """The longest `data.max_seq_len` (a multiple of `multiple`, at most `limit`) whose plan fits
  in `device_memory_gib`, and its plan; `(0, None)` when not even `multiple` fits.

  Memory grows about linearly with the row length (attention saves O(T)), so two plans predict
  the answer and a few more confirm it, each a compile from shapes alone. Pass the same `cache`
  to searches of one config for several device sizes to share the plans.
  """
  budget = device_memory_gib * GIB
  cache = {} if cache is None else cache

  def measure(length: int) -> MemoryPlan:
    if length not in cache:
      probe = copy.deepcopy(config)
      probe.data.max_seq_len = length
      cache[length] = plan(probe, devices)
    return cache[length]

  def fits(length: int) -> bool:
    return measure(length).total_bytes <= budget

  low, high = multiple, 8 * multiple
  if not fits(low):
    return 0, None
  slope = max((measure(high).total_bytes - measure(low).total_bytes) / (high - low), 1.0)
  guess = low + int((budget - measure(low).total_bytes) / slope)
  guess = int(min(max(guess // multiple * multiple, low), limit))
  # Bracket the boundary around the linear prediction, widening the step each time, then
  # bisect: `good` always fits, `bad` never does.
  good, probe, step = low, guess, multiple
  while fits(probe):
    good = probe
    if probe >= limit:
      return probe, measure(probe)
    probe, step = min(probe + step, limit), step * 2
  bad = probe
  while bad - good > multiple:
    middle = (good + bad) // 2 // multiple * multiple
    if fits(middle):
      good = middle
    else:
      bad = middle
  return good, measure(good)


def report(memory: MemoryPlan, device_memory_gib: float | None) -> str:
  lines = ['per-device memory:',
           f'  frozen weights     {memory.frozen_bytes / GIB:9.3f} GiB'
           + (f'  ({memory.quantized_bits_per_parameter:.3f} bits per quantized parameter)'
              if memory.quantized_bits_per_parameter else ''),
           f'  trained weights    {memory.trained_bytes / GIB:9.3f} GiB',
           f'  optimizer state    {memory.optimizer_bytes / GIB:9.3f} GiB',
           f'  temporaries        {memory.temporary_bytes / GIB:9.3f} GiB  (activations, '
           'gradients, workspace of the compiled step)',
           f'  total              {memory.total_bytes / GIB:9.3f} GiB']
  if device_memory_gib:
    fits = memory.total_bytes <= device_memory_gib * GIB
    lines.append(f'verdict: {"fits" if fits else "does NOT fit"} in {device_memory_gib:g} GiB '
                 f'per device ({100 * memory.total_bytes / (device_memory_gib * GIB):.0f} %)')
  return '\n'.join(lines)

