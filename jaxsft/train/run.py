"""`jaxsft train`: a run from its config to its last checkpoint, and a run read back.

`run_settings(config)` is the one place the CLI's config becomes the parts' settings
(`RunSettings`: `ModelSettings`, `LoraSettings`, `QuantSettings`, `OptimizerSettings`,
`MeshSettings`, `StepSettings`, `LoopSettings`, ...); nothing below reads the config.
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
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from etils import epath

from jaxsft.adapters.lora import LoraSettings
from jaxsft.adapters.quant import QuantSettings
from jaxsft.data.packing import ROW_KEYS
from jaxsft.data.pipeline import Pipeline
from jaxsft.data.tokenizer import load_tokenizer
from jaxsft.errors import UserError, check_number
from jaxsft.models.config import LlamaConfig
from jaxsft.parallel.batch import batch_sharding, global_batch
from jaxsft.parallel.mesh import MeshSettings, mesh_and_rules
from jaxsft.train import checkpoint
from jaxsft.train.callbacks import Callback, RunContext
from jaxsft.train.flops import device_peak_flops, train_flops_per_token
from jaxsft.train.loop import LoopSettings, Preempted, StepLoop
from jaxsft.train.metrics import MetricWriter
from jaxsft.train.trackers import check_trackers
from jaxsft.train.model_source import ModelSettings, model_config_from
from jaxsft.train.optim import OptimizerSettings, make_optimizer
from jaxsft.train.preemption import SigtermFlag
from jaxsft.train.settings import CheckpointSettings, RunSettings
from jaxsft.train.state import (
    TrainState,
    abstract_train_state,
    init_train_state,
    state_shardings,
)
from jaxsft.train.step import (
    StepSettings,
    compiler_options,
    evaluate_loss,
    jit_train_step,
    make_eval_step,
)
from jaxsft.train.validate import check_batch_layout, check_data_config, check_tokenizer_fits
from jaxsft.train.workdir import absolute_workdir
from jaxsft.train.workdir_lock import WorkdirLock

_LOG = logging.getLogger('jaxsft')


class RunFinished(Exception):
  """The work directory holds a run that already reached its last step; nothing was changed."""


# A settings error names its key (`lora.rank=0: must be >= 1.`); from a config, say where to fix.
_SETTING = re.compile(r'^(?:config )?([A-Za-z_][\w.\[\]]*)=')


def run_settings(config: Any) -> RunSettings:
  """The parts' settings of a run config (the CLI's `ConfigDict`), each checked as it is made:
  the first value that cannot work is a `UserError` naming the setting and the fix."""
  try:
    check_number('train.sample_every', config.train.sample_every, low=0, integer=True)
    check_data_config(config.data)
    t, lora, quant = config.train, config.lora, config.quant
    lora_settings = LoraSettings(
        rank=lora.rank, alpha=lora.alpha, rslora=lora.rslora, dropout=lora.dropout,
        targets=tuple(lora.targets), modules_to_save=tuple(lora.modules_to_save),
        dora=lora.get('dora', False)) if lora.enabled else None
    quant_settings = None if quant.kind == 'none' else QuantSettings(
        kind=quant.kind, block_size=quant.block_size, double_quant=quant.double_quant,
        double_quant_rounding=quant.double_quant_rounding, targets=tuple(quant.targets))
    return RunSettings(
        model=ModelSettings(**config.model.to_dict()), data=config.data,
        batch_size=config.batch_size,
        lora=lora_settings, quant=quant_settings,
        lora_init_from=lora.init_from if lora.enabled else '',
        optim=OptimizerSettings(**config.optim.to_dict()),
        mesh=MeshSettings(shape=tuple(config.mesh.shape), rules=tuple(config.mesh.rules)),
        step=StepSettings(grad_accum_steps=t.grad_accum_steps, neftune_alpha=t.neftune_alpha,
                          loss_chunk_size=t.loss_chunk_size),
        loop=LoopSettings(log_every=t.log_every, eval_every=t.eval_every,
                          progress_bar=t.progress_bar),
        checkpoint=CheckpointSettings(**config.checkpoint.to_dict()),
        num_steps=t.num_steps, num_epochs=t.num_epochs, seed=t.seed,
        # Keys newer than some saved runs' configs (`load_run` reads those back) default.
        report_to=tuple(t.get('report_to', ['tensorboard'] if t.get('tensorboard', True)
                              else [])),
        run_name=t.get('run_name', ''))
  except UserError as error:
    message = str(error)
    key = _SETTING.match(message)
    if key is None or re.search(r'\bset\b', message, re.IGNORECASE):
      raise  # no setting named first, or the message already says what to set
    raise UserError(f'config {message.removeprefix("config ")} Set it with '
                    f'--config.{key.group(1)}=... or in the config file.') from None


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
  settings = run_settings(config)  # every value checked before the work directory is touched
  check_trackers(settings.report_to)  # (a run read back for export needs none of them)
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
  settings = run_settings(config)  # after `setup`, which may point the config at its files
  model_config, folder = model_config_from(settings.model, settings.lora)
  mesh, rules = mesh_and_rules(settings.mesh)
  check_batch_layout(settings.batch_size, settings.step.grad_accum_steps, mesh,
                     settings.max_seq_len)
  # One checkpoint's size, counted once; `check_writable` asks for room for `keep` + 1 of them.
  optimizer_for_shapes, _ = make_optimizer(settings.optim, 1)
  checkpoint_bytes = checkpoint.state_bytes(checkpoint.saveable(abstract_train_state(
      model_config, optimizer_for_shapes, lora=settings.lora, quant=settings.quant))
  ) // max(jax.process_count(), 1)
  checkpoint.check_writable(
      workdir, checkpoint_bytes, settings.checkpoint.keep,
      existing=len(checkpoint.complete_steps(epath.Path(workdir) / 'checkpoints')))
  tokenizer_path = settings.data.tokenizer or folder or ''
  tokenizer = load_tokenizer(tokenizer_path)
  check_tokenizer_fits(tokenizer, model_config.vocab_size, tokenizer_path)
  data = Pipeline(settings.data, tokenizer, batch_size=settings.batch_size)
  total_steps = _total_steps(settings, data)
  optimizer, schedule = make_optimizer(settings.optim, total_steps)
  checkpointer = checkpoint.Checkpointer(workdir, keep=settings.checkpoint.keep,
                                         save_every=settings.checkpoint.save_every,
                                         async_save=settings.checkpoint.async_save,
                                         create=False)  # by `prepare`, once the run starts
  lora_enabled = settings.lora is not None
  # As JSON gives it back on resume (tuples become lists), so the comparison below is exact.
  # The chat template's text goes with every checkpoint: exports carry what training rendered.
  meta = json.loads(json.dumps({
      'config': json.loads(config.to_json_best_effort()),
      'base': checkpoint.base_identity(folder) if lora_enabled else None,
      'chat_template': data.template.source}))

  # Init places every array explicitly; the mesh context is for tracing the model's
  # activation constraints in the step.
  with nn.logical_axis_rules(rules):
    state = init_train_state(model_config, optimizer, mesh, rules, base=folder,
                             lora=settings.lora, quant=settings.quant, seed=settings.seed,
                             adapters_from=settings.lora_init_from)
  data_state = None
  restored = checkpointer.restore_latest(state) if settings.checkpoint.resume else None
  if restored is not None:
    latest, state, data_states, saved_meta = restored
    checkpoint.log_restore(latest, checkpointer.directory)
    if lora_enabled and saved_meta.get('base') != meta['base']:
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
              f'{trained:,}', 'LoRA' if lora_enabled else 'full',
              dict(mesh.shape), total_steps, settings.batch_size, settings.max_seq_len)
    shardings = state_shardings(model_config, optimizer, mesh, rules, lora=settings.lora,
                                quant=settings.quant)
    rows = batch_sharding(mesh)
    step_fn = jit_train_step(model_config, optimizer, shardings, rows, settings.step, schedule)
    eval_fn = jax.jit(make_eval_step(model_config, settings.step.loss_chunk_size),
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
    writer = MetricWriter(workdir, settings.report_to, resume_step=int(state.step),
                          run_name=settings.run_name,
                          config=json.loads(config.to_json_best_effort()))
    run = RunContext(config, model_config, tokenizer, workdir, settings.data.template)
    for callback in callbacks:
      callback.start(run, state)
    loop = StepLoop(settings.loop, compiled, batches, rows, total_steps, writer,
                    _step_flops(settings, model_config), _total_peak_flops(), eval_fn, data,
                    checkpointer, meta, callbacks, run,
                    last_saved=int(state.step) if restored is not None else None)
    try:
      state, train_metrics = loop.run(state, first_local, sigterm)
      if sigterm.raised:  # after the last step, before the final eval: its checkpoint is saved
        checkpointer.wait()
        raise Preempted(int(state.step), interrupted=sigterm.interrupted)
    except BaseException:
      checkpointer.wait()
      writer.close(finished=False)
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
    writer.summary(summary_of(result))
  writer.close()
  checkpointer.close()
  return result


def _step_flops(settings: RunSettings, model_config: LlamaConfig) -> float:
  """Model FLOPs of one step over the global batch (`jaxsft.train.flops`; every row position)."""
  seq_len, lora = settings.max_seq_len, settings.lora
  per_token = train_flops_per_token(
      model_config, seq_len, lora_rank=lora.rank if lora else 0,
      lora_targets=list(lora.targets) if lora else [])
  return per_token.total * settings.batch_size * seq_len


def _total_peak_flops() -> float | None:
  peak = device_peak_flops()
  return peak * jax.device_count() if peak else None


def _total_steps(settings: RunSettings, data: Any) -> int:
  if settings.num_steps > 0:
    return int(settings.num_steps)  # a stream always has them (`RunSettings`)
  rows = len(data._plan_window(0)[1])  # pylint: disable=protected-access
  return max(1, math.ceil(settings.num_epochs * rows / settings.batch_size))


def summary_of(result: dict[str, Any]) -> dict[str, Any]:
  """What `summary.json` holds of `train`'s result: all but the state and the model config."""
  return {k: v for k, v in result.items() if k not in ('state', 'model_config')}


def write_summary(workdir: str, result: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'summary.json').write_text(
        json.dumps(summary_of(result), indent=2, default=str))


def load_run(workdir: str) -> tuple[RunSettings, LlamaConfig, str | None, TrainState,
                                    dict[str, Any]]:
  """A run's `(settings, model_config, base folder, train state, meta)` from its work directory:
  the config and base identity recorded in its newest good checkpoint (not `config.json`,
  which a later failed start may have rewritten), its base weights, and the checkpoint's state.
  A LoRA run whose base changed on disk since training is refused."""
  workdir = absolute_workdir(workdir)
  if not epath.Path(workdir).exists():
    raise UserError(f'the work directory {workdir} does not exist; pass the --workdir of a '
                    'jaxsft train run.')
  saved = checkpoint.Checkpointer(workdir)
  step = saved.latest_step()
  if step is None:
    raise UserError(f'{workdir}/checkpoints holds no checkpoint; is {workdir} the --workdir of '
                    'a jaxsft train run that saved one?')
  meta = saved.read_meta(step)
  settings = run_settings(ml_collections.ConfigDict(meta['config']))
  model_config, folder = model_config_from(settings.model, settings.lora)
  if settings.lora is not None and meta.get('base') is not None:
    now = json.loads(json.dumps(checkpoint.base_identity(folder)))
    if now != meta['base']:
      raise UserError(f'the run in {workdir} trained adapters on the base {meta["base"]}, but '
                      f'{folder} now holds {now}; restore the original base at that path.')
  mesh_settings = settings.mesh
  if math.prod(size for size in mesh_settings.shape if size > 0) > jax.device_count():
    # Trained on more devices than this machine has (a slice, read on a workstation): the
    # values do not depend on the layout, so its devices hold the state with FSDP instead.
    mesh_settings = MeshSettings(shape=(1, -1, 1, 1), rules=mesh_settings.rules)
  mesh, rules = mesh_and_rules(mesh_settings)
  optimizer, _ = make_optimizer(settings.optim, max(int(settings.num_steps), 1))
  with nn.logical_axis_rules(rules):
    state = init_train_state(model_config, optimizer, mesh, rules, base=folder,
                             lora=settings.lora, quant=settings.quant, seed=settings.seed)
  _, state, _, meta = saved.restore_latest(state)
  saved.close()
  return settings, model_config, folder, state, meta
