"""Evaluation and generation: KV-cache decoding (`generate`), a model loaded from a run or an
HF folder with its template (`model`), likelihood and generation metrics (`metrics`), and the
training callback that samples answers (`sampling`).

Sits above training: it may import `train` (to read a run back and reuse its eval step),
`data`, `interop`, `models`, `adapters` and `parallel`; never the CLI, the demo or the config
defaults, and the trainer never imports it.
"""

from __future__ import annotations

from jaxsft.lazy import lazy_exports

# Public name -> home module, imported on first access: scoring and generation need neither
# the trainer's run (`model`) nor the config library (`metrics`). `generate` (the function) is
# not here: the name is its module's (`jaxsft.eval.generate`).
_HOMES = {name: f'jaxsft.eval.{module}' for name, module in {
    'PromptTooLong': 'generate', 'SamplingConfig': 'generate',
    'generation_metrics': 'metrics', 'likelihood': 'metrics',
    'Model': 'model', 'answer': 'model', 'from_hf': 'model', 'from_workdir': 'model',
    'Scored': 'rows', 'SampleCallback': 'sampling', 'score_requests': 'scoring',
}.items()}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
