"""`jaxsft plan`: per-device memory of a run, from shapes alone.

The train step is lowered and compiled ahead of time from abstract shapes
(`jax.ShapeDtypeStruct`s with their shardings), so no weight is read or allocated; the shapes
come from the checkpoint's `config.json` when `model.path` is on disk, else from
`model.preset`. The report splits the per-device bytes into frozen weights (dense or 4-bit), trained weights, optimizer
state, and the compiled program's temporaries (activations, gradients, workspace), and gives a
verdict against a device memory size.

`lower_for_platform` exports the same step for another platform (`jaxsft plan --platform tpu`
on a CPU host): the program a TPU or GPU would compile, with the attention kernel chosen for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.adapters.quant import QuantizedKernel
from jaxsft.data.packing import ROW_KEYS
from jaxsft.errors import UserError
from jaxsft.models import attention as attention_lib
from jaxsft.parallel.batch import batch_sharding
from jaxsft.parallel.mesh import mesh_and_rules
from jaxsft.train.model_source import model_config_from
from jaxsft.train.optim import make_optimizer
from jaxsft.train.state import abstract_train_state, state_shardings
from jaxsft.train.step import jit_train_step
from jaxsft.train.settings import RunSettings
from jaxsft.train.validate import check_batch_layout

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


def _lowered_step(settings: RunSettings, devices: Any, platforms: Sequence[str] | None = None
                  ) -> Any:
  """The train step of a run lowered from abstract shapes (nothing allocated): for this
  host's devices (a `jax.stages.Lowered`), or exported for `platforms` (a
  `jax.export.Exported`). Returns `(lowered, abstract state, model config)`."""
  mesh, rules = mesh_and_rules(settings.mesh, devices)
  check_batch_layout(settings.batch_size, settings.step.grad_accum_steps, mesh)
  model_config, _ = model_config_from(settings.model, settings.lora, shapes_only=True)
  optimizer, schedule = make_optimizer(settings.optim, 1000)
  parts = {'lora': settings.lora, 'quant': settings.quant}
  state = abstract_train_state(model_config, optimizer, **parts)
  shardings = state_shardings(model_config, optimizer, mesh, rules, **parts)
  rows = batch_sharding(mesh)
  batch = {key: jax.ShapeDtypeStruct((settings.batch_size, settings.max_seq_len), jnp.int32,
                                     sharding=rows)
           for key in ROW_KEYS}
  state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jit_train_step(model_config, optimizer, shardings, rows, settings.step, schedule)
    if platforms is None:
      return step.lower(state, batch), state, model_config
    return jax.export.export(step, platforms=list(platforms))(state, batch), state, model_config


def plan(settings: RunSettings, devices: Any = None) -> MemoryPlan:
  """Compiles the train step of a run (`jaxsft.train.run.run_settings`) from abstract shapes
  and measures per-device memory (on `devices`, default all)."""
  lowered, state, _ = _lowered_step(settings, devices)
  compiled = lowered.compile()
  shardings = jax.tree_util.tree_map(lambda leaf: leaf.sharding, state)
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


def max_seq_len(settings: RunSettings, device_memory_gib: float, multiple: int = 256,
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
      cache[length] = plan(settings.with_max_seq_len(length), devices)
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



# Custom calls that show which fused attention kernel a lowered program holds.
_KERNEL_CALLS = {'splash': 'tpu_custom_call', 'cudnn': '__cudnn$fmha'}


@dataclasses.dataclass
class PlatformLowering:
  """The train step exported for a platform it may not run on here."""

  platform: str
  attention: str  # the kernel the step uses there (`jaxsft.models.attention.choose`)
  fallback_reason: str | None  # why the configured implementation does not serve, if it does not
  kernel_calls: int  # custom calls of a fused attention kernel in the program
  stablehlo_bytes: int


def lower_for_platform(settings: RunSettings, platform: str, devices: Any = None
                       ) -> PlatformLowering:
  """Exports the train step of a run for `platform` (`tpu`, `cuda`, `rocm` or `cpu`) with
  `jax.export`, from abstract shapes, on this host: the program a device of that kind would
  compile, with the attention kernel chosen for it. Raises what JAX raises where it cannot build
  a path without the device's plugin (cuDNN attention needs jax's CUDA plugin)."""
  if platform not in attention_lib.PLATFORMS:
    raise UserError(f'--platform {platform!r}; choose one of {attention_lib.PLATFORMS}.')
  with attention_lib.target_platforms([platform]):
    exported, _, model_config = _lowered_step(settings, devices, [platform])
  d, h = model_config.num_heads, model_config.head_dim
  seq = settings.max_seq_len
  q = jax.ShapeDtypeStruct((1, seq, d, h), model_config.dtype)
  k = jax.ShapeDtypeStruct((1, seq, model_config.num_kv_heads, h), model_config.dtype)
  chosen, reason = attention_lib.choose(model_config.attention_implementation, platform, q, k)
  text = exported.mlir_module()
  return PlatformLowering(platform=platform, attention=chosen, fallback_reason=reason,
                          kernel_calls=text.count(_KERNEL_CALLS.get(chosen, '\0')),
                          stablehlo_bytes=len(text.encode()))


def platform_report(lowering: PlatformLowering, implementation: str) -> str:
  lines = [f'train step lowered for {lowering.platform} (jax.export from shapes, '
           f'{lowering.stablehlo_bytes / 2**20:.1f} MiB of StableHLO)',
           f'  attention: {lowering.attention}'
           + (f' ({lowering.kernel_calls} fused-kernel calls in the program)'
              if lowering.attention in _KERNEL_CALLS else '')]
  if lowering.fallback_reason:
    lines.append(f'  model.attention_implementation={implementation!r} does not serve here: '
                 f'{lowering.fallback_reason}')
  lines.append('  memory: compiling needs the device; run `jaxsft plan` on one for the '
               'per-device figures.')
  return '\n'.join(lines)
