"""A run's work directory: its absolute form, and reading a run back from it.

`load_run` rebuilds what a finished (or interrupted) run holds: the config and base identity
recorded in its newest good checkpoint, the base weights, and the checkpoint's train state.
`jaxsft export`, `eval`, `generate` and `chat` all start from it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import ml_collections
from etils import epath

from jaxsft.errors import UserError
from jaxsft.models.config import LlamaConfig
from jaxsft.parallel.mesh import mesh_and_rules
from jaxsft.train import checkpoint
from jaxsft.train.model_source import model_config_from
from jaxsft.train.optim import make_optimizer
from jaxsft.train.state import TrainState, init_train_state


def absolute_workdir(workdir: str) -> str:
  """A local work directory as an absolute path (Orbax refuses relative ones); a bucket path
  (`gs://...`) as given."""
  return str(workdir) if '://' in str(workdir) else os.path.abspath(workdir)


def load_run(workdir: str) -> tuple[ml_collections.ConfigDict, LlamaConfig, str | None,
                                    TrainState, dict[str, Any]]:
  """A run's `(config, model_config, base folder, train state, meta)` from its work directory:
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
  config = ml_collections.ConfigDict(meta['config'])
  model_config, folder = model_config_from(config)
  if config.lora.enabled and meta.get('base') is not None:
    now = json.loads(json.dumps(checkpoint.base_identity(folder)))
    if now != meta['base']:
      raise UserError(f'the run in {workdir} trained adapters on the base {meta["base"]}, but '
                      f'{folder} now holds {now}; restore the original base at that path.')
  mesh, rules = mesh_and_rules(config.mesh)
  optimizer, _ = make_optimizer(config.optim, max(int(config.train.num_steps), 1))
  with nn.logical_axis_rules(rules):
    state = init_train_state(config, model_config, folder, optimizer, mesh, rules)
  _, state, _, meta = saved.restore_latest(state)
  saved.close()
  return config, model_config, folder, state, meta
