"""Hooks into a training run, so that the loop knows nothing of evaluation, sampling or the
demo: `jaxsft.eval.sampling.SampleCallback` answers `train.sample_prompts` during training,
`jaxsft.demo.DemoCallback` measures the demo before and after. The CLI passes the callbacks a
config asks for; `train` refuses a config whose switches no callback serves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxsft.models.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What a callback may read about the run it is in: the config it was started with (for the
  callbacks the CLI made from it), the model (applying the run's adapters), its tokenizer, the
  work directory and the chat template's name (`data.template`)."""

  config: Any
  model_config: LlamaConfig
  tokenizer: Any
  workdir: str
  template: str = ''


class Callback:
  """Every method does nothing unless overridden. `name` keys what `end` returns in the result
  of `jaxsft.train.run.train` ('' = nothing)."""

  name = ''

  def setup(self, config: Any, workdir: str) -> None:
    """Before the model and data are built, with the work directory locked; may point `config`
    at what it writes (the demo writes its data and tokenizer)."""

  def start(self, run: RunContext, state: Any) -> None:
    """Before the first step of this start (fresh or resumed)."""

  def step(self, run: RunContext, step: int, state: Any) -> list[str]:
    """After step `step` (1-based) was applied (and checkpointed, when due); returns lines for
    the log."""
    del run, step, state
    return []

  def end(self, run: RunContext, state: Any) -> Any:
    """After the last step and the final eval; the return value goes into the result."""
    del run, state
