"""`RunSettings`: every part's settings of one training run, as `jaxsft.train.run.run_settings`
makes them from the CLI's config once. Below the run nothing reads the config: each function
takes its part's settings (the model, LoRA, 4-bit, optimizer, mesh, step, loop), and the data
pipeline its `data` section."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from jaxsft.adapters.lora import LoraSettings
from jaxsft.adapters.quant import QuantSettings
from jaxsft.errors import UserError, check_number
from jaxsft.parallel.mesh import MeshSettings
from jaxsft.train.loop import LoopSettings
from jaxsft.train.model_source import ModelSettings
from jaxsft.train.optim import OptimizerSettings
from jaxsft.train.state import check_adaptation
from jaxsft.train.step import StepSettings


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  """Checkpoints every `save_every` steps (0: only at the end and on SIGTERM / Ctrl-C), the
  newest `keep` kept, written in the background (`async_save`), and whether a start resumes
  from the newest one in the work directory."""

  save_every: int = 0
  keep: int = 3
  async_save: bool = True
  resume: bool = True

  def __post_init__(self):
    check_number('checkpoint.save_every', self.save_every, low=0, integer=True)
    check_number('checkpoint.keep', self.keep, low=1, integer=True)


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """One run's parts. `lora` None: full fine-tuning; `quant` None: dense base weights. `data`
  is the config's `data` section, the settings `jaxsft.data.Pipeline` takes. `num_steps` > 0
  ends the run, else `num_epochs` over the data. Cross-part rules (micro-batches of whole rows,
  QLoRA needing LoRA, a stream needing `num_steps`) raise `UserError` when made."""

  model: ModelSettings
  data: Any
  batch_size: int
  lora: LoraSettings | None = None
  quant: QuantSettings | None = None
  lora_init_from: str = ''
  optim: OptimizerSettings = OptimizerSettings()
  mesh: MeshSettings = MeshSettings()
  step: StepSettings = StepSettings()
  loop: LoopSettings = LoopSettings()
  checkpoint: CheckpointSettings = CheckpointSettings()
  num_steps: int = 0
  num_epochs: float = 1.0
  seed: int = 0
  report_to: tuple[str, ...] = ('tensorboard',)
  run_name: str = ''

  def __post_init__(self):
    check_number('batch_size', self.batch_size, low=1, integer=True)
    check_number('train.num_steps', self.num_steps, low=0, integer=True)
    if self.num_steps == 0:
      check_number('train.num_epochs', self.num_epochs, low=0, low_open=True)
    check_number('train.seed', self.seed, integer=True)
    accum = self.step.grad_accum_steps
    if self.batch_size % accum:
      raise UserError(f'train.grad_accum_steps={accum}: must divide batch_size='
                      f'{self.batch_size} (each micro-batch is batch_size / grad_accum_steps '
                      'rows).')
    check_adaptation(self.lora, self.quant)
    if self.data.streaming and self.num_steps <= 0:
      raise UserError(f'train.num_steps={self.num_steps}: must be > 0 with data.streaming=True '
                      '(a stream has no length, so num_epochs cannot end it).')

  @property
  def max_seq_len(self) -> int:
    """Tokens per packed row (`data.max_seq_len`)."""
    return self.data.max_seq_len

  def with_max_seq_len(self, length: int) -> RunSettings:
    """These settings with rows of `length` tokens."""
    data = copy.deepcopy(self.data)
    data.max_seq_len = length
    return dataclasses.replace(self, data=data)
