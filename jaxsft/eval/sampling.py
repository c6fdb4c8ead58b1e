"""Answers to `train.sample_prompts` during training, every `train.sample_every` steps: logged
and appended to `WORKDIR/samples.jsonl` (a training callback)."""

from __future__ import annotations

import json
from typing import Any

import jax
from etils import epath

from jaxsft.eval.generate import SamplingConfig
from jaxsft.eval.model import Model, answer
from jaxsft.train.callbacks import Callback, RunContext


class SampleCallback(Callback):
  """Greedy answers of the model being trained to the config's sample prompts."""

  name = 'samples'

  def __init__(self) -> None:
    self._model: Model | None = None

  def start(self, run: RunContext, state: Any) -> None:
    self._model = Model(run.config, run.model_config, None, run.tokenizer)

  def step(self, run: RunContext, step: int, state: Any) -> list[str]:
    every, prompts = run.config.train.sample_every, list(run.config.train.sample_prompts)
    if not (every and prompts) or step % every:
      return []
    self._model.variables = state.variables()
    sampling = SamplingConfig(max_new_tokens=run.config.train.sample_max_new_tokens)
    answers = answer(self._model, [[{'role': 'user', 'content': p}] for p in prompts], sampling)
    if jax.process_index() == 0:
      path = epath.Path(run.workdir) / 'samples.jsonl'
      previous = path.read_text() if path.exists() else ''
      path.write_text(previous + ''.join(
          json.dumps({'step': step, 'prompt': p, 'answer': a}) + '\n'
          for p, a in zip(prompts, answers)))
    return [f'sample at step {step} | {p!r} -> {a!r}' for p, a in zip(prompts, answers)]
