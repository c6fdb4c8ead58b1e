"""The train state: what it holds, the one function that builds it, and where its arrays live.

`TrainState(step, params, frozen, opt_state, rng, lora)`: `params` is what the optimizer trains
(all weights, or the LoRA tree), `frozen` the base weights under LoRA (possibly 4-bit), `lora`
the adapters' `LoraSettings` (static: not an array), so the scale travels with the adapters.

There is one definition of a fresh state, `_state_around(base)`: adapters, optimizer state,
step and key around a base. Everything else is derived from it:
  - `abstract_train_state` is `jax.eval_shape` of it (around a random base): shapes, dtypes;
  - `state_shardings` places that abstract state by the logical axes of the model's kernels;
  - `init_train_state` runs it jitted into those shardings, around a random base, a params tree,
    or a checkpoint read tensor by tensor straight into its shards (and quantized as it is
    read), so no array is ever materialised unsharded and the loaded base is never copied.

Every builder takes the part's own objects: a `LlamaConfig`, an optax optimizer, a mesh and
its rules, and `LoraSettings` / `QuantSettings` (None: full fine-tuning / dense weights).
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

from jaxsft.adapters import lora as lora_lib
from jaxsft.adapters.lora import LoraSettings
from jaxsft.adapters.quant import QuantizedKernel, QuantSettings, node_shardings
from jaxsft.errors import UserError
from jaxsft.interop import hf, peft
from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama
from jaxsft.parallel.mesh import logical_shardings, logical_to_mesh_spec, unboxed
from jaxsft.train.model_source import execution_settings

FROZEN_DENSE_DTYPE = jnp.bfloat16  # QLoRA: the dense (unquantized) frozen weights


@flax.struct.dataclass
class TrainState:
  """A train state (a pytree): `step` (int32 scalar, steps applied), `params` (what the
  optimizer trains: every weight, or the LoRA tree), `frozen` (the base under LoRA, with
  `QuantizedKernel` nodes under QLoRA; None for full fine-tuning), `opt_state`, `rng` (the key
  of dropout and NEFTune) and `lora` (the adapters' settings; static, None without LoRA)."""

  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array
  lora: LoraSettings | None = flax.struct.field(pytree_node=False, default=None)

  def variables(self) -> dict[str, Any]:
    """Model variables: `{'params': ...}` or `{'params': frozen, 'lora': params}`."""
    if self.frozen is None:
      return {'params': self.params}
    return {'params': self.frozen, 'lora': self.params}

  def model_config(self, model_config: LlamaConfig) -> LlamaConfig:
    """`model_config` applying this state's adapters (their scale and dropout), for
    `Llama(...).apply(state.variables(), ...)`."""
    return model_config.with_lora(self.lora)


def abstract_adapters(model_config: LlamaConfig, lora: LoraSettings) -> Any:
  """The LoRA tree of `lora` on this model as boxed `ShapeDtypeStruct`s with logical axes."""
  return lora_lib.abstract_lora(hf.abstract_params(model_config), lora)


def check_adaptation(lora: LoraSettings | None, quant_settings: QuantSettings | None) -> None:
  """4-bit base weights are frozen, so quantization needs LoRA adapters to train (QLoRA)."""
  if quant_settings is not None and lora is None:
    raise UserError(f'quant.kind={quant_settings.kind!r} freezes the base weights in 4 bits, so '
                    'only LoRA adapters can train; set lora.enabled=True (QLoRA).')


def _keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(model init, LoRA init, train) keys, derived inside a jitted program from the integer
  seed: a key made on one process's device could not be placed on a mesh spanning processes."""
  init_key, lora_key, train_key = jax.random.split(jax.random.key(seed), 3)
  return init_key, lora_key, train_key


def _frozen_leaf(quant_settings: QuantSettings, path: tuple[str, ...], array: jax.Array) -> Any:
  """A base weight as QLoRA keeps it: targeted kernels 4-bit, the rest (embeddings, norms, LM
  head) dense in `FROZEN_DENSE_DTYPE` (frozen, so bf16 is enough)."""
  if quant_settings.targeted(path):
    return quant_settings.quantize_kernel(array)
  return array.astype(FROZEN_DENSE_DTYPE)


def _as_frozen(quant_settings: QuantSettings | None, params: Any) -> Any:
  if quant_settings is None:
    return params
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep=None)
  return flax.traverse_util.unflatten_dict(
      {path: _frozen_leaf(quant_settings, path, leaf) for path, leaf in flat.items()})


def _random_base(model_config: LlamaConfig, quant_settings: QuantSettings | None, seed: int
                 ) -> Any:
  """Freshly initialised base weights (4-bit where the run quantizes)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = nn.unbox(Llama(model_config.with_lora(None)).init(_keys(seed)[0], tokens)['params'])
  return _as_frozen(quant_settings, params)


def _state_around(model_config: LlamaConfig, optimizer: optax.GradientTransformation,
                  lora: LoraSettings | None, seed: int, base: Any) -> TrainState:
  """A fresh state around `base`: trained (full) or frozen under fresh adapters (LoRA)."""
  _, lora_key, train_key = _keys(seed)
  frozen, params = None, base
  if lora is not None:
    frozen, params = base, lora_lib.init_lora(lora_key, abstract_adapters(model_config, lora),
                                              base)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                    opt_state=optimizer.init(params), rng=train_key, lora=lora)


def _fresh_state(model_config, optimizer, lora, quant_settings, seed) -> TrainState:
  return _state_around(model_config, optimizer, lora, seed,
                       _random_base(model_config, quant_settings, seed))


def abstract_train_state(model_config: LlamaConfig, optimizer: optax.GradientTransformation, *,
                         lora: LoraSettings | None = None,
                         quant: QuantSettings | None = None) -> TrainState:
  """`jax.eval_shape` of the state `init_train_state` builds: shapes and dtypes, nothing
  allocated (e.g. for memory plans and checkpoint sizes)."""
  check_adaptation(lora, quant)
  return jax.eval_shape(functools.partial(_fresh_state, model_config, optimizer, lora, quant, 0))


def state_shardings(model_config: LlamaConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules: tuple, *, lora: LoraSettings | None = None,
                    quant: QuantSettings | None = None) -> TrainState:
  """The `NamedSharding` of every leaf of the train state on `mesh` (a `TrainState` of
  shardings): weights and adapters by their logical axes under `rules` (a 4-bit kernel's leaves
  like the kernel), optimizer moments like their parameters, counters and keys replicated."""
  abstract = abstract_train_state(model_config, optimizer, lora=lora, quant=quant)
  names = {path: leaf.names for path, leaf in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(hf.abstract_params(model_config)), sep=None).items()}
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(path, leaf):
    if isinstance(leaf, QuantizedKernel):
      return node_shardings(names[path], leaf, mesh, rules)
    return NamedSharding(mesh, logical_to_mesh_spec(names[path], leaf.shape, mesh, rules))

  base = abstract.frozen if lora is not None else abstract.params
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(base), sep=None)
  base_shardings = flax.traverse_util.unflatten_dict(
      {path: place(path, leaf) for path, leaf in flat.items()})
  if lora is not None:
    trained = logical_shardings(abstract_adapters(model_config, lora), mesh, rules)
    frozen = base_shardings
  else:
    trained, frozen = base_shardings, None
  opt_state = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract.opt_state,
                                    trained, transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=trained, frozen=frozen, opt_state=opt_state,
                    rng=replicated, lora=lora)


def _base_of(state: TrainState) -> Any:
  return state.frozen if state.lora is not None else state.params


def _with_base(state: TrainState, base: Any) -> TrainState:
  return dataclasses.replace(state, **{'frozen' if state.lora is not None else 'params': base})


def init_train_state(model_config: LlamaConfig, optimizer: optax.GradientTransformation,
                     mesh: Mesh, rules: tuple, *, base: str | Any | None = None,
                     lora: LoraSettings | None = None, quant: QuantSettings | None = None,
                     seed: int = 0, adapters_from: str = '') -> TrainState:
  """The initial state, every array created (or read) straight into `state_shardings`.

  `base`: None (random weights from `seed`), an HF checkpoint folder (each tensor read into its
  shards, and quantized as it is read under `quant`), or a params tree (e.g. the second value
  of `jaxsft.interop.hf.load_checkpoint`), placed and quantized the same way. With `lora`, the
  base is frozen and fresh adapters (PEFT's initialisation, from `seed`) train; with
  `adapters_from`, a PEFT adapter folder of the same rank, alpha and targets, they start from it.
  """
  check_adaptation(lora, quant)
  shardings = state_shardings(model_config, optimizer, mesh, rules, lora=lora, quant=quant)
  if base is None:
    state = jax.jit(functools.partial(_fresh_state, model_config, optimizer, lora, quant, seed),
                    out_shardings=shardings)()
  else:
    if isinstance(base, (str, bytes)) or hasattr(base, '__fspath__'):
      base = _load_base(model_config, quant, str(base), mesh, rules, _base_of(shardings))
    else:
      base = _place_base(quant, base, _base_of(shardings))
    # The base is passed in and put back, not returned by the program: a returned input is
    # a copy, and the base is most of the state.
    around = lambda b: _with_base(  # noqa: E731
        _state_around(model_config, optimizer, lora, seed, b), None)
    state = jax.jit(around, out_shardings=_with_base(shardings, None))(base)
    state = _with_base(state, base)
  if lora is not None and adapters_from:
    state = dataclasses.replace(state, params=_adapter_from_peft(
        adapters_from, model_config, lora, shardings.params))
  return state


def _load_base(model_config: LlamaConfig, quant_settings: QuantSettings | None, folder: str,
               mesh: Mesh, rules: tuple, shardings: Any) -> Any:
  """The checkpoint's weights, each tensor read into its shards and, under QLoRA, quantized
  as soon as it is read: the dense model never exists whole. Frozen 4-bit bases load in bf16
  (checkpoints are bf16; half the transient bytes)."""
  transform = None
  load_dtype = model_config.param_dtype
  if quant_settings is not None:
    flat_shardings = flax.traverse_util.flatten_dict(shardings, sep=None)
    load_dtype = FROZEN_DENSE_DTYPE

    def transform(path, array):
      path = tuple(path)
      return _frozen_into(quant_settings, path, array, flat_shardings[path])

  _, params = hf.load_checkpoint(folder, dtype=load_dtype, mesh=mesh, rules=rules,
                                 config_overrides=execution_settings(model_config),
                                 transform=transform)
  return params


def _place_base(quant_settings: QuantSettings | None, params: Any, shardings: Any) -> Any:
  """A params tree placed in the base's shardings one leaf at a time: as given (dtypes kept)
  without `quant_settings`; under QLoRA as `_frozen_leaf` keeps it (targeted kernels 4-bit,
  the rest `FROZEN_DENSE_DTYPE`), as a loaded checkpoint is."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(unboxed(params)), sep=None)
  flat_shardings = flax.traverse_util.flatten_dict(shardings, sep=None)
  if flat.keys() != flat_shardings.keys():
    missing = sorted('/'.join(p) for p in flat_shardings.keys() - flat.keys())
    extra = sorted('/'.join(p) for p in flat.keys() - flat_shardings.keys())
    raise UserError(f'the base params do not match the model config: missing {missing[:4]}, '
                    f'unexpected {extra[:4]}.')
  out = {}
  for path, leaf in flat.items():
    if quant_settings is None:
      out[path] = jax.device_put(leaf, flat_shardings[path])
    else:
      out[path] = _frozen_into(quant_settings, path, leaf, flat_shardings[path])
  return flax.traverse_util.unflatten_dict(out)


def _frozen_into(quant_settings: QuantSettings, path: tuple[str, ...], array: jax.Array,
                 sharding: Any) -> Any:
  """`_frozen_leaf` of one tensor, computed straight into its shards."""
  to_frozen = functools.partial(_frozen_leaf, quant_settings, path)
  return jax.jit(to_frozen, out_shardings=sharding)(array)


def _adapter_from_peft(folder: str, model_config: LlamaConfig, lora: LoraSettings,
                       shardings: Any) -> Any:
  """The LoRA tree of a PEFT adapter folder (`lora.init_from`), checked against `lora`."""
  tree, adapter = peft.load_peft_adapter(folder, abstract_adapters(model_config, lora),
                                         model_config.num_layers)
  for key, ours in (('r', lora.rank), ('lora_alpha', lora.alpha), ('use_rslora', lora.rslora)):
    if key in adapter and adapter[key] != ours and not (
        isinstance(ours, float) and float(adapter[key]) == ours):
      raise UserError(f'lora.init_from={folder}: the adapter has {key}='
                      f'{adapter[key]} but the config says {ours}; make them equal.')
  return jax.tree_util.tree_map(jax.device_put, tree, shardings)
