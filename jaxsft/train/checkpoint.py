"""Orbax checkpoints of a run: what a resume needs to continue exactly, and proof it is intact.

A checkpoint at step s holds
  state   the train state without the frozen base (LoRA: adapters + their optimizer state;
          full fine-tuning: every parameter), step and RNG key;
  data    the data iterator's position after s batches, one entry per JAX process;
  meta    the resolved config, the identity of the HF base checkpoint, and `checksums`.
Saves are asynchronous and keep the last `checkpoint.keep`. Orbax writes into a temporary
directory (`<step>.orbax-checkpoint-tmp`) and renames it when complete, so a checkpoint cut off
mid-write is never listed and never resumed from; a run removes such leftovers when it starts
(`prepare`). Restoring takes the shardings of the current run's state, so a checkpoint written
on one mesh (or number of processes) restores onto another.

Failed saves surface from Orbax's background threads at the next `save`, `wait` or `close`;
those raise one-line `UserError`s (`checkpoint_storage.save_failure`) after removing that step's
temporary folder, so the newest complete checkpoint stays the resume point. The disk side (space,
writability, leftovers, moving aside, write failures, Orbax's noise about them) is
`train.checkpoint_storage`.

Integrity. A complete directory can still hold wrong bytes (a disk or bucket fault, a copy cut
short, a file edited by hand). Orbax compresses array chunks with zstd, which has no checksum
here: a flipped bit in a stored chunk usually restores as a silently wrong value. So every save
records, in `meta['checksums']`, two wrapping uint32 sums per leaf of the state (`checksums`),
computed on device in one jitted pass over the arrays just before they are handed to Orbax,
and a restore recomputes them on the restored arrays. Nothing re-reads the files: a 7B state is
read once more from device memory, not from disk (see docs/benchmarks.md for the cost).
Checkpoints written before checksums existed restore unverified (logged at INFO).

API
  Checkpointer(workdir, *, keep=3, save_every=0, async_save=True, create=True)
        create=False: the folder is made by `prepare` (a start that fails writes nothing)
    .save(step, state, data_state, meta)      records meta['checksums'] for the saved state;
        `UserError` when this save or the one before it could not be written
    .restore(step, like_state, *, verify=True) -> (state, data_states, meta)
        raises `CorruptCheckpoint` when the step cannot be read or its checksums differ
    .restore_latest(like_state) -> (step, state, data_states, meta) | None
        newest good step; corrupt newer ones are logged (warning) and moved to
        WORKDIR/checkpoints_bad/<step>; None without checkpoints; `UserError` when every
        checkpoint is corrupt (they are then left where they are)
    .set_aside(step, reason) -> path | None    waits for pending saves, moves that step to
        WORKDIR/checkpoints_bad/<step> with REASON.txt (a diverged state)
    .read_meta(step) -> dict                    only the meta item of a step
    .prepare() -> [path]    creates the folder, removes leftover temporary folders (process 0;
        only `jaxsft train`, which holds the work directory's lock, calls it, as its run starts)
    .latest_step(), .should_save(step), .reached_preemption(step)
    .wait(), .close()                           `UserError` when the pending save failed
  saveable(state);  data_state_for_process(states, index, count);  log_restore(step, directory)
  from checkpoint_storage: TMP_SUFFIX, check_writable, space_needed, state_bytes,
        complete_steps, base_identity, gather_json (see there)
  checksums(tree) -> {leaf path: {'sums': [s1, s2], 'dtype': str, 'shape': [int]}}
  checksum_mismatches(expected, actual) -> [leaf path]
  CorruptCheckpoint(step, directory, reason)   .step, .reason; restore_latest handles it
A step whose state is readable but shaped unlike `like_state` (another model, LoRA rank or
optimizer) raises `UserError` from `restore` and `restore_latest`: not a corruption, so nothing
is moved. Multi-host: every process calls these; only process 0 moves directories.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxsft.errors import UserError
from jaxsft.train.checksums import (
  CHECKSUM_ALGORITHM,
  checksum_mismatches,
  checksums,
  is_key,
  path_name,
)
from jaxsft.train.checkpoint_storage import (
  TMP_SUFFIX,
  HeldOrbaxErrors,
  base_identity,
  check_writable,
  complete_steps,
  first_line,
  gather_json,
  move_aside,
  orphaned_reads_to_debug_log,
  remove,
  save_failure,
  space_needed,
  state_bytes,
  unfinished,
)

_LOG = logging.getLogger('jaxsft')
__all__ = ['BAD_DIRECTORY', 'TMP_SUFFIX', 'Checkpointer', 'CorruptCheckpoint', 'base_identity',
           'check_writable', 'checksum_mismatches', 'checksums', 'complete_steps',
           'data_state_for_process', 'gather_json', 'log_restore', 'saveable', 'space_needed',
           'state_bytes']

# Where corrupt or diverged checkpoints are moved, next to `checkpoints/`.
BAD_DIRECTORY = 'checkpoints_bad'


class CorruptCheckpoint(Exception):
  """A checkpoint step that cannot be read or whose arrays differ from what was saved."""

  def __init__(self, step: int, directory: Any, reason: str):
    super().__init__(f'checkpoint step {step} in {directory} is corrupt ({reason})')
    self.step = step
    self.reason = reason


class Checkpointer:
  """Saves and restores the state, data position and metadata of a run (see the module
  docstring for the API and the integrity checks)."""

  def __init__(self, workdir: str, *, keep: int = 3, save_every: int = 0,
               async_save: bool = True, create: bool = True):
    self.workdir = epath.Path(workdir)
    self.directory = self.workdir / 'checkpoints'
    self.bad_directory = self.workdir / BAD_DIRECTORY
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=create,
        save_interval_steps=max(save_every, 1))
    self.save_every = save_every
    self.keep = keep
    self._pending: int | None = None  # the step whose save may still be in flight
    self._checkpoint_bytes = 0  # one checkpoint's state, for the message of a failed save
    self._held = HeldOrbaxErrors()
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
    """Saves asynchronously; `meta` is stored with `meta['checksums']` added (the caller's dict
    is not changed). The checksums take one on-device pass over the state and a transfer of
    8 bytes per leaf, which waits for the step that produced `state`; Orbax's save waits for
    it anyway to copy the arrays off the device."""
    to_save = saveable(state)
    self._checkpoint_bytes = state_bytes(to_save)
    data_states = gather_json(data_state)
    meta = {**meta, 'checksums': {'algorithm': CHECKSUM_ALGORITHM,
                                  'leaves': checksums(to_save)}}
    # Orbax would wait for the previous save inside its `save`: waiting here first reports a
    # failure of that save under its own step.
    self.wait()
    self._held.hold()
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(to_save),
          data=ocp.args.JsonSave({'processes': data_states}),
          meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as error:
      self._pending = None
      failure = self._save_failed(step, error)
      if failure is None:
        raise
      raise failure from error

  def restore(self, step: int, like_state: Any, *, verify: bool = True
              ) -> tuple[Any, list[Any], dict[str, Any]]:
    """`(state, data states by process, meta)`. The trainable part is restored onto the
    shardings of `like_state` (the freshly initialised state of this run); its frozen base is
    kept as is.

    Raises `CorruptCheckpoint` when Orbax cannot read the step or (with `verify`) a leaf's
    checksum differs from the one recorded at save; `UserError` when the step is readable
    but holds a differently shaped state than `like_state` (another model or optimizer).
    """
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        saveable(like_state))
    # Before reading any array: Orbax reports another state's shapes only after starting every
    # read, and the reads it leaves running then print tracebacks from its threads.
    self._raise_if_other_state(step, target)
    failure = None
    with orphaned_reads_to_debug_log():
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      # Broad on purpose, and around this call only: truncated, missing or garbled files
      # surface as tensorstore/zstd errors, plain `Exception`s from Orbax, ValueError, OSError
      # or JSON errors, with no common base class.
      except Exception as error:  # pylint: disable=broad-exception-caught
        _LOG.debug('reading checkpoint step %d failed', step, exc_info=True)
        failure = f'{type(error).__name__}: {first_line(error)}'
      if failure is not None:  # out of the except block, which keeps Orbax's reads alive
        for _ in range(3):  # reads still in flight in tensorstore's threads end within ms
          gc.collect()
          time.sleep(0.05)
    if failure is not None:
      raise CorruptCheckpoint(step, self.directory, f'it cannot be read: {failure}')
    state = restored['state'].replace(frozen=like_state.frozen)
    meta = restored['meta'] if isinstance(restored['meta'], dict) else {}
    if verify:
      self._verify(step, saveable(state), meta)
    return state, restored['data']['processes'], meta

  def restore_latest(self, like_state: Any
                     ) -> tuple[int, Any, list[Any], dict[str, Any]] | None:
    """`(step, state, data states by process, meta)` of the newest checkpoint that reads back
    intact, or None when there is none. A newer step that cannot be read or whose checksums
    differ is logged as a warning by name and, once an older good step is found, moved to
    `WORKDIR/checkpoints_bad/<step>` (never deleted) so that no later resume or export lists it
    again. When every checkpoint is corrupt, raises `UserError` naming them and leaves them in
    place: resuming then needs the user's decision, not a silent fresh start.

    Every process restores every step; the processes agree on which steps are corrupt, so all
    of them resume from the same one. A `UserError` (another model's state) is not a
    corruption and propagates at once.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    corrupt: list[tuple[int, str]] = []
    for i, step in enumerate(steps):
      try:
        restored = self.restore(step, like_state)
        problem = None
      except CorruptCheckpoint as error:
        restored, problem = None, error.reason
      # A process-local read error must not send the processes to different steps.
      problem = next((p for p in gather_json(problem) if p), None)
      if problem is None:
        for bad, reason in corrupt:
          self._move_aside(bad, f'corrupt: {reason}')
        return (step, *restored)
      older = steps[i + 1] if i + 1 < len(steps) else None
      _LOG.warning('checkpoint step %d in %s is corrupt (%s); %s', step, self.directory,
                   problem, f'falling back to step {older}' if older is not None
                   else 'no older checkpoint is left')
      corrupt.append((step, problem))
    if not corrupt:
      return None
    named = '; '.join(f'step {step}: {reason}' for step, reason in corrupt)
    raise UserError(f'every checkpoint in {self.directory} is corrupt ({named}); move that '
                    'directory away (or restore it from a copy) to start afresh, or choose '
                    'another --workdir.')

  def set_aside(self, step: int, reason: str) -> epath.Path | None:
    """Moves checkpoint `step` to `WORKDIR/checkpoints_bad/<step>` with a `REASON.txt` holding
    `reason`, after pending saves finish, so `latest_step()` and later resumes skip it; for a
    saved state that turned out to diverge. Returns the new path (None when `step` is not
    listed). With `keep=1` no checkpoint is left afterwards: Orbax already dropped the older
    one when `step` was saved."""
    self.wait()
    if step not in self.manager.all_steps():
      _LOG.warning('checkpoint step %d is not in %s; nothing to set aside', step, self.directory)
      return None
    moved = self._move_aside(step, reason)
    _LOG.warning('checkpoint step %d moved to %s: %s', step, moved, reason)
    return moved

  def read_meta(self, step: int) -> dict[str, Any]:
    """The meta item of `step` alone (config, base identity, checksums); no array is read."""
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored['meta']

  def prepare(self) -> list[epath.Path]:
    """Makes the checkpoint folder ready for this run's saves: creates it, and removes the
    temporary folders of saves that an earlier run did not finish (interrupted, killed, or out
    of disk space), with a warning naming them: never listed as steps, so never resumed from,
    but they take space and Orbax would trip on one when it saves that step again. Process 0
    removes (the others wait for it); call it only with the work directory locked, so that no
    other run is writing one. Returns the removed paths."""
    found: list[epath.Path] = []
    self.directory.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
      found = unfinished(self.directory)
      if found:
        _LOG.warning('removing %d unfinished checkpoint folder(s) that an interrupted save '
                     'left in %s: %s', len(found), self.directory,
                     ', '.join(p.name for p in found))
        for path in found:
          remove(path)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices('jaxsft_remove_partial_checkpoints')
    return found

  def wait(self) -> None:
    """Waits for the save in flight; `UserError` when it could not be written."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as error:
      failure = self._save_failed(step, error)
      if failure is None:
        raise
      raise failure from error
    self._held.release(failed=False)

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def _save_failed(self, step: int | None, error: Exception) -> UserError | None:
    """The error to raise for a save of `step` that failed with `error`: a `UserError` naming
    the folder, the cause and the space a checkpoint needs when the files could not be
    written; None otherwise (a bug keeps its traceback). Either way the records Orbax
    logged about it are dropped (they repeat `error`) and the step's temporary folder is removed
    (process 0), so the newest complete checkpoint stays the resume point."""
    self._held.release(failed=True)
    if jax.process_index() == 0 and step is not None:
      for path in unfinished(self.directory, step):
        remove(path)
    return save_failure(self.directory, step, error, self._checkpoint_bytes, self.keep)

  def _verify(self, step: int, restored: Any, meta: dict[str, Any]) -> None:
    recorded = meta.get('checksums')
    if not recorded or recorded.get('algorithm') != CHECKSUM_ALGORITHM:
      _LOG.info('checkpoint step %d in %s records no checksums (written before jaxsft kept '
                'them); restored without verification', step, self.directory)
      return
    expected = recorded['leaves']
    actual = checksums(restored)
    bad = checksum_mismatches(expected, actual)
    if bad:
      shown = ', '.join(bad[:3]) + (f' and {len(bad) - 3} more' if len(bad) > 3 else '')
      raise CorruptCheckpoint(step, self.directory, f'checksum mismatch in {shown}')
    unverified = sorted(set(expected) ^ set(actual)) + [
        path for path in sorted(set(expected) & set(actual))
        if (expected[path]['dtype'], expected[path]['shape'])
        != (actual[path]['dtype'], actual[path]['shape'])]
    if unverified:
      _LOG.info('checkpoint step %d: %d leaves restored with another structure or dtype than '
                'saved, not verified: %s', step, len(unverified), ', '.join(unverified[:5]))

  def _raise_if_other_state(self, step: int, target: Any) -> None:
    """`UserError` when step's stored state is readable and shaped unlike `target`: the run
    changed (model, LoRA rank, optimizer), the files did not break, and older checkpoints would
    not fit either. Unreadable metadata passes: the restore then fails as a corruption."""
    try:
      stored = self.manager.item_metadata(step)['state']
      stored = {path_name(path): tuple(leaf.shape) for path, leaf in
                jax.tree_util.tree_flatten_with_path(getattr(stored, 'tree', stored))[0]}
    except Exception:  # pylint: disable=broad-exception-caught
      return  # unreadable metadata: corrupt, as the caller says
    wanted = {path_name(path): tuple(jax.eval_shape(jax.random.key_data, leaf).shape
                                      if is_key(leaf.dtype) else leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    if stored == wanted:
      return
    differ = sorted(set(stored) ^ set(wanted)) or sorted(
        path for path in stored if stored[path] != wanted[path])
    details = ', '.join(f'{path} {stored.get(path, "absent")} vs {wanted.get(path, "absent")}'
                        for path in differ[:3])
    raise UserError(f'checkpoint step {step} in {self.directory} holds another state than this '
                    f'run builds (saved vs now: {details}); resume with the config it was '
                    'written with, or choose another --workdir.')

  def _move_aside(self, step: int, reason: str) -> epath.Path:
    """Moves step's directory under `checkpoints_bad/` (`checkpoint_storage.move_aside`) and
    reloads the manager, which caches the steps it lists."""
    target = move_aside(self.directory, self.bad_directory, step, reason)
    self.manager.reload()
    return target


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

