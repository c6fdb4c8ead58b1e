"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, fed the run's step metrics.

`train.report_to` lists the trackers of a run (TensorBoard by default; `[]` for none:
`metrics.jsonl` is always written). Each receives, from process 0 only, the same scalars as
`metrics.jsonl` at the same steps (`train/loss`, `eval/perplexity`, ...; values that are None
or not finite are left out), the resolved config once, and the final summary at the end.

A run keeps its tracker runs: the W&B run id and the MLflow run id are written to
`trackers.json` in the work directory when they are made, and a resumed run logs into the
same tracker runs (W&B `resume='allow'`, MLflow's run id) instead of starting second ones.
Steps that a resume computes again are the checkpoint's continuation, so any step a tracker
receives twice carries equal values (the resume is exact).

Where they write:
- TensorBoard: event files in `workdir/tensorboard`;
- W&B: `workdir/wandb` (its offline runs too), project `$WANDB_PROJECT` or `jaxsft`; offline
  with `WANDB_MODE=offline` (`wandb sync workdir/wandb/offline-run-*` uploads later);
- MLflow: `$MLFLOW_TRACKING_URI` (a server, a database), else a file store in
  `workdir/mlruns` (`mlflow ui --backend-store-uri workdir/mlruns`); experiment
  `$MLFLOW_EXPERIMENT_NAME` or `jaxsft`.

W&B and MLflow are optional extras (`pip install 'jaxsft[wandb]'`, `'jaxsft[mlflow]'`);
`check_trackers` refuses a tracker that is not installed before anything is built.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from typing import Any, Protocol

from etils import epath

from jaxsft.errors import UserError

# Tracker name -> (the module it needs, the pip extra that brings it).
TRACKERS = {'tensorboard': ('tensorboardX', ''), 'wandb': ('wandb', 'wandb'),
            'mlflow': ('mlflow', 'mlflow')}
IDS_FILE = 'trackers.json'  # the tracker runs' ids, in the work directory


def check_trackers(report_to: tuple[str, ...]) -> None:
  """Refuses (`UserError`) an unknown tracker name, a repeated one, or one whose package is
  not installed, naming the extra to install."""
  for name in report_to:
    if name not in TRACKERS:
      raise UserError(f'train.report_to={list(report_to)}: unknown tracker {name!r}; choose '
                      f'from {sorted(TRACKERS)}.')
  if len(set(report_to)) != len(report_to):
    raise UserError(f'train.report_to={list(report_to)}: a tracker is listed twice.')
  for name in report_to:
    module, extra = TRACKERS[name]
    try:
      importlib.import_module(module)
    except ImportError as error:
      install = f"pip install 'jaxsft[{extra}]'" if extra else f'pip install {module}'
      raise UserError(f'train.report_to={list(report_to)}: {name} needs the {module} package, '
                      f'which does not import ({error}); install it with {install}, or '
                      f'remove {name!r} from the list.') from None


class Tracker(Protocol):
  """One experiment tracker: scalars per step, then a summary, then closed."""

  def log(self, step: int, scalars: dict[str, float]) -> None: ...

  def summary(self, values: dict[str, Any]) -> None: ...

  def close(self, finished: bool) -> None: ...


def open_trackers(report_to: tuple[str, ...], workdir: str, run_name: str,
                  config: dict[str, Any]) -> list[Tracker]:
  """The trackers of `report_to`, each logging into the work directory's tracker run (made
  now and its id recorded in `trackers.json`, or the recorded one continued)."""
  ids_path = epath.Path(workdir) / IDS_FILE
  ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
  opened = []
  for name in report_to:
    if name == 'tensorboard':
      opened.append(_TensorBoard(workdir))
    elif name == 'wandb':
      opened.append(_Wandb(workdir, run_name, config, ids.get('wandb')))
      ids['wandb'] = opened[-1].run_id
    else:
      opened.append(_Mlflow(workdir, run_name, config, ids.get('mlflow')))
      ids['mlflow'] = opened[-1].run_id
    if name != 'tensorboard':
      ids_path.write_text(json.dumps(ids, indent=2) + '\n')
  return opened


def _finite(scalars: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in scalars.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_scalars(tree: dict[str, Any]) -> dict[str, float]:
  """`{'eval': {'loss': 1.2}}` -> `{'eval/loss': 1.2}`: the finite numbers of a nested dict."""
  return _finite(_flatten(tree, '/'))


def _flatten(tree: dict[str, Any], separator: str, prefix: str = '') -> dict[str, Any]:
  """A nested dict's leaves under their joined keys."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, separator, f'{prefix}{key}{separator}'))
    else:
      out[f'{prefix}{key}'] = value
  return out


class _TensorBoard:
  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._writer = SummaryWriter(os.path.join(str(workdir), 'tensorboard'))

  def log(self, step, scalars):
    for key, value in _finite(scalars).items():
      self._writer.add_scalar(key, value, step)

  def summary(self, values):
    self._writer.add_text('summary', json.dumps(values, indent=2, default=str))

  def close(self, finished):
    del finished
    self._writer.close()


class _Wandb:
  def __init__(self, workdir: str, run_name: str, config: dict[str, Any], run_id: str | None):
    import wandb  # pylint: disable=import-outside-toplevel
    try:
      self._run = wandb.init(project=os.environ.get('WANDB_PROJECT') or 'jaxsft',
                             name=run_name, dir=str(workdir), id=run_id, resume='allow',
                             config=config, allow_val_change=True)
    except Exception as error:  # no login, no network: the user's setup, one line
      raise UserError(f'train.report_to: W&B could not start a run ({" ".join(str(error).split())}'
                      '); log in with `wandb login`, or set WANDB_MODE=offline to write the '
                      'run locally and `wandb sync` it later.') from None
    self.run_id = self._run.id

  def log(self, step, scalars):
    self._run.log(_finite(scalars), step=step)

  def summary(self, values):
    self._run.summary.update(flat_scalars(values))

  def close(self, finished):
    self._run.finish(exit_code=0 if finished else 1)


class _Mlflow:
  def __init__(self, workdir: str, run_name: str, config: dict[str, Any], run_id: str | None):
    # pylint: disable=import-outside-toplevel
    from mlflow.tracking import MlflowClient
    uri = os.environ.get('MLFLOW_TRACKING_URI')
    if not uri:
      # MLflow keeps its file store behind this switch; the work directory is the run's.
      os.environ.setdefault('MLFLOW_ALLOW_FILE_STORE', 'true')
      uri = epath.Path(workdir, 'mlruns').as_uri()
    self._client = MlflowClient(uri)
    if run_id is None:
      name = os.environ.get('MLFLOW_EXPERIMENT_NAME') or 'jaxsft'
      experiment = self._client.get_experiment_by_name(name)
      experiment_id = (experiment.experiment_id if experiment else
                       self._client.create_experiment(name))
      run = self._client.create_run(experiment_id, run_name=run_name,
                                    tags={'workdir': str(workdir)})
      run_id = run.info.run_id
      self._client.log_dict(run_id, config, 'config.json')
      # Params are write-once in MLflow: the config as the run started (a resume may change
      # num_steps; config.json in the work directory has the newest).
      from mlflow.entities import Param
      params = [Param(k, str(v)[:6000]) for k, v in _flatten(config, '.').items()]
      for start in range(0, len(params), 100):
        self._client.log_batch(run_id, params=params[start:start + 100])
    else:
      self._client.update_run(run_id, status='RUNNING')
    self.run_id = run_id

  def log(self, step, scalars):
    from mlflow.entities import Metric  # pylint: disable=import-outside-toplevel
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in _finite(scalars).items()]
    if metrics:
      self._client.log_batch(self.run_id, metrics=metrics)

  def summary(self, values):
    self._client.log_dict(self.run_id, json.loads(json.dumps(values, default=str)),
                          'summary.json')

  def close(self, finished):
    self._client.set_terminated(self.run_id, status='FINISHED' if finished else 'KILLED')
