"""One run per work directory: a lock that a crashed run cannot leave behind.

Two runs in one work directory overwrite each other's checkpoints and metrics. `WorkdirLock`
refuses the second one:

  with WorkdirLock(workdir):        # or lock = WorkdirLock(workdir); lock.acquire(); ...
    ...                             #    lock.release()

It holds `fcntl.flock(LOCK_EX | LOCK_NB)` on `WORKDIR/.jaxsft.lock` while the run lives. The
kernel drops that lock with the last open descriptor of the file, so a run that dies in any
way, `kill -9` included, leaves no stale lock and the next run takes it without any cleanup
or guessing whether a pid is still alive. The file then holds JSON
`{"pid", "host", "started" (ISO 8601, UTC), "command"}`, written once the lock is held, so a
refused run can say who holds it (`UserError`).

- Multi-host: the processes of one run are one run. Only process 0 (`process_index`, read
  when the lock is taken, never at import) locks; the other processes do nothing.
- `gs://` (or any other URL) work directories cannot be locked: a warning says so and the run
  goes on; the user must make sure only one run uses that directory.
- The file is never deleted: deleting it would let a third run lock a new file while the
  second still waits on the old one.
- Forked children (a `multiprocessing` pool) share the locked descriptor; one that outlives
  its run keeps the lock until it exits. Network file systems lock only as far as the server
  honours `flock` (NFSv4 on Linux does, as a whole-file POSIX lock).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from typing import Any

from jaxsft.errors import UserError

_LOG = logging.getLogger('jaxsft')
LOCK_NAME = '.jaxsft.lock'


class WorkdirLock:
  """An exclusive lock on a work directory for the life of a run (see the module docstring).

  Args:
    workdir: the run's work directory; created if missing (local paths only).
    process_index: this process's JAX index; None reads `jax.process_index()` at `acquire`.
      Only process 0 locks.
  """

  def __init__(self, workdir: str | os.PathLike, process_index: int | None = None):
    self.workdir = os.fspath(workdir)
    self.process_index = process_index
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    """Whether this object holds the lock now."""
    return self._fd is not None

  def acquire(self) -> WorkdirLock:
    """Takes the lock, or raises `UserError` naming the run that holds it. Returns self."""
    if self._fd is not None:
      raise RuntimeError(f'{self.path} is already locked by this WorkdirLock')
    index = self.process_index
    if index is None:
      import jax  # pylint: disable=import-outside-toplevel
      index = jax.process_index()
    if index != 0:
      return self
    if '://' in self.workdir:
      _LOG.warning('the work directory %s is in a bucket, which cannot be locked; make sure '
                   'that only one jaxsft run uses it at a time (two would overwrite each '
                   "other's checkpoints).", self.workdir)
      return self
    try:
      os.makedirs(self.workdir, exist_ok=True)
      # O_CLOEXEC: a program this run executes (a tokenizer helper, a shell) does not inherit
      # the lock and keep it after the run dies.
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
      raise UserError(f'the work directory {self.workdir} is not writable ({error}); choose '
                      'another --workdir or fix its permissions.') from error
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      holder = _read_holder(fd)
      os.close(fd)
      if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise UserError(f'cannot lock the work directory {self.workdir} ({error}); choose '
                        'another --workdir or fix its file system.') from error
      raise UserError(f'the work directory {self.workdir} is in use by another jaxsft run '
                      f'({_describe(holder)}); wait for it to finish, stop it, or choose '
                      'another --workdir.') from None
    # The holder's details, written only once the lock is ours: a refused run never clobbers
    # the holder's record.
    record = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec='seconds'),
              'command': shlex.join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    """Drops the lock (a no-op when not held). The file stays, emptied."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # no stale record for whoever reads it next
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc: Any) -> None:
    self.release()


def _read_holder(fd: int) -> dict[str, Any] | None:
  """The holder's record, or None while it is being written (or garbled)."""
  try:
    return json.loads(os.pread(fd, 65536, 0).decode())
  except (OSError, ValueError):
    return None


def _describe(holder: dict[str, Any] | None) -> str:
  if not holder:
    return 'its details are not written yet'
  command = str(holder.get('command', '?'))
  command = command if len(command) <= 100 else command[:97] + '...'  # the message is one line
  return (f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")} since '
          f'{holder.get("started", "?")}, command: {command}')
