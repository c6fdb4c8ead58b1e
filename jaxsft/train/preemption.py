"""SIGTERM and Ctrl-C (SIGINT) as a flag the training loop checks between steps.

Cheap to import (standard library only), so the CLI can install it before JAX loads. The flag is
process-wide; `SigtermFlag()` entered again (by `jaxsft.train.train`) shares the state of the
one installed first.

SIGTERM always sets the flag: the loop saves a checkpoint after the current step and stops (exit
75); during start-up (imports, data loading, compiling) the run stops before its first step.

SIGINT depends on the phase, because a `KeyboardInterrupt` raised at an arbitrary point is
neither reliable nor safe: raised inside a garbage-collector callback or a `__del__` it is
printed and lost, and raised while an asynchronous Orbax save is in flight it tears the process
down under the save's threads (tracebacks, "Event loop is closed", only the save's temporary
folder left behind).
  start-up     (until `started()`: nothing of the run is written yet) the run stops at once;
  running      the first SIGINT sets the flag like SIGTERM (the loop saves after the current
               step, waits for the save and stops with exit 130); a second one stops at once,
               without saving: the newest complete checkpoint stays the resume point, because
               Orbax writes a checkpoint under a temporary name that is never listed as a step
               and renames it only once it is complete.
"Stops at once" is `os._exit(130)` after one line on stderr when installed by the CLI
(`hard_exit=True`: no teardown that could print tracebacks from background threads), and a
`KeyboardInterrupt` otherwise (a library caller, e.g. a notebook, keeps its process).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

_LOG = logging.getLogger('jaxsft')
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a process ended by Ctrl-C

_RAISED = threading.Event()    # a stop was asked for (SIGTERM or the first SIGINT while running)
_STARTED = threading.Event()   # the run writes its work directory: SIGINT sets the flag
_STATE: dict[str, Any] = {'signal': None, 'hard_exit': False}


class SigtermFlag:
  """Context manager: while entered (main thread only), SIGTERM and SIGINT are handled as the
  module docstring says instead of ending the process; the previous handlers come back on exit.

  Args:
    hard_exit: stop at once with `os._exit(130)` (the CLI) instead of `KeyboardInterrupt`.
  """

  def __init__(self, hard_exit: bool = False):
    self.hard_exit = hard_exit
    self._previous: dict[int, Any] = {}

  @property
  def raised(self) -> bool:
    return _RAISED.is_set()

  @property
  def interrupted(self) -> bool:
    """The stop was asked for by Ctrl-C (SIGINT), not SIGTERM: exit 130 rather than 75."""
    return _RAISED.is_set() and _STATE['signal'] == signal.SIGINT

  def started(self) -> None:
    """From now on the run writes its work directory: a first Ctrl-C stops it gracefully."""
    _STARTED.set()

  def __enter__(self) -> SigtermFlag:
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is not _handle_sigterm):
      _STATE['hard_exit'] = self.hard_exit
      self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _handle_sigterm),
                        signal.SIGINT: signal.signal(signal.SIGINT, _handle_sigint)}
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._previous:
      for number, handler in self._previous.items():
        signal.signal(number, handler)
      self._previous = {}
      _RAISED.clear()
      _STARTED.clear()
      _STATE.update(signal=None, hard_exit=False)


def _handle_sigterm(signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
  if _RAISED.is_set():
    return  # already stopping
  _LOG.warning('SIGTERM received: saving a checkpoint after this step, then exiting.')
  _STATE['signal'] = signal.SIGTERM
  _RAISED.set()


def _handle_sigint(signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
  if not _STARTED.is_set():
    _stop_now('jaxsft: interrupted (Ctrl-C) before training started; nothing was saved.')
  elif not _RAISED.is_set():
    _LOG.warning('Ctrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again '
                 'stops at once, without saving this step).')
    _STATE['signal'] = signal.SIGINT
    _RAISED.set()
  else:
    _stop_now('jaxsft: interrupted again (Ctrl-C): stopped without saving this step; start the '
              'same command again to resume from the newest complete checkpoint.')


def _stop_now(line: str) -> None:
  if not _STATE['hard_exit']:
    raise KeyboardInterrupt
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-exception-caught
      pass  # the main thread was inside this stream's write: what it had is lost, not the line
  # os.write: the handler may have interrupted a write to sys.stderr, which is not reentrant.
  os.write(2, (line + '\n').encode())
  os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access
