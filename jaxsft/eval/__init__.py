"""Evaluation and generation: KV-cache decoding (`generate`), a model loaded from a run or an
HF folder with its template (`model`), likelihood and generation metrics (`metrics`), and the
training callback that samples answers (`sampling`).

Sits above training: it may import `train` (to read a run back and reuse its eval step),
`data`, `interop`, `models`, `adapters` and `parallel`; never the CLI, the demo or the config
defaults, and the trainer never imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> home module, imported on first access (PEP 562): scoring and generation need
# neither the trainer's run (`model`) nor the config library (`metrics`).
_HOMES = {
    # `generate` (the function) is not here: the name is its module's (`jaxsft.eval.generate`).
    'PromptTooLong': 'generate', 'SamplingConfig': 'generate',
    'generation_metrics': 'metrics', 'likelihood': 'metrics',
    'Model': 'model', 'answer': 'model', 'from_hf': 'model', 'from_workdir': 'model',
    'Scored': 'rows', 'SampleCallback': 'sampling', 'score_requests': 'scoring',
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
  """The public names above, imported from their home module when first asked for."""
  if name not in _HOMES:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(f'{__name__}.{_HOMES[name]}'), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_HOMES))
