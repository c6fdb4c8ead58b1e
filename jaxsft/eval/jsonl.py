"""Reading a user's JSONL file of records (prompts, questions, completions): every bad line is
a one-line `UserError` that names the option, the file and the line."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from jaxsft.errors import UserError


def read_jsonl(path: str, option: str, expected: str, parse: Callable[[Any], Any]) -> list[Any]:
  """`parse(record)` of each non-empty line of `path`. `parse` raises `KeyError`, `TypeError`
  or `ValueError` for a record it cannot read; `expected` describes a good one."""
  if not os.path.isfile(path):
    raise UserError(f'{option} {path}: no such file; give a .jsonl file with one {expected} '
                    'per line.')
  items = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        items.append(parse(json.loads(line)))
      except (KeyError, TypeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise UserError(f'{option} {path}, line {number}: expected {expected} '
                        f'({type(error).__name__}: {error}).') from None
  return items
