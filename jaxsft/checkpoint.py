"""Orbax checkpoints of a run: what a resume needs to continue exactly.

A checkpoint at step s holds
  state   the train state without the frozen base (LoRA: adapters + their optimizer state;
          full fine-tuning: every parameter), step and RNG key;
  data    the data iterator's position after s batches, one entry per JAX process;
  meta    the resolved config and the identity of the HF base checkpoint.
Saves are asynchronous and keep the last `checkpoint.keep`. Orbax writes into a temporary
directory and renames it when complete, so a checkpoint cut off mid-write is never listed and
never resumed from. Restoring takes the shardings of the current run's state, so a checkpoint
written on one mesh (or number of processes) restores onto another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_LOG = logging.getLogger('jaxsft')


def base_identity(folder: str | None) -> dict[str, Any] | None:
  """What identifies an HF base checkpoint: its path, config.json and weight file sizes."""
  if folder is None:
    return None
  path = epath.Path(folder)
  digest = hashlib.sha256((path / 'config.json').read_bytes()).hexdigest()
  files = sorted((p.name, p.stat().length) for p in path.glob('*.safetensors'))
  return {'path': str(folder), 'config_sha256': digest, 'weights': files}


def gather_json(value: Any) -> list[Any]:
  """Every process's JSON-serializable `value`, in process order (on every process)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  length = multihost_utils.process_allgather(np.array([len(encoded)], np.int32))
  padded = np.zeros(int(np.max(length)), np.uint8)
  padded[:len(encoded)] = encoded
  everything = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(everything, length.ravel())]


def check_writable(workdir: str, needed_bytes: int = 0) -> None:
  """Fails at start, not after an hour, when the work directory cannot take checkpoints."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_probe_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as error:
    raise OSError(f'the work directory {workdir} is not writable ({error}); choose another '
                  '--workdir or fix its permissions.') from error
  if needed_bytes and not str(workdir).startswith('gs://'):
    free = shutil.disk_usage(workdir).free
    if free < needed_bytes:
      raise OSError(f'the work directory {workdir} has {free / 2**30:.2f} GiB free but one '
                    f'checkpoint needs about {needed_bytes / 2**30:.2f} GiB (times '
                    'checkpoint.keep); free space or choose another --workdir.')


class Checkpointer:
  """Saves and restores the state, data position and metadata of a run."""

  def __init__(self, workdir: str, *, keep: int = 3, save_every: int = 0,
               async_save: bool = True):
    self.directory = epath.Path(workdir) / 'checkpoints'
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        save_interval_steps=max(save_every, 1))
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return bool(self.save_every) and step % self.save_every == 0

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption sync point (TPU maintenance events)."""
    return self.manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_state: Any, meta: dict[str, Any]) -> None:
    data_states = gather_json(data_state)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(saveable(state)),
        data=ocp.args.JsonSave({'processes': data_states}),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, like_state: Any) -> tuple[Any, list[Any], dict[str, Any]]:
    """`(state, data states by process, meta)`. The trainable part is restored onto the
    shardings of `like_state` (the freshly initialised state of this run); its frozen base is
    kept as is."""
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        saveable(like_state))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    state = restored['state'].replace(frozen=like_state.frozen)
    return state, restored['data']['processes'], restored['meta']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def saveable(state: Any) -> Any:
  """The part of the state a checkpoint holds: the frozen base is re-read from its source."""
  return state.replace(frozen=None)


def data_state_for_process(states: list[Any], process_index: int, process_count: int) -> Any:
  """This process's saved data position. In-memory pipelines keep a global position, so a
  run may resume on another number of processes; streams are per process."""
  if len(states) == process_count:
    return states[process_index]
  first = states[0]
  if first.get('streaming'):
    raise ValueError(f'the checkpoint was written by {len(states)} processes reading streams; '
                     f'resuming a streaming run needs the same number ({process_count} now).')
  return first


def log_restore(step: int, directory: Any) -> None:
  _LOG.info('resuming from the checkpoint at step %d in %s', step, directory)

