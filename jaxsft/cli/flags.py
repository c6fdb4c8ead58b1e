"""argparse `type=` functions that check a numeric flag's value as it is parsed.

A bad value stops the command in argparse, before JAX or a model loads, with argparse's own
error: the usage, then one line `jaxsft CMD: error: argument --limit: must be >= 1, got 0`, and
exit code 2. Each function raises `argparse.ArgumentTypeError`, whose message argparse prints
after the flag's name (a plain `ValueError` would print only "invalid positive_int value").
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

SEED_MAX = 2 ** 32 - 1  # jax.random.key takes a 32-bit seed; larger values wrap silently


def _integer(text: str, requirement: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'must be an integer {requirement}, got {text!r}') from None


def _number(text: str, requirement: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'must be a number {requirement}, got {text!r}') from None
  if not math.isfinite(value):  # nan passes every comparison's negation: refuse it outright
    raise argparse.ArgumentTypeError(f'must be a finite number {requirement}, got {text!r}')
  return value


def int_at_least(minimum: int) -> Callable[[str], int]:
  """An integer >= `minimum`."""

  def parse(text: str) -> int:
    value = _integer(text, f'>= {minimum}')
    if value < minimum:
      raise argparse.ArgumentTypeError(f'must be >= {minimum}, got {value}')
    return value

  parse.__name__ = f'int_at_least_{minimum}'  # argparse names the type in some messages
  return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def seed(text: str) -> int:
  """A random seed: an integer in [0, 2**32 - 1]."""
  value = _integer(text, f'in [0, {SEED_MAX}]')
  if not 0 <= value <= SEED_MAX:
    raise argparse.ArgumentTypeError(f'must be in [0, {SEED_MAX}], got {value}')
  return value


def positive_float(text: str) -> float:
  """A finite number > 0."""
  value = _number(text, '> 0')
  if value <= 0:
    raise argparse.ArgumentTypeError(f'must be > 0, got {text}')
  return value


def non_negative_float(text: str) -> float:
  """A finite number >= 0."""
  value = _number(text, '>= 0')
  if value < 0:
    raise argparse.ArgumentTypeError(f'must be >= 0, got {text}')
  return value


def probability(text: str) -> float:
  """A number in (0, 1] (top-p: 1 keeps every token, 0 would keep none)."""
  value = _number(text, 'in (0, 1]')
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f'must be in (0, 1], got {text}')
  return value


def positive_int_list(text: str) -> list[int]:
  """Comma-separated integers >= 1, e.g. `1,10` (at least one)."""
  values = []
  for part in (p.strip() for p in text.split(',')):
    if not part:
      continue
    try:
      value = int(part)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f'must be comma-separated integers >= 1 (e.g. 1,10), got {text!r}') from None
    if value < 1:
      raise argparse.ArgumentTypeError(f'each value must be >= 1, got {value} in {text!r}')
    values.append(value)
  if not values:
    raise argparse.ArgumentTypeError(f'give at least one integer >= 1 (e.g. 1,10), got {text!r}')
  return values
