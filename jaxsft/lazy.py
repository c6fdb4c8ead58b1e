"""Public names a package imports on first access (PEP 562), so that importing the package, or
one light name of it, does not load what its other names need: the CLI imports
`jaxsft.train.preemption` before JAX loads, scoring needs neither the trainer's run nor
`ml_collections`, and `pack` needs no `datasets`. Standard library only."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, homes: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
  """`(__getattr__, __dir__)` for the package named `package`: each name of `homes` (public name
  -> home module, e.g. `'Pipeline': 'jaxsft.data.pipeline'`) is imported from its home module
  when first asked for and then kept in the package's namespace; any other name raises
  `AttributeError`, so `from package import submodule` still falls back to the submodule."""

  def __getattr__(name: str) -> Any:
    if name not in homes:
      raise AttributeError(f'module {package!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(homes[name]), name)
    setattr(sys.modules[package], name, value)  # later accesses skip this function
    return value

  def __dir__() -> list[str]:
    return sorted(set(vars(sys.modules[package])) | set(homes))

  return __getattr__, __dir__
