"""Errors a user can fix.

`UserError` is what jaxsft raises for a problem in what the user gave it (a config value, a
path, a data record, a tokenizer folder, a work directory in use): its message names the problem,
where it is and the fix, in one line. The CLI prints that line and exits with `EXIT_USER_ERROR`
(2), without a traceback unless `--debug`. Any other exception is a bug in jaxsft and keeps its
traceback. It subclasses `ValueError` so that library callers catching `ValueError` still do.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

EXIT_USER_ERROR = 2


class UserError(ValueError):
  """A problem in the user's input; the message says what, where and how to fix it."""


def did_you_mean(name: str, known: Sequence[str], prefix: str = '') -> str:
  """`' Did you mean <prefix>'closest'?'` for the known name closest to `name`, or ''."""
  match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
  return f' Did you mean {prefix}{match[0]!r}?' if match else ''
