"""The step loop of a run: steps, logging (tok/s, MFU), checkpoints, periodic eval and the
callbacks, with the non-finite-loss guard and preemption.

Each step's loss is checked while the next step runs (no stall), except before a checkpoint: a
state is only saved once its loss is known to be finite.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding
from tqdm import tqdm

from jaxsft.errors import check_number
from jaxsft.parallel.batch import global_batch
from jaxsft.train.callbacks import Callback, RunContext
from jaxsft.train.metrics import MetricWriter, format_step
from jaxsft.train.preemption import SigtermFlag
from jaxsft.train.state import TrainState
from jaxsft.train.step import evaluate_loss

_LOG = logging.getLogger('jaxsft')


EXIT_NON_FINITE = 3    # the CLI's exit code when the loss became NaN or infinite
EXIT_PREEMPTED = 75    # EX_TEMPFAIL: preempted (SIGTERM), checkpoint saved; start it again
# Ctrl-C: `preemption.EXIT_INTERRUPTED` (130), defined where the CLI finds it before JAX loads.


class Preempted(Exception):
  """SIGTERM, Ctrl-C (`interrupted`) or a TPU preemption notice: the state at `step` is
  checkpointed (`saved`), or the run had not taken its first step yet (nothing new to save)."""

  def __init__(self, step: int, saved: bool = True, interrupted: bool = False):
    what = ('the checkpoint is saved and the run resumes from it' if saved else
            'it stopped before its first step, so nothing new was saved; it starts (or resumes)')
    how = 'interrupted (Ctrl-C)' if interrupted else 'preempted'
    super().__init__(f'{how} at step {step}; {what} when started again on the same work '
                     'directory.')
    self.step = step
    self.saved = saved
    self.interrupted = interrupted


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How often the loop logs (`log_every` steps; tok/s and MFU per line), evaluates
  (`eval_every` steps, 0 = only at the end) and whether it draws a progress bar."""

  log_every: int = 10
  eval_every: int = 0
  progress_bar: bool = True

  def __post_init__(self):
    check_number('train.log_every', self.log_every, low=1, integer=True)
    check_number('train.eval_every', self.eval_every, low=0, integer=True)


@dataclasses.dataclass
class StepLoop:
  """The step loop. Each step's loss is checked while the next step runs (no stall), except
  before a checkpoint: a state is only saved once its loss is known to be finite."""

  settings: LoopSettings
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
  callbacks: Sequence[Callback] = ()
  run_context: RunContext | None = None
  last_saved: int | None = None

  def run(self, state: TrainState, local: dict, sigterm: SigtermFlag):
    settings, total_steps = self.settings, self.total_steps
    progress = tqdm(total=total_steps, initial=int(state.step), dynamic_ncols=True, leave=False,
                    disable=not settings.progress_bar or jax.process_index() != 0 or
                    not sys.stderr.isatty())
    say = progress.write if not progress.disable else (
        _LOG.info if jax.process_index() == 0 else lambda *_: None)
    batch = global_batch(local, self.rows)
    position = self.batches.state()  # the data position after this step's batch
    if sigterm.raised:
      progress.close()
      raise Preempted(int(state.step), saved=False, interrupted=sigterm.interrupted)
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
    settings, total_steps = self.settings, self.total_steps
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
      if done % settings.log_every == 0 or done == total_steps:
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
        raise Preempted(done, interrupted=sigterm.interrupted)
      for callback in self.callbacks:
        for line in callback.step(self.run_context, done, state):
          say(line)
      if settings.eval_every and done % settings.eval_every == 0 and done < total_steps:
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
