"""The optimizer: optax AdamW with warmup + decay schedules, clipping and a weight-decay mask."""

from __future__ import annotations

from typing import Any

import flax
import optax

from jaxsft.errors import UserError

SCHEDULES = ('constant', 'linear', 'cosine')
# Leaves that never get weight decay: RMSNorm scales and biases (the usual LLaMA recipe).
_NO_DECAY = ('scale', 'bias')


def warmup_steps(optim_config: Any, total_steps: int) -> int:
  """`warmup_steps` when set (>= 0), else `warmup_ratio` of the run."""
  if optim_config.warmup_steps >= 0:
    return int(optim_config.warmup_steps)
  return int(round(optim_config.warmup_ratio * total_steps))


def learning_rate_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then constant, linear or cosine decay to
  `learning_rate * min_lr_ratio` at `total_steps`."""
  if optim_config.schedule not in SCHEDULES:
    raise UserError(f'optim.schedule={optim_config.schedule!r}; choose one of {SCHEDULES}.')
  peak = optim_config.learning_rate
  warmup = min(warmup_steps(optim_config, total_steps), total_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = peak * optim_config.min_lr_ratio
  if optim_config.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  elif optim_config.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_config.min_lr_ratio)
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay (kernels, embeddings, LoRA factors)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep=None)
  return flax.traverse_util.unflatten_dict({path: path[-1] not in _NO_DECAY for path in flat})


def make_optimizer(optim_config: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`(optimizer, schedule)`: clip by global norm (when `max_grad_norm` > 0), then AdamW."""
  schedule = learning_rate_schedule(optim_config, total_steps)
  adamw = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                      weight_decay=optim_config.weight_decay, mask=decay_mask)
  if optim_config.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_config.max_grad_norm), adamw), schedule
  return adamw, schedule
