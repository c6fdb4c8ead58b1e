"""The train state: what it holds, the one function that builds it, and where its arrays live.

`TrainState(step, params, frozen, opt_state, rng)`: `params` is what the optimizer trains (all
weights, or the LoRA tree), `frozen` the base weights under LoRA (possibly 4-bit).

There is one definition of a fresh state, `_state_around(base)`: adapters, optimizer state,
step and key around a base. Everything else is derived from it:
  - `abstract_train_state` is `jax.eval_shape` of it (around a random base): shapes, dtypes;
  - `state_shardings` places that abstract state by the logical axes of the model's kernels;
  - `init_train_state` runs it jitted into those shardings, around a random base or around a
    checkpoint read tensor by tensor straight into its shards (and quantized as it is read),
    so no array is ever materialised unsharded and the loaded base is never copied.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsft.adapters import lora, quant
from jaxsft.adapters.targets import target_matcher
from jaxsft.errors import UserError
from jaxsft.interop import hf, peft
from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama
from jaxsft.parallel.mesh import logical_shardings, logical_to_mesh_spec
from jaxsft.train.model_source import execution_settings, model_config_from
from jaxsft.train.optim import make_optimizer
from jaxsft.train.validate import check_quant_config

FROZEN_DENSE_DTYPE = jnp.bfloat16  # QLoRA: the dense (unquantized) frozen weights
# The abstract state does not depend on the schedule's length; any positive count will do.
_SHAPE_STEPS = 1000


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar
  params: Any           # trained: full params, or the LoRA tree
  frozen: Any           # base params under LoRA; None for full fine-tuning
  opt_state: Any
  rng: jax.Array        # key for dropout and NEFTune

  def variables(self) -> dict[str, Any]:
    """Model variables: `{'params': ...}` or `{'params': frozen, 'lora': params}`."""
    if self.frozen is None:
      return {'params': self.params}
    return {'params': self.frozen, 'lora': self.params}


def abstract_adapters(config: Any, model_config: LlamaConfig) -> Any:
  """The LoRA tree of a run as boxed `ShapeDtypeStruct`s with logical axes."""
  return lora.abstract_lora(hf.abstract_params(model_config), list(config.lora.targets),
                            config.lora.rank,
                            modules_to_save=list(config.lora.modules_to_save))


def _keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(model init, LoRA init, train) keys, derived inside a jitted program from the integer
  seed: a key made on one process's device could not be placed on a mesh spanning processes."""
  init_key, lora_key, train_key = jax.random.split(jax.random.key(seed), 3)
  return init_key, lora_key, train_key


def _quantize_kernel_fn(config: Any):
  q = config.quant
  return functools.partial(quant.quantize_kernel, kind=q.kind, block_size=q.block_size,
                           double_quant=q.double_quant,
                           double_quant_rounding=q.double_quant_rounding)


def _frozen_leaf(config: Any, targeted, path: tuple[str, ...], array: jax.Array) -> Any:
  """A base weight as QLoRA keeps it: targeted kernels 4-bit, the rest (embeddings, norms, LM
  head) dense in `FROZEN_DENSE_DTYPE` (frozen, so bf16 is enough)."""
  if targeted(tuple(path)):
    return _quantize_kernel_fn(config)(array)
  return array.astype(FROZEN_DENSE_DTYPE)


def _random_base(config: Any, model_config: LlamaConfig) -> Any:
  """Freshly initialised base weights (4-bit where the run quantizes)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = nn.unbox(Llama(model_config).init(_keys(config.train.seed)[0], tokens)['params'])
  if not check_quant_config(config):
    return params
  targeted = target_matcher(list(config.quant.targets), 'quant.targets')
  flat = flax.traverse_util.flatten_dict(params, sep=None)
  return flax.traverse_util.unflatten_dict(
      {path: _frozen_leaf(config, targeted, path, leaf) for path, leaf in flat.items()})


def _state_around(config: Any, model_config: LlamaConfig,
                  optimizer: optax.GradientTransformation, base: Any) -> TrainState:
  """A fresh state around `base`: trained (full) or frozen under fresh adapters (LoRA)."""
  _, lora_key, train_key = _keys(config.train.seed)
  frozen, params = None, base
  if config.lora.enabled:
    frozen, params = base, lora.init_lora(lora_key, abstract_adapters(config, model_config),
                                          base)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                    opt_state=optimizer.init(params), rng=train_key)


def _fresh_state(config: Any, model_config: LlamaConfig,
                 optimizer: optax.GradientTransformation) -> TrainState:
  return _state_around(config, model_config, optimizer, _random_base(config, model_config))


def abstract_train_state(config: Any, model_config: LlamaConfig | None = None,
                         optimizer: optax.GradientTransformation | None = None) -> TrainState:
  """`jax.eval_shape` of the state `init_train_state` builds: shapes and dtypes, nothing
  allocated. Without `model_config`, the run's (`shapes_only`: a preset stands in for weights
  that are not on disk)."""
  if model_config is None:
    model_config, _ = model_config_from(config, shapes_only=True)
  optimizer = optimizer or make_optimizer(config.optim, _SHAPE_STEPS)[0]
  return jax.eval_shape(functools.partial(_fresh_state, config, model_config, optimizer))


def state_shardings(config: Any, model_config: LlamaConfig,
                    optimizer: optax.GradientTransformation, mesh: Mesh, rules: tuple
                    ) -> TrainState:
  """The `NamedSharding` of every leaf of the run's train state on `mesh`: weights and
  adapters by their logical axes (a 4-bit kernel's leaves like the kernel), optimizer moments
  like their parameters, counters and keys replicated."""
  abstract = abstract_train_state(config, model_config, optimizer)
  names = {path: leaf.names for path, leaf in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(hf.abstract_params(model_config)), sep=None).items()}
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(path, leaf):
    if isinstance(leaf, quant.QuantizedKernel):
      return quant.node_shardings(names[path], leaf, mesh, rules)
    return NamedSharding(mesh, logical_to_mesh_spec(names[path], leaf.shape, mesh, rules))

  base = abstract.frozen if config.lora.enabled else abstract.params
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(base), sep=None)
  base_shardings = flax.traverse_util.unflatten_dict(
      {path: place(path, leaf) for path, leaf in flat.items()})
  if config.lora.enabled:
    trained = logical_shardings(abstract_adapters(config, model_config), mesh, rules)
    frozen = base_shardings
  else:
    trained, frozen = base_shardings, None
  opt_state = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract.opt_state,
                                    trained, transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=trained, frozen=frozen, opt_state=opt_state,
                    rng=replicated)


def _base_of(state: TrainState, lora_enabled: bool) -> Any:
  return state.frozen if lora_enabled else state.params


def _with_base(state: TrainState, base: Any, lora_enabled: bool) -> TrainState:
  return dataclasses.replace(state, **{'frozen' if lora_enabled else 'params': base})


def init_train_state(config: Any, model_config: LlamaConfig, folder: str | None,
                     optimizer: optax.GradientTransformation, mesh: Mesh, rules: tuple
                     ) -> TrainState:
  """The initial state, every array created (or read) straight into `state_shardings`: around
  random weights, or around the checkpoint in `folder`; with the adapters of
  `lora.init_from` when set."""
  shardings = state_shardings(config, model_config, optimizer, mesh, rules)
  lora_enabled = bool(config.lora.enabled)
  if folder is None:
    state = jax.jit(functools.partial(_fresh_state, config, model_config, optimizer),
                    out_shardings=shardings)()
  else:
    base = _load_base(config, model_config, folder, mesh, rules, _base_of(shardings,
                                                                          lora_enabled))
    # The base is passed in and put back, not returned by the program: a returned input is
    # a copy, and the base is most of the state.
    around = lambda b: _with_base(  # noqa: E731
        _state_around(config, model_config, optimizer, b), None, lora_enabled)
    state = jax.jit(around, out_shardings=_with_base(shardings, None, lora_enabled))(base)
    state = _with_base(state, base, lora_enabled)
  if config.lora.enabled and config.lora.init_from:
    state = dataclasses.replace(state, params=_adapter_from_peft(config, model_config,
                                                                 shardings.params))
  return state


def _load_base(config: Any, model_config: LlamaConfig, folder: str, mesh: Mesh, rules: tuple,
               shardings: Any) -> Any:
  """The checkpoint's weights, each tensor read into its shards and, under QLoRA, quantized
  as soon as it is read: the dense model never exists whole. Frozen 4-bit bases load in bf16
  (checkpoints are bf16; half the transient bytes)."""
  transform = None
  load_dtype = model_config.param_dtype
  if check_quant_config(config):
    targeted = target_matcher(list(config.quant.targets), 'quant.targets')
    flat_shardings = flax.traverse_util.flatten_dict(shardings, sep=None)
    load_dtype = FROZEN_DENSE_DTYPE

    def transform(path, array):
      to_frozen = functools.partial(_frozen_leaf, config, targeted, tuple(path))
      return jax.jit(to_frozen, out_shardings=flat_shardings[tuple(path)])(array)

  _, params = hf.load_checkpoint(folder, dtype=load_dtype, mesh=mesh, rules=rules,
                                 config_overrides=execution_settings(model_config),
                                 transform=transform)
  return params


def _adapter_from_peft(config: Any, model_config: LlamaConfig, shardings: Any) -> Any:
  """The LoRA tree of a PEFT adapter folder (`lora.init_from`), checked against the config."""
  tree, adapter = peft.load_peft_adapter(config.lora.init_from,
                                         abstract_adapters(config, model_config),
                                         model_config.num_layers)
  for key, ours in (('r', config.lora.rank), ('lora_alpha', config.lora.alpha),
                    ('use_rslora', config.lora.rslora)):
    if key in adapter and adapter[key] != ours and not (
        isinstance(ours, float) and float(adapter[key]) == ours):
      raise UserError(f'lora.init_from={config.lora.init_from}: the adapter has {key}='
                      f'{adapter[key]} but the config says {ours}; make them equal.')
  return jax.tree_util.tree_map(jax.device_put, tree, shardings)
