"""The optimizer: optax AdamW with warmup + decay schedules, clipping and a weight-decay mask,
built from `OptimizerSettings`."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import optax

from jaxsft.errors import check_choice, check_number

SCHEDULES = ('constant', 'linear', 'cosine')
# Leaves that never get weight decay: RMSNorm scales and biases (the usual LLaMA recipe), and
# DoRA magnitudes, which decay would pull toward 0 (away from the base's norms), not to the base.
_NO_DECAY = ('scale', 'bias', 'magnitude')


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """AdamW and its learning-rate schedule: linear warmup from 0 to `learning_rate` over
  `warmup_steps` (when >= 0) or `warmup_ratio` of the run, then `schedule` (constant, linear or
  cosine decay to `learning_rate * min_lr_ratio`); global-norm clipping at `max_grad_norm`
  (0: off); decoupled `weight_decay`, never on norms, biases and DoRA magnitudes. Invalid
  values raise `UserError` when the settings are made."""

  learning_rate: float = 2e-5
  schedule: str = 'cosine'
  warmup_steps: int = -1
  warmup_ratio: float = 0.03
  min_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0

  def __post_init__(self):
    check_number('optim.learning_rate', self.learning_rate, low=0)
    check_choice('optim.schedule', self.schedule, SCHEDULES)
    check_number('optim.warmup_ratio', self.warmup_ratio, low=0, high=1)
    check_number('optim.warmup_steps', self.warmup_steps, low=-1, integer=True)
    check_number('optim.min_lr_ratio', self.min_lr_ratio, low=0, high=1)
    check_number('optim.b1', self.b1, low=0, high=1)
    check_number('optim.b2', self.b2, low=0, high=1)
    check_number('optim.eps', self.eps, low=0)
    check_number('optim.weight_decay', self.weight_decay, low=0)
    check_number('optim.max_grad_norm', self.max_grad_norm, low=0)


def warmup_steps(settings: OptimizerSettings, total_steps: int) -> int:
  """`warmup_steps` when set (>= 0), else `warmup_ratio` of the run's `total_steps`."""
  if settings.warmup_steps >= 0:
    return int(settings.warmup_steps)
  return int(round(settings.warmup_ratio * total_steps))


def learning_rate_schedule(settings: OptimizerSettings, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then constant, linear or cosine decay to
  `learning_rate * min_lr_ratio` at `total_steps`."""
  peak = settings.learning_rate
  warmup = min(warmup_steps(settings, total_steps), total_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = peak * settings.min_lr_ratio
  if settings.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  elif settings.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=settings.min_lr_ratio)
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay (kernels, embeddings, LoRA factors)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep=None)
  return flax.traverse_util.unflatten_dict({path: path[-1] not in _NO_DECAY for path in flat})


def make_optimizer(settings: OptimizerSettings, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`(optimizer, schedule)` for a run of `total_steps` steps: clip by global norm (when
  `max_grad_norm` > 0), then AdamW on `learning_rate_schedule`."""
  schedule = learning_rate_schedule(settings, total_steps)
  adamw = optax.adamw(schedule, b1=settings.b1, b2=settings.b2, eps=settings.eps,
                      weight_decay=settings.weight_decay, mask=decay_mask)
  if settings.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(settings.max_grad_norm), adamw), schedule
  return adamw, schedule
