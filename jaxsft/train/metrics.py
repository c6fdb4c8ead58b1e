"""Run metrics: one log line per log step, `metrics.jsonl`, and the run's experiment trackers
(`jaxsft.train.trackers`: TensorBoard, W&B, MLflow)."""

from __future__ import annotations

import json
import logging
import os

import jax
from etils import epath

from jaxsft.train.trackers import open_trackers

_LOG = logging.getLogger('jaxsft')


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and the trackers of `report_to` (process 0
  only; `config` is the resolved config they record, `run_name` their run's name).

  A local work directory gets an appended file; a bucket (`gs://`), where objects cannot be
  appended to, gets the file rewritten at each write through `etils.epath`. A run that resumes
  from the checkpoint at `resume_step` first drops the records of later steps (written after
  that checkpoint, before the run stopped), so no step appears twice.
  """

  def __init__(self, workdir: str, report_to: tuple[str, ...] = ('tensorboard',),
               resume_step: int = 0, run_name: str = '', config: dict | None = None):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._trackers = []
    self._remote_path, self._remote_lines = None, []
    if not self.enabled:
      return
    path = epath.Path(workdir) / 'metrics.jsonl'
    kept = _lines_up_to(path.read_text(), resume_step) if path.exists() else []
    if str(workdir).startswith('gs://'):
      self._remote_path, self._remote_lines = path, kept
      self._remote_path.write_text(''.join(kept))
    else:
      os.makedirs(workdir, exist_ok=True)
      path.write_text(''.join(kept))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')  # noqa: SIM115
    self._trackers = open_trackers(tuple(report_to), str(workdir),
                                   run_name or os.path.basename(str(workdir).rstrip('/')),
                                   config or {})

  def write(self, step: int, scalars: dict[str, float], prefix: str = 'train') -> None:
    if not self.enabled:
      return
    record = {'step': step, **{f'{prefix}/{k}': v for k, v in scalars.items()}}
    line = json.dumps(record) + '\n'
    if self._remote_path is not None:
      self._remote_lines.append(line)
      self._remote_path.write_text(''.join(self._remote_lines))
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    for tracker in self._trackers:
      tracker.log(step, {k: v for k, v in record.items() if k != 'step'})

  def summary(self, values: dict) -> None:
    """The run's final summary (`summary.json`'s content) to every tracker."""
    for tracker in self._trackers:
      tracker.summary(values)

  def close(self, finished: bool = True) -> None:
    """Closes the file and the trackers; `finished` False marks their runs as stopped early
    (a resume continues them)."""
    if self._jsonl and not self._jsonl.closed:
      self._jsonl.close()
    for tracker in self._trackers:
      tracker.close(finished)
    self._trackers = []


def _lines_up_to(text: str, step: int) -> list[str]:
  """The complete records of `text` (metrics.jsonl) at steps <= `step`; a line cut off by a
  crash is dropped too."""
  kept = []
  for line in text.splitlines(keepends=True):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if int(record.get('step', 0)) <= step:
      kept.append(line if line.endswith('\n') else line + '\n')
  return kept


def format_step(step: int, total: int, m: dict[str, float]) -> str:
  """`step 120/1000 | loss 1.234 | acc 0.612 | lr 2.0e-05 | gnorm 0.91 | tok 8,192 | ...`"""
  parts = [f'step {step}/{total}', f'loss {m["loss"]:.4f}', f'acc {m["accuracy"]:.3f}',
           f'lr {m["lr"]:.2e}', f'gnorm {m["grad_norm"]:.3f}',
           f'sup_tok {int(m["supervised_tokens"]):,}', f'tok/s {m["tokens_per_s"]:,.0f}']
  if m.get('router_aux_loss') is not None:  # mixture of experts: the load-balancing loss
    parts.insert(2, f'aux {m["router_aux_loss"]:.4f}')
  if m.get('mfu') is not None:
    parts.append(f'mfu {100 * m["mfu"]:.1f}%')
  return ' | '.join(parts)
