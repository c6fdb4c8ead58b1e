"""Training: the loss, `make_train_step`, and the loop behind `jaxsft train` (the state and
how it is built live in `jaxsft.state`, re-exported here).

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
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding

from jaxsft import checkpoint, demo, optim
from jaxsft import loss as loss_lib
from jaxsft.config import default_config
from jaxsft.data import Pipeline, load_tokenizer
from jaxsft.data.packing import ROW_KEYS
from jaxsft.errors import UserError
from jaxsft.flops import device_peak_flops, train_flops_per_token
from jaxsft.metrics import MetricWriter, format_step
from jaxsft.models import Llama, LlamaConfig
from jaxsft.models.llama import head_kernel
from jaxsft.preemption import SigtermFlag
from jaxsft.state import (  # noqa: F401  (re-exported: train.TrainState, train.init_train_state, ...)
  BATCH_AXES,
  FROZEN_DENSE_DTYPE,
  TrainState,
  abstract_train_state,
  batch_sharding,
  check_quant_config,
  global_batch,
  init_train_state,
  mesh_and_rules,
  model_config_from,
  state_shardings,
)
from jaxsft.validate import check_config
from jaxsft.workdir_lock import WorkdirLock

_LOG = logging.getLogger('jaxsft')
Batch = dict[str, jax.Array]
DEFAULT_LOSS_CHUNK = default_config().train.loss_chunk_size


# ----------------------------------------------------------------------------- the step


def loss_terms(model: Llama, variables: dict[str, Any], batch: Batch, rngs: dict[str, Any],
               neftune_alpha: float = 0.0, loss_chunk_size: int = DEFAULT_LOSS_CHUNK
               ) -> tuple[jax.Array, jax.Array]:
  """`(summed cross-entropy over loss_mask, correctly predicted supervised tokens)`.

  With `loss_chunk_size` > 0 the LM head and the loss are fused and chunked
  (`jaxsft.loss.fused_cross_entropy`: logits of supervised tokens only, never all at once);
  0 forms the whole `[B, T, V]` logits (the reference). A target logit tied with the maximum
  counts as correct in both.
  """
  args = (batch['inputs'], batch['positions'], batch['segment_ids'])
  kernel = head_kernel(model.config, variables) if loss_chunk_size > 0 else None
  if kernel is not None:
    hidden_btd = model.apply(variables, *args, neftune_alpha=neftune_alpha, rngs=rngs,
                             return_hidden=True)
    chunk = loss_lib.chunk_size(hidden_btd.shape[1], loss_chunk_size)
    return loss_lib.fused_cross_entropy(hidden_btd, kernel, batch['targets'],
                                        batch['loss_mask'], chunk)
  logits_btv = model.apply(variables, *args, neftune_alpha=neftune_alpha, rngs=rngs)
  logits_btv = logits_btv.astype(jnp.float32)
  mask_bt = batch['loss_mask'].astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, batch['targets'][..., None], axis=-1)[..., 0]
  loss_sum = jnp.sum((log_z_bt - target_logit_bt) * mask_bt)
  correct = jnp.sum((target_logit_bt >= jnp.max(logits_btv, axis=-1)) * mask_bt)
  return loss_sum, correct


def split_micro_batches(batch: Batch, count: int) -> Batch:
  """`[rows, T]` -> `[count, rows / count, T]`, micro-batch a taking rows a, a + count, ... so
  every micro-batch spreads over all the devices that hold the batch's rows."""
  def split(x):
    rows = x.shape[0]
    return x.reshape(rows // count, count, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree_util.tree_map(split, batch)


def make_train_step(model_config: LlamaConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum_steps: int = 1,
                    neftune_alpha: float = 0.0, loss_chunk_size: int = DEFAULT_LOSS_CHUNK
                    ) -> Callable[[TrainState, Batch],
                                                            tuple[TrainState, dict]]:
  """The pure train step. `jit_train_step` jits it with shardings."""
  model = Llama(model_config, deterministic=False)

  def micro_step(state: TrainState, micro: Batch, rng: jax.Array):
    rngs = dict(zip(('dropout', 'neftune'), jax.random.split(rng)))

    def objective(trained):
      variables = dataclasses.replace(state, params=trained).variables()
      return loss_terms(model, variables, micro, rngs, neftune_alpha, loss_chunk_size)

    (loss_sum, correct), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
    return loss_sum, correct, grads

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(state.rng)
    supervised = jnp.sum(batch['loss_mask'].astype(jnp.float32))
    if grad_accum_steps == 1:
      loss_sum, correct, grads = micro_step(state, batch, step_rng)
    else:
      micro_batches = split_micro_batches(batch, grad_accum_steps)
      rngs = jax.random.split(step_rng, grad_accum_steps)

      def accumulate(carry, inputs):
        micro, micro_rng = inputs
        loss_sum, correct, grads = micro_step(state, micro, micro_rng)
        total_loss, total_correct, total_grads = carry
        return (total_loss + loss_sum, total_correct + correct,
                jax.tree_util.tree_map(jnp.add, total_grads, grads)), None

      zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      (loss_sum, correct, grads), _ = jax.lax.scan(
          accumulate, (jnp.zeros(()), jnp.zeros(()), zeros), (micro_batches, rngs))
    denominator = jnp.maximum(supervised, 1.0)
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
               'supervised_tokens': supervised, 'grad_norm': grad_norm,
               'lr': schedule(state.step)}
    new_state = dataclasses.replace(state, step=state.step + 1, params=params,
                                    opt_state=opt_state, rng=rng)
    return new_state, metrics

  return train_step


def make_eval_step(model_config: LlamaConfig, loss_chunk_size: int = DEFAULT_LOSS_CHUNK
                   ) -> Callable[[dict, Batch], dict]:
  """`eval_step(variables, batch)`: summed loss, correct and supervised tokens of one batch
  (deterministic model)."""
  model = Llama(model_config)

  def eval_step(variables: dict, batch: Batch) -> dict:
    loss_sum, correct = loss_terms(model, variables, batch, {}, 0.0, loss_chunk_size)
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


def jit_train_step(config: Any, model_config: LlamaConfig, optimizer: optax.GradientTransformation,
                   schedule: optax.Schedule, shardings: TrainState, rows: NamedSharding
                   ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """The train step of `config.train`, jitted: the state in and out with `shardings` (donated),
  every batch key sharded as `rows`."""
  step = make_train_step(model_config, optimizer, schedule,
                         grad_accum_steps=config.train.grad_accum_steps,
                         neftune_alpha=config.train.neftune_alpha,
                         loss_chunk_size=config.train.loss_chunk_size)
  return jax.jit(step, in_shardings=(shardings, {key: rows for key in ROW_KEYS}),
                 out_shardings=(shardings, None), donate_argnums=(0,),
                 compiler_options=compiler_options(rows.mesh.devices.flat[0].platform))


# ----------------------------------------------------------------------------- the loop


def check_batch_layout(config: Any, mesh: Mesh) -> None:
  """Each micro-batch's rows split evenly over the data x fsdp devices (that `grad_accum_steps`
  divides `batch_size` is `jaxsft.validate.check_config`'s rule)."""
  rows_axes = mesh.shape['data'] * mesh.shape['fsdp']
  accum = config.train.grad_accum_steps
  if (config.batch_size // accum) % rows_axes:
    raise UserError(f'each micro-batch has {config.batch_size // accum} rows, which the '
                    f'{rows_axes} devices of the data x fsdp mesh axes cannot split evenly; '
                    'make batch_size / grad_accum_steps a multiple of that.')


EXIT_NON_FINITE = 3    # the CLI's exit code when the loss became NaN or infinite
EXIT_PREEMPTED = 75    # EX_TEMPFAIL: preempted (SIGTERM), checkpoint saved; start it again


class Preempted(Exception):
  """SIGTERM or a TPU preemption notice: the state at `step` is checkpointed (`saved`), or the
  run had not taken its first step yet (nothing new to save)."""

  def __init__(self, step: int, saved: bool = True):
    what = ('the checkpoint is saved and the run resumes from it' if saved else
            'it stopped before its first step, so nothing new was saved; it starts (or resumes)')
    super().__init__(f'preempted at step {step}; {what} when started again on the same work '
                     'directory.')
    self.step = step
    self.saved = saved


class RunFinished(Exception):
  """The work directory holds a run that already reached its last step; nothing was changed."""


def train(config: Any, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a training job; returns the last train and eval metrics and the state.

  The work directory is locked for the run (`jaxsft.workdir_lock`); nothing in it is written
  until the run has started (config checked, model built, checkpoint restored), so a start that
  fails leaves an existing run's files as they were. A finished run is reported, not redone.
  Raises `NonFiniteLoss` (the newest checkpoint is then the last good one) and `Preempted`
  (after saving; SIGTERM before the first step saves nothing new).
  """
  check_config(config)
  workdir = absolute_workdir(workdir)
  with WorkdirLock(workdir), SigtermFlag() as sigterm:
    return _train(config, workdir, sigterm)


def _train(config: Any, workdir: str, sigterm: SigtermFlag) -> dict[str, Any]:
  checkpoint.check_writable(workdir)  # the space check follows once the state's size is known
  if config.demo.enabled:
    demo.prepare(config, workdir)
  model_config, folder = model_config_from(config)
  mesh, rules = mesh_and_rules(config)
  check_batch_layout(config, mesh)
  checkpoint.check_writable(workdir, needed_bytes=config.checkpoint.keep * sum(
      x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
          checkpoint.saveable(abstract_train_state(config)))) // max(jax.process_count(), 1))
  tokenizer_path = config.data.tokenizer or folder or ''
  tokenizer = load_tokenizer(tokenizer_path)
  check_tokenizer_fits(tokenizer, model_config, tokenizer_path)
  data = Pipeline(config.data, tokenizer, batch_size=config.batch_size)
  total_steps = _total_steps(config, data)
  optimizer, schedule = optim.make_optimizer(config.optim, total_steps)
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                         save_every=config.checkpoint.save_every,
                                         async_save=config.checkpoint.async_save)
  # As JSON gives it back on resume (tuples become lists), so the comparison below is exact.
  # The chat template's text goes with every checkpoint: exports carry what training rendered.
  meta = json.loads(json.dumps({
      'config': json.loads(config.to_json_best_effort()),
      'base': checkpoint.base_identity(folder) if config.lora.enabled else None,
      'chat_template': data.template.source}))

  # Init places every array explicitly; the mesh context is for tracing the model's
  # activation constraints in the step (HF loading under it trips on abstract meshes).
  with nn.logical_axis_rules(rules):
    state = init_train_state(config, model_config, folder, optimizer, mesh, rules)
  data_state = None
  restored = checkpointer.restore_latest(state) if config.checkpoint.resume else None
  if restored is not None:
    latest, state, data_states, saved_meta = restored
    checkpoint.log_restore(latest, checkpointer.directory)
    if config.lora.enabled and saved_meta.get('base') != meta['base']:
      raise UserError(f'the checkpoint in {checkpointer.directory} adapts the base '
                      f'{saved_meta.get("base")}, but this run loads {meta["base"]}; point '
                      'model.path at the original base or use a new --workdir.')
    data_state = checkpoint.data_state_for_process(data_states, jax.process_index(),
                                                   jax.process_count())
    if latest >= total_steps:
      checkpointer.close()
      raise RunFinished(f'the run in {workdir} already finished: its newest checkpoint is at '
                        f'step {latest} of {total_steps}. Use jaxsft generate / eval / export '
                        'on it, raise train.num_steps to train further, or choose a new '
                        '--workdir.')
  if sigterm.raised:
    checkpointer.close()
    raise Preempted(int(state.step), saved=False)
  # The run has started: from here on the work directory is this run's.
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'config.json').write_text(
        config.to_json_best_effort(indent=2, sort_keys=True))
  writer = MetricWriter(workdir, config.train.tensorboard, resume_step=int(state.step))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    trained = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    _LOG.info('model %s: %s parameters, training %s (%s) on mesh %s, %d steps of %d rows x %d '
              'tokens', model_config.model_type, f'{model_config.num_params():,}',
              f'{trained:,}', 'LoRA' if config.lora.enabled else 'full',
              dict(mesh.shape), total_steps, config.batch_size, config.data.max_seq_len)
    shardings = state_shardings(state)
    rows = batch_sharding(mesh)
    step_fn = jit_train_step(config, model_config, optimizer, schedule, shardings, rows)
    eval_fn = jax.jit(make_eval_step(model_config, config.train.loss_chunk_size),
                      in_shardings=(shardings.variables(), {key: rows for key in ROW_KEYS}),
                      compiler_options=compiler_options(mesh.devices.flat[0].platform))
    demo_before = demo.report(config, state, model_config, tokenizer, workdir, 'before') \
        if config.demo.enabled else None

    batches = data.train_batches(data_state)
    first_local = next(batches)
    compiled = step_fn.lower(state, global_batch(first_local, rows)).compile()
    loop = _Loop(config, compiled, batches, rows, total_steps, writer, _step_flops(config,
                 model_config), _total_peak_flops(), eval_fn, data, checkpointer, meta,
                 _sampler(config, model_config, tokenizer, workdir),
                 last_saved=int(state.step) if restored is not None else None)
    try:
      state, train_metrics = loop.run(state, first_local, sigterm)
    except BaseException:
      checkpointer.wait()
      writer.close()
      raise
    eval_metrics = evaluate_loss(eval_fn, state.variables(), data, rows)
    if eval_metrics:
      writer.write(int(state.step), eval_metrics, prefix='eval')
      _LOG.info('eval | loss %.4f | ppl %.2f | acc %.3f', eval_metrics['loss'],
                eval_metrics['perplexity'], eval_metrics['accuracy'])
    result = {'train': train_metrics, 'eval': eval_metrics, 'steps': int(state.step),
              'state': state, 'model_config': model_config}
    if config.demo.enabled:
      result['demo'] = {'before': demo_before,
                        'after': demo.report(config, state, model_config, tokenizer, workdir,
                                             'after')}
  writer.close()
  checkpointer.close()
  return result


def absolute_workdir(workdir: str) -> str:
  """A local work directory as an absolute path (Orbax refuses relative ones); a bucket path
  (`gs://...`) as given."""
  return str(workdir) if '://' in str(workdir) else os.path.abspath(workdir)


def check_tokenizer_fits(tokenizer: Any, model_config: LlamaConfig, where: str) -> None:
  """Refuses a tokenizer that cannot be the model's: more ids than embedding rows (they would
  read garbage, NaN on some backends, not fail), or a vocabulary far smaller than the model's
  (a folder that loaded without its model files)."""
  size, rows = len(tokenizer), model_config.vocab_size
  if size > rows:
    raise UserError(f'the tokenizer at {where} has {size} tokens but the model\'s vocabulary '
                    f'is {rows}; use the tokenizer saved with the model, or resize the model\'s '
                    'embeddings (added special tokens need rows too).')
  if size < rows // 2:
    raise UserError(f'the tokenizer at {where} has {size} tokens but the model\'s vocabulary is '
                    f'{rows}: it cannot be this model\'s tokenizer (is its tokenizer.json or '
                    'tokenizer.model missing?); point data.tokenizer at the model\'s tokenizer.')


def _sampler(config: Any, model_config: LlamaConfig, tokenizer: Any, workdir: str):
  """`(state, step) -> [(prompt, answer)]` for `train.sample_prompts`, appending each answer
  to `workdir/samples.jsonl`; None when sampling is off."""
  if not (config.train.sample_every and config.train.sample_prompts):
    return None
  # pylint: disable=import-outside-toplevel
  from jaxsft import evaluate, generate
  model = evaluate.Model(config, model_config, None, tokenizer)
  prompts = list(config.train.sample_prompts)
  sampling = generate.SamplingConfig(max_new_tokens=config.train.sample_max_new_tokens)

  def sample(state: TrainState, step: int) -> list[tuple[str, str]]:
    model.variables = state.variables()
    answers = evaluate.answer(model, [[{'role': 'user', 'content': p}] for p in prompts],
                              sampling)
    if jax.process_index() == 0:
      path = epath.Path(workdir) / 'samples.jsonl'
      previous = path.read_text() if path.exists() else ''
      path.write_text(previous + ''.join(
          json.dumps({'step': step, 'prompt': p, 'answer': a}) + '\n'
          for p, a in zip(prompts, answers)))
    return list(zip(prompts, answers))

  return sample


def _step_flops(config: Any, model_config: LlamaConfig) -> float:
  """Model FLOPs of one step over the global batch (`jaxsft.flops`; every row position)."""
  seq_len = config.data.max_seq_len
  per_token = train_flops_per_token(
      model_config, seq_len, lora_rank=config.lora.rank if config.lora.enabled else 0,
      lora_targets=list(config.lora.targets))
  return per_token.total * config.batch_size * seq_len


def _total_peak_flops() -> float | None:
  peak = device_peak_flops()
  return peak * jax.device_count() if peak else None


def _total_steps(config: Any, data: Any) -> int:
  if config.train.num_steps > 0:
    return int(config.train.num_steps)  # a stream always has them (`check_config`)
  rows = len(data._plan_window(0)[1])  # pylint: disable=protected-access
  return max(1, math.ceil(config.train.num_epochs * rows / config.batch_size))


@dataclasses.dataclass
class _Loop:
  """The step loop. Each step's loss is checked while the next step runs (no stall), except
  before a checkpoint: a state is only saved once its loss is known to be finite."""

  config: Any
  compiled: Any
  batches: Any
  rows: NamedSharding
  total_steps: int
  writer: MetricWriter
  flops: float  # model FLOPs per step, global
  peak: float | None  # peak FLOP/s of all devices
  eval_fn: Any
  data: Any
  checkpointer: Any
  meta: dict
  sampler: Any = None
  last_saved: int | None = None

  def run(self, state: TrainState, local: dict, sigterm: SigtermFlag):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    config, total_steps = self.config, self.total_steps
    progress = tqdm(total=total_steps, initial=int(state.step), dynamic_ncols=True, leave=False,
                    disable=not config.train.progress_bar or jax.process_index() != 0 or
                    not sys.stderr.isatty())
    say = progress.write if not progress.disable else (
        _LOG.info if jax.process_index() == 0 else lambda *_: None)
    batch = global_batch(local, self.rows)
    position = self.batches.state()  # the data position after this step's batch
    if sigterm.raised:
      progress.close()
      raise Preempted(int(state.step), saved=False)
    try:
      return self._steps(state, local, batch, position, sigterm, progress, say)
    except NonFiniteLoss as error:
      progress.close()
      if self.last_saved == error.step - 1:
        # Step s's loss and gradients are those of the state saved at s - 1: that state
        # diverges, so the checkpoint before it is the last good one.
        self.checkpointer.set_aside(self.last_saved, str(error))
        error.args = (f'{error.args[0]} (the checkpoint of step {self.last_saved}, whose state '
                      'gave this, was moved to checkpoints_bad/)',)
      raise

  def _steps(self, state, local, batch, position, sigterm, progress, say):
    config, total_steps = self.config, self.total_steps
    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
    pending, last_metrics = None, {}
    for step in range(int(state.step), total_steps):
      window_tokens += int((local['segment_ids'] > 0).sum()) * jax.process_count()
      state, metrics = self.compiled(state, batch)
      next_position = position
      if step + 1 < total_steps:  # prepare the next batch while this step runs
        local = next(self.batches)
        batch = global_batch(local, self.rows)
        position = self.batches.state()
      if pending is not None:
        _check_finite(*pending)
      pending = (step + 1, metrics)
      window_steps += 1
      progress.update(1)
      done = step + 1
      if done % config.train.log_every == 0 or done == total_steps:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(done, values)
        elapsed = time.perf_counter() - window_start
        values['tokens_per_s'] = window_tokens / elapsed
        values['mfu'] = self.flops * window_steps / elapsed / self.peak if self.peak else None
        self.writer.write(done, values)
        say(format_step(done, total_steps, values))
        last_metrics = values
        window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
      preempted = sigterm.raised or self.checkpointer.reached_preemption(done)
      if self.checkpointer.should_save(done) or done == total_steps or preempted:
        _check_finite(done, jax.device_get(metrics))
        self.checkpointer.save(done, state, next_position, self.meta)
        self.last_saved = done
      if preempted:
        self.checkpointer.wait()
        progress.close()
        raise Preempted(done)
      if self.sampler is not None and done % config.train.sample_every == 0:
        for prompt, text in self.sampler(state, done):
          say(f'sample at step {done} | {prompt!r} -> {text!r}')
      if config.train.eval_every and done % config.train.eval_every == 0 and done < total_steps:
        eval_metrics = evaluate_loss(self.eval_fn, state.variables(), self.data,
                                     self.rows)
        if eval_metrics:
          self.writer.write(done, eval_metrics, prefix='eval')
          say(f'eval at step {done} | loss {eval_metrics["loss"]:.4f} | ppl '
              f'{eval_metrics["perplexity"]:.2f} | acc {eval_metrics["accuracy"]:.3f}')
    if pending is not None:
      _check_finite(*pending)
    progress.close()
    return state, last_metrics


class NonFiniteLoss(FloatingPointError):
  """Training produced a NaN or infinite loss or gradient at `step` (the step was not applied).
  """

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def _check_finite(step: int, metrics: dict) -> None:
  loss, grad_norm = float(metrics['loss']), float(metrics['grad_norm'])
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    what = f'the loss became {loss}' if not math.isfinite(loss) else \
        f'the gradient norm became {grad_norm} (loss {loss:.4f})'
    raise NonFiniteLoss(
        f'{what} at step {step}; stopping without applying it. Lower optim.learning_rate, keep '
        'optim.max_grad_norm on, or use model.param_dtype="float32", then start the same '
        'command again: it resumes from the newest good checkpoint.', step)


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


def write_summary(workdir: str, result: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    summary = {k: v for k, v in result.items() if k not in ('state', 'model_config')}
    (epath.Path(workdir) / 'summary.json').write_text(json.dumps(summary, indent=2, default=str))
