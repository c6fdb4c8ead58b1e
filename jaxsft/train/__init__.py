"""Training: the train state (one build path, whose abstract state and shardings are
`jax.eval_shape` of the same init), the loss and the pure train and eval steps, the optimizer,
checkpoints and their checksums, the run (`run.train`) and its step loop with callbacks, the
memory plan, metrics and FLOPs, the work directory (its lock, reading a run back, export).

May import `data`, `interop`, `models`, `adapters`, `parallel` and `errors`; never `eval`, the
demo, the CLI or the config defaults (a run takes its config). Evaluation, sampling and the
demo hook in through `train.callbacks`.
"""

from __future__ import annotations

from jaxsft.lazy import lazy_exports

# Public name -> home module, imported on first access: the CLI imports
# `jaxsft.train.preemption` and `export_target` before JAX loads, which must not pull in the
# rest of training.
_HOMES = {name: f'jaxsft.train.{module}' for name, module in {
    'TrainState': 'state', 'abstract_adapters': 'state', 'abstract_train_state': 'state',
    'init_train_state': 'state', 'state_shardings': 'state',
    'StepSettings': 'step', 'make_train_step': 'step', 'jit_train_step': 'step',
    'make_eval_step': 'step', 'loss_terms': 'step', 'evaluate_loss': 'step',
    'fused_cross_entropy': 'loss', 'token_logprobs': 'loss', 'batch_logprobs': 'loss',
    'OptimizerSettings': 'optim', 'make_optimizer': 'optim',
    'learning_rate_schedule': 'optim',
    'ModelSettings': 'model_source', 'model_config_from': 'model_source',
    'RunSettings': 'settings', 'run_settings': 'run', 'train': 'run', 'load_run': 'run',
    'Checkpointer': 'checkpoint',
}.items()}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
