"""SIGTERM as a flag the training loop checks between steps.

Cheap to import (standard library only), so the CLI can install it before JAX loads: a SIGTERM
during start-up (imports, data loading, compiling) then stops the run with the documented exit
code instead of killing it mid-write. The flag is process-wide; `SigtermFlag()` entered again
(by `jaxsft.train.train`) shares the state of the one installed first.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

_LOG = logging.getLogger('jaxsft')
_RAISED = threading.Event()


class SigtermFlag:
  """Context manager: while entered (main thread only), SIGTERM sets `raised` instead of ending
  the process; the previous handler comes back on exit."""

  def __init__(self):
    self._previous: Any = None
    self._installed = False

  @property
  def raised(self) -> bool:
    return _RAISED.is_set()

  def __enter__(self) -> SigtermFlag:
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is not _handle):
      self._previous = signal.signal(signal.SIGTERM, _handle)
      self._installed = True
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      _RAISED.clear()


def _handle(signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
  _LOG.warning('SIGTERM received: saving a checkpoint after this step, then exiting.')
  _RAISED.set()
