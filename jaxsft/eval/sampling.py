"""Answers to `train.sample_prompts` during training, every `train.sample_every` steps: logged
and appended to `WORKDIR/samples.jsonl` (a training callback the CLI makes from the config)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
from etils import epath

from jaxsft.eval.generate import SamplingConfig
from jaxsft.eval.model import Model, answer
from jaxsft.train.callbacks import Callback, RunContext


class SampleCallback(Callback):
  """Greedy answers of the model being trained to `prompts` (user turns) every `every` steps,
  at most `max_new_tokens` tokens each."""

  name = 'samples'

  def __init__(self, prompts: Sequence[str], every: int, max_new_tokens: int = 64) -> None:
    self._model: Model | None = None
    self.prompts, self.every, self.max_new_tokens = list(prompts), every, max_new_tokens

  def start(self, run: RunContext, state: Any) -> None:
    self._model = Model(run.model_config, None, run.tokenizer, run.template)

  def step(self, run: RunContext, step: int, state: Any) -> list[str]:
    every, prompts = self.every, self.prompts
    if not (every and prompts) or step % every:
      return []
    self._model.variables = state.variables()
    sampling = SamplingConfig(max_new_tokens=self.max_new_tokens)
    answers = answer(self._model, [[{'role': 'user', 'content': p}] for p in prompts], sampling)
    if jax.process_index() == 0:
      path = epath.Path(run.workdir) / 'samples.jsonl'
      previous = path.read_text() if path.exists() else ''
      path.write_text(previous + ''.join(
          json.dumps({'step': step, 'prompt': p, 'answer': a}) + '\n'
          for p, a in zip(prompts, answers)))
    return [f'sample at step {step} | {p!r} -> {a!r}' for p, a in zip(prompts, answers)]
