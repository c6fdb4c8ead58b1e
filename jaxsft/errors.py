"""Errors a user can fix.

`UserError` is what jaxsft raises for a problem in what the user gave it (a config value, a
path, a data record, a tokenizer folder, a work directory in use): its message names the problem,
where it is and the fix, in one line. The CLI prints that line and exits with `EXIT_USER_ERROR`
(2), without a traceback unless `--debug`. Any other exception is a bug in jaxsft and keeps its
traceback. It subclasses `ValueError` so that library callers catching `ValueError` still do.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from typing import Any

EXIT_USER_ERROR = 2


class UserError(ValueError):
  """A problem in the user's input; the message says what, where and how to fix it."""


def did_you_mean(name: str, known: Sequence[str], prefix: str = '') -> str:
  """`' Did you mean <prefix>'closest'?'` for the known name closest to `name`, or ''."""
  match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
  return f' Did you mean {prefix}{match[0]!r}?' if match else ''


def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False) -> None:
  """Raises `UserError` (`'key=value: must be ...'`) unless `value` is a finite number (an
  integer with `integer`) within `[low, high]` (`(low, high]` with `low_open`). The settings
  objects of every part validate themselves with it; `key` names the setting
  (`'lora.rank'`)."""
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
    raise UserError(f'{key}={value!r}: must be a finite {"integer" if integer else "number"}.')
  if low is not None and (value <= low if low_open else value < low):
    raise UserError(f'{key}={value!r}: must be {">" if low_open else ">="} {low:g}.')
  if high is not None and value > high:
    raise UserError(f'{key}={value!r}: must be <= {high:g}.')


def check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
  """Raises `UserError` unless `value` is one of `choices`."""
  if value not in choices:
    raise UserError(f'{key}={value!r}: choose one of {list(choices)}.')
