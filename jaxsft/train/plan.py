"""`jaxsft plan`: per-device memory of a run, from shapes alone.

The train step is lowered and compiled ahead of time from abstract shapes
(`jax.ShapeDtypeStruct`s with their shardings), so no weight is read or allocated; the shapes
come from the checkpoint's `config.json` when `model.path` is on disk, else from
`model.preset`. The report splits the per-device bytes into frozen weights (dense or 4-bit),
trained weights, optimizer state, and the compiled program's temporaries (activations,
gradients, workspace), and gives a verdict against a device memory size. `max_seq_len` searches
the longest row that fits (to 4M tokens, in a few compiles).

`jaxsft plan --devices N` plans for N devices (a slice) on a host that has fewer: the CLI starts
JAX with N fake CPU host devices, so the mesh, the shardings and the per-device bytes are those
of N devices, as XLA:CPU compiles the step (`devices_note` says so in the report).

`lower_for_platform` exports the same step for another platform (`jaxsft plan --platform tpu`
on a CPU host): the program a TPU or GPU would compile, with the attention kernel chosen for it.
"""

from __future__ import annotations

import dataclasses
import os
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
from jaxsft.parallel.context import context_layout
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
  check_batch_layout(settings.batch_size, settings.step.grad_accum_steps, mesh,
                     settings.max_seq_len)
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


# XLA:CPU's memory-minimizing schedule. Its default orders independent work for thread
# parallelism and keeps more of it live at once: the 1M-token LLaMA-3.1-8B plan of
# `docs/benchmarks.md` is 64.0 GiB per device under the default and 53.0 GiB under this. An
# accelerator's compiler schedules under the device's memory limit, so the memory-minimizing
# order is the better model of the program a plan is for (`docs/design.md`).
MEMORY_SCHEDULE_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def use_memory_schedule() -> bool:
  """Asks XLA:CPU for the memory-minimizing schedule (`MEMORY_SCHEDULE_FLAG` in `XLA_FLAGS`)
  where no backend has started yet (XLA reads its flags once, at the first backend); `jaxsft
  plan` calls it first. Returns whether this process's compiles use it. Training keeps the
  default schedule: it is the faster one on a CPU."""
  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge
  flags = os.environ.get('XLA_FLAGS', '')
  if MEMORY_SCHEDULE_FLAG not in flags.split() and not xla_bridge.backends_are_initialized():
    os.environ['XLA_FLAGS'] = f'{flags} {MEMORY_SCHEDULE_FLAG}'.strip()
  return MEMORY_SCHEDULE_FLAG in os.environ.get('XLA_FLAGS', '').split()


def schedule_note() -> str | None:
  """The line a plan compiled by XLA:CPU prints about the schedule its bytes come from (None on
  other backends)."""
  if jax.default_backend() != 'cpu':
    return None
  if MEMORY_SCHEDULE_FLAG in os.environ.get('XLA_FLAGS', '').split():
    return ("schedule: XLA:CPU's memory-minimizing order, as an accelerator's compiler "
            'schedules under its memory limit')
  return ("schedule: XLA:CPU's default order (more live at once than an accelerator's; "
          '`jaxsft plan` in a new process uses the memory-minimizing one)')


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


# The longest row `max_seq_len` searches by default: 4M tokens, past the 2M a long-context run on a
# slice may ask about.
SEARCH_LIMIT = 4 * 2 ** 20
# How many predicted probes the search makes before it bisects instead (memory far from linear in
# the row length: a compile whose strategy changes with it).
_PREDICTED_PROBES = 8


def search_resolution(length: int, multiple: int = 256) -> int:
  """How close `max_seq_len` brings its answer to the boundary near `length` tokens: 1 % of
  `length` rounded down to `multiple`, at least `multiple` (so below 51,200 tokens of 256, the
  exact answer)."""
  return max(multiple, length // 100 // multiple * multiple)


def max_seq_len(settings: RunSettings, device_memory_gib: float, multiple: int = 256,
                limit: int = SEARCH_LIMIT, devices: Any = None,
                cache: dict[int, MemoryPlan] | None = None) -> tuple[int, MemoryPlan | None]:
  """The longest `data.max_seq_len` (a multiple of `multiple`, at most `limit`) whose plan fits
  in `device_memory_gib`, and its plan; `(0, None)` when not even `multiple` fits.

  Each probe is a compile from shapes alone. Memory grows about linearly with the row length
  (attention saves O(T)), so the line through the plans of `multiple` and `8 * multiple` tokens
  predicts the answer. While every length planned fits, the next probe extends the line through
  the two longest (twice as far past the last at least each time it fits again); once one does
  not, it interpolates between the longest that fits and the shortest that does not (regula
  falsi with the Illinois rule, so a curve bent by quadratic attention or by a compile whose
  strategy changes with the length does not make it creep); after 8 such probes it bisects.
  It stops when the two are at most `search_resolution` apart: `multiple` below 51,200 tokens
  (the exact answer), above that 1 % of the answer rounded down to `multiple` (at 2M tokens,
  within about 20k). No probe comes nearer than that to either end, so a probe that lands just
  past the boundary ends the search: where memory is linear near the answer the prediction is
  exact and the search takes 4 compiles at any length, else about 5 to 10 (bisecting to
  `multiple`, the search before this one took 12 to 17 on such curves).
  Pass the same `cache` to searches of one config for several device sizes to share the plans.
  """
  budget = device_memory_gib * GIB
  cache = {} if cache is None else cache
  limit = limit // multiple * multiple

  def measure(length: int) -> MemoryPlan:
    if length not in cache:
      cache[length] = plan(settings.with_max_seq_len(length), devices)
    return cache[length]

  def total(length: int) -> int:
    return measure(length).total_bytes

  good = multiple  # the longest length known to fit ...
  if limit < good or total(good) > budget:
    return 0, None
  bad = limit + multiple  # ... the shortest known not to: past the limit, never probed
  previous = good  # the length that fitted before `good`: the line's other point until `bad`
  second = min(8 * multiple, limit)
  if second > good:
    if total(second) <= budget:
      previous, good = good, second
    else:
      bad = second
  side, repeats, predicted = None, 0, 0  # the side the last probe landed on, how often in a row
  while bad - good > (resolution := search_resolution(good, multiple)):
    if predicted >= _PREDICTED_PROBES:
      probe = (good + bad) / 2
    elif bad <= limit:  # interpolate between the two ends (the Illinois rule: an end kept k
      # times in a row weighs 2**-k, so a bent curve does not pull every probe to one side)
      under = (budget - total(good)) * (0.5 ** repeats if side is False else 1.0)
      over = (total(bad) - budget) * (0.5 ** repeats if side is True else 1.0)
      probe = good + (bad - good) * under / (under + over)
    else:  # extrapolate the two longest that fit, 2**k resolutions on at least after k in a row
      slope = (total(good) - total(previous)) / (good - previous)
      probe = good + (budget - total(good)) / slope if slope > 0 else float('inf')
      probe = max(probe, good + resolution * 2 ** repeats)
    predicted += 1
    # A resolution from either end at least: a probe that lands on the far side of the boundary
    # then ends the search.
    probe = int(min(max(probe, good + resolution), bad - resolution)) // multiple * multiple
    landed = total(probe) <= budget
    if landed:
      previous, good = good, probe
    else:
      bad = probe
    repeats = repeats + 1 if landed == side else 0
    side = landed
  return good, measure(good)


def devices_note(devices: Sequence[Any] | None = None) -> str:
  """The line `jaxsft plan --devices N` prints first: how many devices the plan is for (`devices`,
  default all of this process's, as `plan` takes them) and what stands in for them."""
  devices = list(jax.devices() if devices is None else devices)
  count = f'{len(devices)} device{"s" if len(devices) != 1 else ""}'
  if devices[0].platform == 'cpu':
    kind = ('fake CPU host devices standing in for the device kind: the mesh and shardings of '
            f'{count}, per-device bytes as XLA:CPU compiles the step')
  else:
    kind = f'{devices[0].platform} devices of this host'
  return f'planned for {count} ({kind})'


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
  devices: int = 1  # the devices the exported program is partitioned for (the mesh's)
  context_devices: int = 1  # the devices each row's tokens are split over
  grouped_matmuls: int = 0  # `ragged_dot`s of mixture-of-experts layers (the TPU's kernel)


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
  mesh, rules = mesh_and_rules(settings.mesh, devices)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    context = context_layout(seq)
  chosen, reason = attention_lib.choose(model_config.attention_implementation, platform, q, k,
                                        context=context)
  text = exported.mlir_module()
  return PlatformLowering(platform=platform, attention=chosen, fallback_reason=reason,
                          kernel_calls=text.count(_KERNEL_CALLS.get(chosen, '\0')),
                          stablehlo_bytes=len(text.encode()), devices=exported.nr_devices,
                          context_devices=context.size if context else 1,
                          grouped_matmuls=text.count('stablehlo.ragged_dot') + text.count(
                              'chlo.ragged_dot'))


def platform_report(lowering: PlatformLowering, implementation: str) -> str:
  lines = [f'train step lowered for {lowering.platform} on {lowering.devices} '
           f'device{"s" if lowering.devices != 1 else ""} (jax.export from shapes, '
           f'{lowering.stablehlo_bytes / 2**20:.1f} MiB of StableHLO)',
           f'  attention: {lowering.attention}'
           + (f' ({lowering.kernel_calls} fused-kernel calls in the program)'
              if lowering.attention in _KERNEL_CALLS else '')
           + (f', context parallel: each row split over {lowering.context_devices} devices'
              if lowering.context_devices > 1 else '')]
  if lowering.grouped_matmuls:
    lines.append(f'  experts: {lowering.grouped_matmuls} grouped matmuls (ragged_dot) in the '
                 'program')
  if lowering.fallback_reason:
    lines.append(f'  model.attention_implementation={implementation!r} does not serve here: '
                 f'{lowering.fallback_reason}')
  lines.append('  memory: compiling needs the device; run `jaxsft plan` on one for the '
               'per-device figures.')
  return '\n'.join(lines)
