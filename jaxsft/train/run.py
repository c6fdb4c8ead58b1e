"""`jaxsft train`: a run from its config to its last checkpoint.

`train(config, workdir, callbacks)` checks the config, locks the work directory, builds the
model, data, optimizer and state (restoring the newest good checkpoint), jits the step and
hands over to the step loop (`jaxsft.train.loop`), then evaluates. Nothing in the work
directory is written until the run has started (after the compile); until then Ctrl-C stops it
at once, afterwards it saves first (`jaxsft.train.preemption`). A start removes what saves cut
off by an earlier run left (`Checkpointer.prepare`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from etils import epath

from jaxsft.data.packing import ROW_KEYS
from jaxsft.data.pipeline import Pipeline
from jaxsft.data.tokenizer import load_tokenizer
from jaxsft.errors import UserError
from jaxsft.models.config import LlamaConfig
from jaxsft.parallel.batch import batch_sharding, global_batch
from jaxsft.parallel.mesh import mesh_and_rules
from jaxsft.train import checkpoint
from jaxsft.train.callbacks import Callback, RunContext
from jaxsft.train.flops import device_peak_flops, train_flops_per_token
from jaxsft.train.loop import Preempted, StepLoop
from jaxsft.train.metrics import MetricWriter
from jaxsft.train.model_source import model_config_from
from jaxsft.train.optim import make_optimizer
from jaxsft.train.preemption import SigtermFlag
from jaxsft.train.state import abstract_train_state, init_train_state, state_shardings
from jaxsft.train.step import compiler_options, evaluate_loss, jit_train_step, make_eval_step
from jaxsft.train.validate import check_batch_layout, check_config, check_tokenizer_fits
from jaxsft.train.workdir import absolute_workdir
from jaxsft.train.workdir_lock import WorkdirLock

_LOG = logging.getLogger('jaxsft')


class RunFinished(Exception):
  """The work directory holds a run that already reached its last step; nothing was changed."""


def train(config: Any, workdir: str, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
  """Runs (or resumes) a training job; returns the last train and eval metrics and the state.

  The work directory is locked for the run (`jaxsft.train.workdir_lock`); nothing in it is written
  until the run has started (config checked, model built, checkpoint restored), so a start that
  fails leaves an existing run's files as they were. A finished run is reported, not redone.
  `callbacks` (`jaxsft.train.callbacks`) run at its start, after each step and at its end;
  the demo (`config.demo`) and sampling (`config.train.sample_prompts`) are callbacks.
  Raises `NonFiniteLoss` (the newest checkpoint is then the last good one), `Preempted`
  (SIGTERM or Ctrl-C, after saving; before the first step nothing new is saved) and `UserError`
  (also when a checkpoint cannot be written: a full disk).
  """
  check_config(config)
  _check_callbacks(config, callbacks)
  workdir = absolute_workdir(workdir)
  with WorkdirLock(workdir), SigtermFlag() as sigterm:
    return _train(config, workdir, sigterm, list(callbacks))


def _check_callbacks(config: Any, callbacks: Sequence[Callback]) -> None:
  """A switch in the config that no callback serves would be ignored silently: refused."""
  names = {callback.name for callback in callbacks}
  if config.demo.enabled and 'demo' not in names:
    raise UserError('demo.enabled=True needs the demo callback: run it with jaxsft train, or '
                    'pass callbacks=[jaxsft.demo.DemoCallback()].')
  if config.train.sample_every and config.train.sample_prompts and 'samples' not in names:
    raise UserError('train.sample_prompts needs the sampling callback: run it with jaxsft '
                    'train, or pass callbacks=[jaxsft.eval.sampling.SampleCallback()].')


def _train(config: Any, workdir: str, sigterm: SigtermFlag, callbacks: list[Callback]
           ) -> dict[str, Any]:
  checkpoint.check_writable(workdir)  # the space check follows once the state's size is known
  for callback in callbacks:
    callback.setup(config, workdir)
  model_config, folder = model_config_from(config)
  mesh, rules = mesh_and_rules(config.mesh)
  check_batch_layout(config, mesh)
  # One checkpoint's size, counted once; `check_writable` asks for room for `keep` + 1 of them.
  checkpoint_bytes = checkpoint.state_bytes(checkpoint.saveable(
      abstract_train_state(config, model_config))) // max(jax.process_count(), 1)
  checkpoint.check_writable(
      workdir, checkpoint_bytes, config.checkpoint.keep,
      existing=len(checkpoint.complete_steps(epath.Path(workdir) / 'checkpoints')))
  tokenizer_path = config.data.tokenizer or folder or ''
  tokenizer = load_tokenizer(tokenizer_path)
  check_tokenizer_fits(tokenizer, model_config.vocab_size, tokenizer_path)
  data = Pipeline(config.data, tokenizer, batch_size=config.batch_size)
  total_steps = _total_steps(config, data)
  optimizer, schedule = make_optimizer(config.optim, total_steps)
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                         save_every=config.checkpoint.save_every,
                                         async_save=config.checkpoint.async_save,
                                         create=False)  # by `prepare`, once the run starts
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
    raise Preempted(int(state.step), saved=False, interrupted=sigterm.interrupted)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    trained = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    _LOG.info('model %s: %s parameters, training %s (%s) on mesh %s, %d steps of %d rows x %d '
              'tokens', model_config.model_type, f'{model_config.num_params():,}',
              f'{trained:,}', 'LoRA' if config.lora.enabled else 'full',
              dict(mesh.shape), total_steps, config.batch_size, config.data.max_seq_len)
    shardings = state_shardings(config, model_config, optimizer, mesh, rules)
    rows = batch_sharding(mesh)
    step_fn = jit_train_step(config, model_config, optimizer, schedule, shardings, rows)
    eval_fn = jax.jit(make_eval_step(model_config, config.train.loss_chunk_size),
                      in_shardings=(shardings.variables(), {key: rows for key in ROW_KEYS}),
                      compiler_options=compiler_options(mesh.devices.flat[0].platform))
    batches = data.train_batches(data_state)
    first_local = next(batches)
    compiled = step_fn.lower(state, global_batch(first_local, rows)).compile()
    if sigterm.raised:  # during the compile
      checkpointer.close()
      raise Preempted(int(state.step), saved=False, interrupted=sigterm.interrupted)

    # The run has started: from here on the work directory is this run's, and a first Ctrl-C
    # saves before stopping (until here it stops at once: nothing was written).
    sigterm.started()
    checkpointer.prepare()
    if jax.process_index() == 0:
      (epath.Path(workdir) / 'config.json').write_text(
          config.to_json_best_effort(indent=2, sort_keys=True))
    writer = MetricWriter(workdir, config.train.tensorboard, resume_step=int(state.step))
    run = RunContext(config, model_config, tokenizer, workdir)
    for callback in callbacks:
      callback.start(run, state)
    loop = StepLoop(config, compiled, batches, rows, total_steps, writer,
                    _step_flops(config, model_config), _total_peak_flops(), eval_fn, data,
                    checkpointer, meta, callbacks, run,
                    last_saved=int(state.step) if restored is not None else None)
    try:
      state, train_metrics = loop.run(state, first_local, sigterm)
      if sigterm.raised:  # after the last step, before the final eval: its checkpoint is saved
        checkpointer.wait()
        raise Preempted(int(state.step), interrupted=sigterm.interrupted)
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
    for callback in callbacks:
      outcome = callback.end(run, state)
      if callback.name and outcome is not None:
        result[callback.name] = outcome
  writer.close()
  checkpointer.close()
  return result


def _step_flops(config: Any, model_config: LlamaConfig) -> float:
  """Model FLOPs of one step over the global batch (`jaxsft.train.flops`; every row position)."""
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


def write_summary(workdir: str, result: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    summary = {k: v for k, v in result.items() if k not in ('state', 'model_config')}
    (epath.Path(workdir) / 'summary.json').write_text(json.dumps(summary, indent=2, default=str))
