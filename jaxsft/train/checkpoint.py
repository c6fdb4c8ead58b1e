"""Orbax checkpoints of a run: what a resume needs to continue exactly, and proof it is intact.

A checkpoint at step s holds
  state   the train state without the frozen base (LoRA: adapters + their optimizer state;
          full fine-tuning: every parameter), step and RNG key;
  data    the data iterator's position after s batches, one entry per JAX process;
  meta    the resolved config, the identity of the HF base checkpoint, and `checksums`.
Saves are asynchronous and keep the last `checkpoint.keep`. Orbax writes into a temporary
directory (`<step>.orbax-checkpoint-tmp`) and renames it when complete, so a checkpoint cut off
mid-write is never listed and never resumed from; a run removes such leftovers when it starts
(`prepare`). Orbax deletes the oldest checkpoint only once the next one is complete, so
`keep + 1` checkpoints take disk space at the peak (`space_needed`). Restoring takes the
shardings of the current run's state, so a checkpoint written on one mesh (or number of
processes) restores onto another.

Failed saves. A save that cannot be written (a full disk, a file size limit, any write error)
surfaces from Orbax's background threads at the next `save`, `wait` or `close`; those raise
`UserError` naming the step, the folder, the cause and the space a checkpoint needs, after
removing that step's temporary folder, so the newest complete checkpoint stays the resume point.
What Orbax logs at ERROR while a save is in flight is held back and dropped when the failure is
reported that way (it is the same failure, with tracebacks from each of its threads); it is
logged after all if the save completes.

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
  check_writable(workdir, checkpoint_bytes=0, keep=1, existing=0)   `UserError` at start
  space_needed(checkpoint_bytes, keep, existing=0) -> bytes;  state_bytes(tree) -> bytes
  complete_steps(directory) -> [step]         the step folders listed there, sorted
  checksums(tree) -> {leaf path: {'sums': [s1, s2], 'dtype': str, 'shape': [int]}}
  checksum_mismatches(expected, actual) -> [leaf path]
  CorruptCheckpoint(step, directory, reason)   .step, .reason; restore_latest handles it
A step whose state is readable but shaped unlike `like_state` (another model, LoRA rank or
optimizer) raises `UserError` from `restore` and `restore_latest`: not a corruption, so nothing
is moved. Multi-host: every process calls these; only process 0 moves directories.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
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

_LOG = logging.getLogger('jaxsft')

# Names the checksum below; a checkpoint recording another algorithm is restored unverified.
BAD_DIRECTORY = 'checkpoints_bad'
# Orbax's suffix for a checkpoint being written (`4.orbax-checkpoint-tmp`, on some file systems
# followed by `-<timestamp>`): never listed as a step.
TMP_SUFFIX = '.orbax-checkpoint-tmp'


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


def state_bytes(tree: Any) -> int:
  """Bytes of the arrays in `tree` (arrays or `ShapeDtypeStruct`s): a checkpoint's size before
  compression, which is what the space checks count."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def space_needed(checkpoint_bytes: int, keep: int, existing: int = 0) -> int:
  """Free bytes the checkpoints of a run need: Orbax writes the next checkpoint before it
  deletes the oldest, so `keep + 1` of them take space at the peak, of which the `existing`
  complete ones already on disk (a resumed run's) take theirs; at least one more."""
  return checkpoint_bytes * max(1, keep + 1 - existing)


def format_bytes(count: float) -> str:
  """`1.5 MiB`, `2.00 GiB`: sizes in messages."""
  if count >= 2**30:
    return f'{count / 2**30:.2f} GiB'
  if count >= 2**20:
    return f'{count / 2**20:.1f} MiB'
  return f'{count / 2**10:.1f} KiB'


def complete_steps(directory: Any) -> list[int]:
  """The steps of the checkpoint folders in `directory` (`<step>`; temporary ones excluded),
  sorted; [] when it does not exist."""
  path = epath.Path(directory)
  if not path.exists():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir())


def check_writable(workdir: str, checkpoint_bytes: int = 0, keep: int = 1,
                   existing: int = 0) -> None:
  """Fails at start, not after an hour, when the work directory cannot take checkpoints:
  unwritable, or with less free space than `space_needed(checkpoint_bytes, keep, existing)`
  (`checkpoint_bytes`: one checkpoint; `existing`: complete checkpoints already there)."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_probe_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as error:
    raise UserError(f'the work directory {workdir} is not writable ({error}); choose another '
                    '--workdir or fix its permissions.') from error
  needed = space_needed(checkpoint_bytes, keep, existing)
  if needed and not str(workdir).startswith('gs://'):
    free = shutil.disk_usage(workdir).free
    if free < needed:
      held = f', {existing} of which are there already' if existing else ''
      raise UserError(f'the work directory {workdir} has {format_bytes(free)} free but its '
                      f'checkpoints need about {format_bytes(needed)} more: '
                      f'{format_bytes(checkpoint_bytes)} each, checkpoint.keep={keep} of them '
                      f'plus the next one while it is written{held}; free space, lower '
                      'checkpoint.keep or choose another --workdir.')


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
    self._held = _HeldOrbaxErrors()
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
    with _orphaned_reads_to_debug_log():
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      # Broad on purpose, and around this call only: truncated, missing or garbled files
      # surface as tensorstore/zstd errors, plain `Exception`s from Orbax, ValueError, OSError
      # or JSON errors, with no common base class.
      except Exception as error:  # pylint: disable=broad-exception-caught
        _LOG.debug('reading checkpoint step %d failed', step, exc_info=True)
        failure = f'{type(error).__name__}: {_first_line(error)}'
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
      found = sorted((p for p in self.directory.iterdir() if TMP_SUFFIX in p.name),
                     key=lambda p: p.name)
      if found:
        _LOG.warning('removing %d unfinished checkpoint folder(s) that an interrupted save '
                     'left in %s: %s', len(found), self.directory,
                     ', '.join(p.name for p in found))
        for path in found:
          _remove(path)
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
    what = f'step {step}' if step is not None else 'a step'
    if jax.process_index() == 0 and step is not None and self.directory.exists():
      for path in self.directory.glob(f'{step}{TMP_SUFFIX}*'):
        _remove(path)
    cause = _write_failure(error)
    if cause is None:
      return None
    per_checkpoint = self._checkpoint_bytes
    steps = complete_steps(self.directory)
    resume = (f'the checkpoint at step {steps[-1]}' if steps else
              'the first step (no checkpoint was complete)')
    return UserError(
        f'saving the checkpoint of {what} to {self.directory} failed: {cause}. A checkpoint '
        f'of this run needs about {format_bytes(per_checkpoint)} ({per_checkpoint:,} bytes '
        f'before compression), checkpoint.keep={self.keep} of them plus the next one while it '
        f'is written about {format_bytes(space_needed(per_checkpoint, self.keep))}; free '
        'space there (or lower checkpoint.keep, or choose another --workdir), then start the '
        f'same command again: it resumes from {resume}.')

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
    """Moves step's directory under `checkpoints_bad/` (process 0; the others wait for it)
    and reloads the manager, which caches the steps it lists."""
    source = ocp.step.find_step_path(self.directory, ocp.step.standard_name_format(),
                                     step=step)
    target = self.bad_directory / str(step)
    if jax.process_index() == 0:
      self.bad_directory.mkdir(parents=True, exist_ok=True)
      suffix = 1
      while target.exists():  # the same step set aside by an earlier run
        target = self.bad_directory / f'{step}.{suffix}'
        suffix += 1
      # A rename within one file system: atomic, and nothing is copied or deleted.
      source.rename(target)
      now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
      (target / 'REASON.txt').write_text(f'step {step} set aside at {now}: {reason}\n')
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f'jaxsft_set_aside_{step}')
    self.manager.reload()
    return target


@contextlib.contextmanager
def _orphaned_reads_to_debug_log() -> Iterator[None]:
  """Sends the noise of a failed Orbax read to the debug log.

  When one array read fails, Orbax closes its event loop with the other reads pending: their
  coroutines, finalized whenever the garbage collector gets to them, and tensorstore's
  callbacks into the closed loop each print a long 'Exception ignored' traceback (under pytest,
  one arriving while a module compiles crashed it). Other unraisable errors pass through.
  """
  previous = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    code = getattr(unraisable.object, 'cr_code', None)
    if ('Event loop is closed' in str(unraisable.exc_value)
        or (code is not None and 'orbax' in code.co_filename)):
      _LOG.debug('after a failed checkpoint read: %s', _first_line(unraisable.exc_value))
    else:
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


class _HeldOrbaxErrors(logging.Filter):
  """Holds the ERROR records of the absl logger, which Orbax logs through, while a save is in
  flight (their pathname is absl's own file, so Orbax's are not told apart from others). A
  save that cannot be written makes each of Orbax's threads log the failure with its traceback
  before the error reaches `save` or `wait`, which report it in one line: then the held records
  go to the debug log. Records held while a save completes are logged after all at its end.

  Also, while a save is in flight and for good once one failed, the stragglers of a failed
  save go to the debug log: when one write fails, Orbax closes the save's event loop with other
  tensorstore writes pending; each, finishing later, prints 'RuntimeError: Event loop is
  closed' through `sys.excepthook` (or as an unraisable error), and their asyncio tasks, once
  collected, log 'Task exception was never retrieved'. Other errors pass through.
  """

  def __init__(self):
    super().__init__()
    self._logger = logging.getLogger('absl')
    self._lock = threading.Lock()
    self._records: list[logging.LogRecord] = []
    self._hooks: tuple[Any, Any] | None = None  # the hooks replaced, while ours are installed
    self._failed = False  # a save failed: its stragglers may come until the process ends

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if record.name == 'asyncio':  # installed once a save failed
      if 'exception was never retrieved' not in record.getMessage():
        return True
      _LOG.debug('a checkpoint write finished after its save failed: %s', record.getMessage())
      return False
    with self._lock:
      self._records.append(record)
    return False

  def hold(self) -> None:
    if self not in self._logger.filters:
      self._logger.addFilter(self)
    if self._hooks is None:
      self._hooks = (sys.excepthook, sys.unraisablehook)
      previous_except, previous_unraisable = self._hooks

      def excepthook(kind: Any, value: Any, traceback: Any) -> None:
        if not _closed_loop(value):
          previous_except(kind, value, traceback)

      def unraisablehook(unraisable: Any) -> None:
        if not _closed_loop(unraisable.exc_value):
          previous_unraisable(unraisable)

      sys.excepthook, sys.unraisablehook = excepthook, unraisablehook

  def release(self, failed: bool) -> None:
    self._logger.removeFilter(self)
    with self._lock:
      records, self._records = self._records, []
    for record in records:
      if failed:
        _LOG.debug('Orbax, about the failed save: %s', record.getMessage())
      else:
        logging.getLogger(record.name).callHandlers(record)
    if failed and not self._failed:
      self._failed = True
      logging.getLogger('asyncio').addFilter(self)
    if not self._failed and self._hooks is not None:
      sys.excepthook, sys.unraisablehook = self._hooks
      self._hooks = None


def _closed_loop(error: BaseException | None) -> bool:
  """Whether `error` is the noise of a write that finished after its save's event loop closed
  (logged at debug level)."""
  if isinstance(error, RuntimeError) and 'Event loop is closed' in str(error):
    _LOG.debug('a checkpoint write finished after its save failed: %s', error)
    return True
  return False


# How a write failure reads in an error: an OSError's errno, or tensorstore's text, which
# carries the errno (`[os_error_code='28']`) or at least says it could not write.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_WRITE_FAILURE = re.compile(r'No space left|File too large|Disk quota|Read-only file system|'
                            r'Permission denied|Failed writing|Failed to write|Error writing',
                            re.IGNORECASE)


def _write_failure(error: BaseException) -> str | None:
  """Why a save could not be written ('No space left on device (errno 28)'), from `error` or
  the errors it wraps; None when `error` is no write failure."""
  seen = 0
  while error is not None and seen < 5:
    if isinstance(error, OSError) and error.errno:
      return f'{os.strerror(error.errno)} (errno {error.errno})'
    text = str(error)
    code = _OS_ERROR_CODE.search(text)
    if code:
      return f'{os.strerror(int(code.group(1)))} (errno {code.group(1)})'
    if isinstance(error, OSError) or _WRITE_FAILURE.search(text):
      return f'{type(error).__name__}: {_first_line(error)}'
    error, seen = error.__cause__ or error.__context__, seen + 1
  return None


def _remove(path: epath.Path, attempts: int = 5) -> None:
  """Deletes a file or folder tree. Writes that a failed save left running may still add files
  for a moment, so a folder that is not empty yet is tried again; what stays is not listed as a
  step and the next start removes it."""
  for attempt in range(attempts):
    try:
      if path.is_dir():
        path.rmtree()
      elif path.exists():
        path.unlink()
      return
    except OSError as error:
      if attempt == attempts - 1:
        _LOG.info('could not remove %s yet (%s); the next start removes it', path, error)
      else:
        time.sleep(0.2)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else '')[:200]


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

