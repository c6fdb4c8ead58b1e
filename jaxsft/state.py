"""The train state: what it holds, how a run builds it, and where its arrays live.

`TrainState(step, params, frozen, opt_state, rng)`: `params` is what the optimizer trains (all
weights, or the LoRA tree), `frozen` the base weights under LoRA (possibly 4-bit). Building a
state goes `eval_shape` -> logical shardings -> jitted initialisers (or a sharded HF load that
quantizes tensor by tensor), so no array is ever materialised unsharded.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsft import hf, lora, optim, presets, quant
from jaxsft import sharding as sharding_lib
from jaxsft.errors import UserError
from jaxsft.models import Llama, LlamaConfig
from jaxsft.targets import target_matcher

Batch = dict[str, jax.Array]
BATCH_AXES = (('data', 'fsdp'), None)  # rows over data x fsdp, sequence whole
FROZEN_DENSE_DTYPE = jnp.bfloat16  # QLoRA: the dense (unquantized) frozen weights


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


def model_config_from(config: Any, shapes_only: bool = False
                      ) -> tuple[LlamaConfig, str | None]:
  """The `LlamaConfig` of a run and the checkpoint folder to load (None: random init).

  `shapes_only` (memory plans, abstract states): a `model.path` that is not a local folder
  gives way to `model.preset` when one is set, so a 7B run can be planned without its weights.
  """
  m = config.model
  execution = {
      'dtype': m.dtype, 'param_dtype': m.param_dtype, 'scan_layers': m.scan_layers,
      'remat_policy': m.remat_policy, 'attention_implementation': m.attention_implementation,
      'lora_scale': lora.lora_scale(config.lora.rank, config.lora.alpha, config.lora.rslora),
      'lora_dropout': config.lora.dropout if config.lora.enabled else 0.0}
  if m.path and not (shapes_only and m.preset and not os.path.isdir(m.path)):
    folder = hf.resolve_checkpoint_dir(m.path)
    return hf.config_from_hf(hf.read_hf_config(folder), **execution), folder
  if m.preset:
    return presets.preset(m.preset, **execution), None
  if m.architecture:
    return LlamaConfig(**dict(m.architecture), **execution), None
  raise UserError('no model: set model.path (an HF folder or hub id), model.preset or '
                  'model.architecture in the config.')


def mesh_and_rules(config: Any, devices: Any = None) -> tuple[Mesh, tuple]:
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  overridden = {name for name, _ in rules}
  rules += tuple(r for r in sharding_lib.DEFAULT_RULES if r[0] not in overridden)
  return sharding_lib.make_mesh(tuple(config.mesh.shape), devices), rules


def _random_params(model_config: LlamaConfig, rng: jax.Array) -> Any:
  tokens = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(Llama(model_config).init(rng, tokens)['params'])


def init_train_state(config: Any, model_config: LlamaConfig, folder: str | None,
                     optimizer: optax.GradientTransformation, mesh: Mesh, rules: tuple
                     ) -> TrainState:
  """The initial state, every array created (or read) straight into its sharding.

  Random keys are derived inside the jitted initialisers from the integer seed: a key made on
  one process's device could not be placed on a mesh that spans processes.
  """
  seed = config.train.seed
  key = lambda i: jax.random.split(jax.random.key(seed), 3)[i]  # noqa: E731  init, lora, train
  boxed = hf.abstract_params(model_config)
  param_shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  quantize_leaf = _leaf_quantizer(config, boxed, mesh, rules)
  if folder is not None:
    # Each tensor is quantized as soon as it is read: the dense model never exists whole.
    # Frozen 4-bit bases load in bf16 (checkpoints are bf16; half the transient bytes).
    load_dtype = FROZEN_DENSE_DTYPE if quantize_leaf is not None else model_config.param_dtype
    _, params = hf.load_checkpoint(folder, dtype=load_dtype, mesh=mesh,
                                   rules=rules, config_overrides=_execution_fields(model_config),
                                   transform=quantize_leaf)
  else:
    params = jax.jit(lambda: _random_params(model_config, key(0)),
                     out_shardings=param_shardings)()
    if quantize_leaf is not None:
      flat = flax.traverse_util.flatten_dict(params, sep=None)
      params = flax.traverse_util.unflatten_dict(
          {path: quantize_leaf(path, leaf) for path, leaf in flat.items()})
  frozen = None
  if config.lora.enabled:
    abstract = lora.abstract_lora(boxed, list(config.lora.targets), config.lora.rank)
    lora_shardings = sharding_lib.logical_shardings(abstract, mesh, rules)
    frozen, params = params, jax.jit(lambda: lora.init_lora(key(1), abstract),
                                     out_shardings=lora_shardings)()
    if config.lora.init_from:
      params = _adapter_from_peft(config, abstract, model_config, lora_shardings)
  replicated = NamedSharding(mesh, PartitionSpec())
  # Moments shard like their params; counters and other non-param leaves are replicated.
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, param: param.sharding, jax.eval_shape(optimizer.init, params), params,
      transform_non_params=lambda _: replicated)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
  step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), key(2)),
                      out_shardings=(replicated, replicated))()
  return TrainState(step=step, params=params, frozen=frozen, opt_state=opt_state, rng=rng)


def _adapter_from_peft(config: Any, abstract: Any, model_config: LlamaConfig,
                       shardings: Any) -> Any:
  """The LoRA tree of a PEFT adapter folder (`lora.init_from`), checked against the config."""
  from jaxsft import export  # pylint: disable=import-outside-toplevel
  tree, adapter = export.load_peft_adapter(config.lora.init_from, abstract,
                                           model_config.num_layers)
  for key, ours in (('r', config.lora.rank), ('lora_alpha', config.lora.alpha),
                    ('use_rslora', config.lora.rslora)):
    if key in adapter and adapter[key] != ours and not (
        isinstance(ours, float) and float(adapter[key]) == ours):
      raise UserError(f'lora.init_from={config.lora.init_from}: the adapter has {key}='
                      f'{adapter[key]} but the config says {ours}; make them equal.')
  return jax.tree_util.tree_map(jax.device_put, tree, shardings)


def check_quant_config(config: Any) -> bool:
  """Whether the run quantizes its base weights; QLoRA needs LoRA (4-bit weights are frozen)."""
  if config.quant.kind == 'none':
    return False
  if config.quant.kind not in quant.KINDS:
    raise UserError(f'quant.kind={config.quant.kind!r}; choose none or one of {quant.KINDS}.')
  if not config.lora.enabled:
    raise UserError(f'quant.kind={config.quant.kind!r} freezes the base weights in 4 bits, so '
                    'only LoRA adapters can train; set lora.enabled=True (QLoRA).')
  return True


def _leaf_quantizer(config: Any, boxed: Any, mesh: Mesh, rules: tuple):
  """`(path, dense array) -> QuantizedKernel` (sharded like the kernel) for targeted kernels,
  the array itself otherwise; None when the run does not quantize."""
  if not check_quant_config(config):
    return None
  q = config.quant
  names = {path: leaf.names for path, leaf in
           flax.traverse_util.flatten_dict(flax.core.unfreeze(boxed), sep=None).items()}
  quantize_kernel = functools.partial(quant.quantize_kernel, kind=q.kind,
                                      block_size=q.block_size, double_quant=q.double_quant,
                                      double_quant_rounding=q.double_quant_rounding)

  targeted = target_matcher(list(q.targets), 'quant.targets')

  def quantize_leaf(path, array):
    if not targeted(tuple(path)):
      # Embeddings, norms and the LM head stay dense; frozen, so bf16 is enough.
      return jax.jit(lambda x: x.astype(FROZEN_DENSE_DTYPE), out_shardings=array.sharding)(array)
    abstract = jax.eval_shape(quantize_kernel, array)
    shardings = quant.node_shardings(names[tuple(path)], abstract, mesh, rules)
    return jax.jit(quantize_kernel, out_shardings=shardings)(array)

  return quantize_leaf


def _execution_fields(model_config: LlamaConfig) -> dict[str, Any]:
  names = ('dtype', 'param_dtype', 'scan_layers', 'remat_policy', 'attention_implementation',
           'lora_scale', 'lora_dropout')
  return {name: getattr(model_config, name) for name in names}


def abstract_train_state(config: Any) -> TrainState:
  """The train state's shapes and dtypes, nothing allocated (checks a config end to end)."""
  model_config, _ = model_config_from(config, shapes_only=True)
  optimizer, _ = optim.make_optimizer(config.optim, 1000)

  def build():
    rng = jax.random.key(0)
    params = _random_params(model_config, rng)
    frozen = None
    if check_quant_config(config):
      params = quant.quantize(params, config.quant.kind, list(config.quant.targets),
                              config.quant.block_size, config.quant.double_quant,
                              config.quant.double_quant_rounding)
      params = jax.tree_util.tree_map(
          lambda x: x if isinstance(x, quant.QuantizedKernel) else x.astype(FROZEN_DENSE_DTYPE),
          params, is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))
    if config.lora.enabled:
      abstract = lora.abstract_lora(hf.abstract_params(model_config), list(config.lora.targets),
                                    config.lora.rank)
      frozen, params = params, lora.init_lora(rng, abstract)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                      opt_state=optimizer.init(params), rng=rng)

  return jax.eval_shape(build)


def state_shardings(state: TrainState) -> TrainState:
  return jax.tree_util.tree_map(lambda x: x.sharding, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(*BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> Batch:
  """This process's rows -> one global array per key (rows of all processes, in order)."""
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local.items()}
