"""The pure steps: the loss, `make_train_step` (gradients, accumulation, clipping, the update)
and `make_eval_step`, and how they are jitted with shardings.

The step is a pure function `train_step(state, batch) -> (state, metrics)`, jitted once with
explicit shardings and the state donated. `state.params` is what the optimizer trains: the
full parameters, or the LoRA tree with the base weights in `state.frozen` (gradients are taken
w.r.t. `state.params` only, so no gradient of a frozen weight is ever formed).

The loss is the cross-entropy summed over `loss_mask` and divided by the supervised tokens of
the whole global batch, so `grad_accum_steps` micro-batches give the gradient of one big batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from jaxsft.data.packing import ROW_KEYS
from jaxsft.errors import check_number
from jaxsft.models import moe
from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama, head_kernel
from jaxsft.parallel.batch import global_batch
from jaxsft.train.loss import DEFAULT_CHUNK_SIZE, chunk_size, fused_cross_entropy
from jaxsft.train.state import TrainState

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the train step does besides the update: `grad_accum_steps` micro-batches per step
  (the batch's rows split evenly; the gradient is the whole batch's), NEFTune noise on the input
  embeddings (`neftune_alpha`, 0 = off) and `loss_chunk_size` positions per row whose logits
  exist at once in the fused LM head + loss (0 = the whole `[B, T, V]` logits). Invalid values
  raise `UserError` when the settings are made."""

  grad_accum_steps: int = 1
  neftune_alpha: float = 0.0
  loss_chunk_size: int = DEFAULT_CHUNK_SIZE

  def __post_init__(self):
    check_number('train.grad_accum_steps', self.grad_accum_steps, low=1, integer=True)
    check_number('train.neftune_alpha', self.neftune_alpha, low=0)
    check_number('train.loss_chunk_size', self.loss_chunk_size, low=0, integer=True)


def _apply(model: Llama, variables: dict[str, Any], *args: Any, **kwargs: Any
           ) -> tuple[jax.Array, jax.Array]:
  """`model.apply(...)` and the load-balancing loss of its sparse layers (0 for a dense model:
  `jaxsft.models.moe.load_balancing_loss` over every sparse layer's sown router statistics)."""
  if not model.config.num_experts:
    return model.apply(variables, *args, **kwargs), jnp.zeros((), jnp.float32)
  out, state = model.apply(variables, *args, mutable=['intermediates'], **kwargs)
  stats = moe.router_stats(state['intermediates'])
  return out, moe.load_balancing_loss(stats, model.config.num_experts)


def loss_terms(model: Llama, variables: dict[str, Any], batch: Batch, rngs: dict[str, Any],
               neftune_alpha: float = 0.0, loss_chunk_size: int = DEFAULT_CHUNK_SIZE
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(summed cross-entropy over loss_mask, correctly predicted supervised tokens,
  load-balancing loss)`, the last 0 for a dense model.

  With `loss_chunk_size` > 0 the LM head and the loss are fused and chunked
  (`jaxsft.train.loss.fused_cross_entropy`: logits of supervised tokens only, never all at once);
  0 forms the whole `[B, T, V]` logits (the reference). A target logit tied with the maximum
  counts as correct in both.
  """
  args = (batch['inputs'], batch['positions'], batch['segment_ids'])
  kernel = head_kernel(model.config, variables) if loss_chunk_size > 0 else None
  if kernel is not None:
    hidden_btd, aux = _apply(model, variables, *args, neftune_alpha=neftune_alpha, rngs=rngs,
                             return_hidden=True)
    chunk = chunk_size(hidden_btd.shape[1], loss_chunk_size)
    return (*fused_cross_entropy(hidden_btd, kernel, batch['targets'], batch['loss_mask'],
                                 chunk), aux)
  logits_btv, aux = _apply(model, variables, *args, neftune_alpha=neftune_alpha, rngs=rngs)
  logits_btv = logits_btv.astype(jnp.float32)
  mask_bt = batch['loss_mask'].astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, batch['targets'][..., None], axis=-1)[..., 0]
  loss_sum = jnp.sum((log_z_bt - target_logit_bt) * mask_bt)
  correct = jnp.sum((target_logit_bt >= jnp.max(logits_btv, axis=-1)) * mask_bt)
  return loss_sum, correct, aux


def split_micro_batches(batch: Batch, count: int) -> Batch:
  """`[rows, T]` -> `[count, rows / count, T]`, micro-batch a taking rows a, a + count, ... so
  every micro-batch spreads over all the devices that hold the batch's rows."""
  def split(x):
    rows = x.shape[0]
    return x.reshape(rows // count, count, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree_util.tree_map(split, batch)


def make_train_step(model_config: LlamaConfig, optimizer: optax.GradientTransformation,
                    settings: StepSettings = StepSettings(),
                    schedule: optax.Schedule | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """The pure train step `train_step(state, batch) -> (state, metrics)`; `jit_train_step` jits
  it with shardings. `batch` holds `[rows, T]` int arrays under `jaxsft.data.packing.ROW_KEYS`;
  the model applies the state's adapters (`TrainState.lora`). Metrics: `loss` (mean nats per
  supervised token of the whole batch), `accuracy`, `supervised_tokens`, `grad_norm`, and `lr`
  when `schedule` (the optimizer's, for logging only) is given. A mixture-of-experts model also
  logs `router_aux_loss` (the load-balancing loss, the mean over micro-batches) and trains on
  `loss + router_aux_loss_coef * router_aux_loss`, as transformers does with
  `output_router_logits`."""
  grad_accum_steps = settings.grad_accum_steps
  neftune_alpha, loss_chunk_size = settings.neftune_alpha, settings.loss_chunk_size
  aux_coef = model_config.router_aux_loss_coef if model_config.num_experts else 0.0

  def micro_step(state: TrainState, micro: Batch, rng: jax.Array, denominator: jax.Array):
    model = Llama(state.model_config(model_config), deterministic=False)
    rngs = dict(zip(('dropout', 'neftune'), jax.random.split(rng)))

    def objective(trained):
      variables = dataclasses.replace(state, params=trained).variables()
      loss_sum, correct, aux = loss_terms(model, variables, micro, rngs, neftune_alpha,
                                          loss_chunk_size)
      # The step divides the summed objective by the batch's supervised tokens: the auxiliary
      # term is scaled up by them so that it enters the mean loss with its own weight.
      objective_sum = loss_sum + aux_coef * aux * denominator / grad_accum_steps
      return objective_sum, (loss_sum, correct, aux)

    (_, (loss_sum, correct, aux)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
    return loss_sum, correct, aux, grads

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(state.rng)
    supervised = jnp.sum(batch['loss_mask'].astype(jnp.float32))
    denominator = jnp.maximum(supervised, 1.0)
    if grad_accum_steps == 1:
      loss_sum, correct, aux, grads = micro_step(state, batch, step_rng, denominator)
    else:
      micro_batches = split_micro_batches(batch, grad_accum_steps)
      rngs = jax.random.split(step_rng, grad_accum_steps)

      def accumulate(carry, inputs):
        micro, micro_rng = inputs
        loss_sum, correct, aux, grads = micro_step(state, micro, micro_rng, denominator)
        total_loss, total_correct, total_aux, total_grads = carry
        return (total_loss + loss_sum, total_correct + correct, total_aux + aux,
                jax.tree_util.tree_map(jnp.add, total_grads, grads)), None

      zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      (loss_sum, correct, aux, grads), _ = jax.lax.scan(
          accumulate, (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), zeros),
          (micro_batches, rngs))
      aux = aux / grad_accum_steps
    grads = jax.tree_util.tree_map(lambda g, p: (g / denominator).astype(p.dtype), grads,
                                   state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient never reaches the weights or the moments: the step keeps
    # the old ones (the loop then stops), so no saved state can hold a NaN update.
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    keep_old = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(finite, new,
                                                                                     old))
    params, opt_state = keep_old(params, state.params), keep_old(opt_state, state.opt_state)
    metrics = {'loss': loss_sum / denominator, 'accuracy': correct / denominator,
               'supervised_tokens': supervised, 'grad_norm': grad_norm}
    if model_config.num_experts:
      metrics['router_aux_loss'] = aux
    if schedule is not None:
      metrics['lr'] = schedule(state.step)
    new_state = dataclasses.replace(state, step=state.step + 1, params=params,
                                    opt_state=opt_state, rng=rng)
    return new_state, metrics

  return train_step


def make_eval_step(model_config: LlamaConfig, loss_chunk_size: int = DEFAULT_CHUNK_SIZE
                   ) -> Callable[[dict, Batch], dict]:
  """`eval_step(variables, batch)`: summed loss (nats), correct and supervised tokens of one
  batch (deterministic model). `model_config` must carry the adapters' scale when `variables`
  holds them (`TrainState.model_config`)."""
  model = Llama(model_config)

  def eval_step(variables: dict, batch: Batch) -> dict:
    loss_sum, correct, _ = loss_terms(model, variables, batch, {}, 0.0, loss_chunk_size)
    return {'loss_sum': loss_sum, 'correct': correct,
            'supervised_tokens': jnp.sum(batch['loss_mask'].astype(jnp.float32))}

  return eval_step


# XLA:CPU has no bf16 arithmetic: float normalization computes bf16 ops in f32, and loop-invariant
# code motion then hoists the f32 conversion of whole stacked `[layers, ...]` arrays out of the
# scanned layer loops: saved activations (the bf16 LoRA step of docs/benchmarks.md: 2.18 s and
# 2.41 GiB with it, 1.96 s and 2.05 GiB without) and, in `jaxsft plan`, every frozen bf16 kernel
# (an f32 copy of 24 GiB for LLaMA-2-7B that a GPU or TPU compile never forms).
CPU_COMPILER_OPTIONS = {'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}


def compiler_options(platform: str) -> dict[str, str] | None:
  """XLA options for a step over the scanned layers compiled for `platform` ('cpu', 'gpu',
  'tpu'): `CPU_COMPILER_OPTIONS` on CPUs, the defaults elsewhere. The eval step needs them as
  much as the train step: its forward alone held f32 copies of every stacked bf16 weight
  (temporaries 2.1x the weights of an 8-layer model; 0.13x without the hoisting)."""
  return CPU_COMPILER_OPTIONS if platform == 'cpu' else None


def jit_train_step(model_config: LlamaConfig, optimizer: optax.GradientTransformation,
                   shardings: TrainState, rows: NamedSharding,
                   settings: StepSettings = StepSettings(),
                   schedule: optax.Schedule | None = None
                   ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`make_train_step` jitted: the state in and out with `shardings` (`state_shardings`; the
  state is donated, so pass the returned one on), every batch key sharded as `rows`
  (`jaxsft.parallel.batch_sharding(mesh)`), whose leading axis the batch's rows and
  `settings.grad_accum_steps` micro-batches must divide evenly."""
  step = make_train_step(model_config, optimizer, settings, schedule)
  return jax.jit(step, in_shardings=(shardings, {key: rows for key in ROW_KEYS}),
                 out_shardings=(shardings, None), donate_argnums=(0,),
                 compiler_options=compiler_options(rows.mesh.devices.flat[0].platform))


def evaluate_loss(eval_fn, variables: dict, data: Any, rows: NamedSharding | None
                  ) -> dict[str, float]:
  """Token-weighted loss, perplexity and accuracy over `data.eval_batches()` ({} if none).
  `rows`: the batch sharding of a run's mesh; None passes host batches as they are."""
  totals = {'loss_sum': 0.0, 'correct': 0.0, 'supervised_tokens': 0.0}
  for local in data.eval_batches():
    batch = local if rows is None else global_batch(local, rows)
    out = jax.device_get(eval_fn(variables, batch))
    for key in totals:
      totals[key] += float(out[key])
  if not totals['supervised_tokens']:
    return {}
  loss = totals['loss_sum'] / totals['supervised_tokens']
  return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
          'accuracy': totals['correct'] / totals['supervised_tokens'],
          'supervised_tokens': totals['supervised_tokens']}
