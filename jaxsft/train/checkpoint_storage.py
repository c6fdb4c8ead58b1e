"""The disk side of checkpoints: the space they take, whether the work directory can hold
them, the temporary folders of unfinished saves, moving a bad checkpoint aside, and how a
failed write or read reads.

Orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp` (`TMP_SUFFIX`) and renames it when
complete, and deletes the oldest checkpoint only once the next one is complete, so `keep + 1`
checkpoints take disk space at the peak (`space_needed`). A save that cannot be written (a full
disk, a file size limit, any write error) surfaces from Orbax's background threads;
`save_failure` turns it into one `UserError` line naming the step, the folder, the cause and the
space a checkpoint needs. What Orbax logs at ERROR while a save is in flight is held back
(`HeldOrbaxErrors`) and dropped when the failure is reported that way (it is the same failure,
with tracebacks from each of its threads); it is logged after all if the save completes.
`jaxsft.train.checkpoint` uses all of this and re-exports the public names its callers use.

API
  TMP_SUFFIX
  check_writable(workdir, checkpoint_bytes=0, keep=1, existing=0)   `UserError` at start
  space_needed(checkpoint_bytes, keep, existing=0) -> bytes;  state_bytes(tree) -> bytes
  format_bytes(count) -> '1.5 MiB'
  complete_steps(directory) -> [step]         the step folders listed there, sorted
  unfinished(directory, step=None) -> [path]  temporary folders of unfinished saves
  remove(path)                                deletes a file or folder, retrying a moment
  move_aside(directory, bad_directory, step, reason) -> path   with REASON.txt (process 0)
  save_failure(directory, step, error, checkpoint_bytes, keep) -> UserError | None
  HeldOrbaxErrors()   .hold() as a save starts, .release(failed) as it ends
  orphaned_reads_to_debug_log()               context manager around a restore
  base_identity(folder) -> dict | None;  gather_json(value) -> [value by process]
  first_line(error) -> str
"""

from __future__ import annotations

import contextlib
import datetime
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

_LOG = logging.getLogger('jaxsft')

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


def unfinished(directory: epath.Path, step: int | None = None) -> list[epath.Path]:
  """The temporary folders of unfinished saves in `directory` (of `step` only, when given),
  sorted by name; [] when it does not exist."""
  if not directory.exists():
    return []
  found = (directory.glob(f'{step}{TMP_SUFFIX}*') if step is not None
           else (p for p in directory.iterdir() if TMP_SUFFIX in p.name))
  return sorted(found, key=lambda p: p.name)


def move_aside(directory: epath.Path, bad_directory: epath.Path, step: int,
               reason: str) -> epath.Path:
  """Moves checkpoint `step` from `directory` to `bad_directory/<step>` (`<step>.1`, ... when
  an earlier run set that step aside too) with a `REASON.txt` holding `reason`; process 0
  moves, the others wait for it. Returns the new path."""
  source = ocp.step.find_step_path(directory, ocp.step.standard_name_format(), step=step)
  target = bad_directory / str(step)
  if jax.process_index() == 0:
    bad_directory.mkdir(parents=True, exist_ok=True)
    suffix = 1
    while target.exists():  # the same step set aside by an earlier run
      target = bad_directory / f'{step}.{suffix}'
      suffix += 1
    # A rename within one file system: atomic, and nothing is copied or deleted.
    source.rename(target)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    (target / 'REASON.txt').write_text(f'step {step} set aside at {now}: {reason}\n')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f'jaxsft_set_aside_{step}')
  return target


def save_failure(directory: epath.Path, step: int | None, error: Exception,
                 checkpoint_bytes: int, keep: int) -> UserError | None:
  """The `UserError` for a save of `step` into `directory` that failed with `error`, naming the
  folder, the cause and the space a checkpoint needs, when the files could not be written;
  None otherwise (a bug keeps its traceback)."""
  cause = _write_failure(error)
  if cause is None:
    return None
  what = f'step {step}' if step is not None else 'a step'
  steps = complete_steps(directory)
  resume = (f'the checkpoint at step {steps[-1]}' if steps else
            'the first step (no checkpoint was complete)')
  return UserError(
      f'saving the checkpoint of {what} to {directory} failed: {cause}. A checkpoint '
      f'of this run needs about {format_bytes(checkpoint_bytes)} ({checkpoint_bytes:,} bytes '
      f'before compression), checkpoint.keep={keep} of them plus the next one while it '
      f'is written about {format_bytes(space_needed(checkpoint_bytes, keep))}; free '
      'space there (or lower checkpoint.keep, or choose another --workdir), then start the '
      f'same command again: it resumes from {resume}.')


@contextlib.contextmanager
def orphaned_reads_to_debug_log() -> Iterator[None]:
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
      _LOG.debug('after a failed checkpoint read: %s', first_line(unraisable.exc_value))
    else:
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


class HeldOrbaxErrors(logging.Filter):
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
      return f'{type(error).__name__}: {first_line(error)}'
    error, seen = error.__cause__ or error.__context__, seen + 1
  return None


def remove(path: epath.Path, attempts: int = 5) -> None:
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


def first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else '')[:200]
