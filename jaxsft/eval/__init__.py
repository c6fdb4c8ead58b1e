"""Evaluation and generation: KV-cache decoding (`generate`), a model loaded from a run or an
HF folder with its template (`model`), likelihood and generation metrics (`metrics`), and the
training callback that samples answers (`sampling`).

Sits above training: it may import `train` (to read a run back and reuse its eval step),
`data`, `interop`, `models`, `adapters` and `parallel`; never the CLI, the demo or the config
defaults, and the trainer never imports it.
"""
