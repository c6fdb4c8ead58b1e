"""A run's work directory: its absolute form (reading a run back is
`jaxsft.train.run.load_run`)."""

from __future__ import annotations

import os


def absolute_workdir(workdir: str) -> str:
  """A local work directory as an absolute path (Orbax refuses relative ones); a bucket path
  (`gs://...`) as given."""
  return str(workdir) if '://' in str(workdir) else os.path.abspath(workdir)
