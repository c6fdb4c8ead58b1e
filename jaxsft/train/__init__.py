"""Training: the train state (one build path, whose abstract state and shardings are
`jax.eval_shape` of the same init), the loss and the pure train and eval steps, the optimizer,
checkpoints and their checksums, the run (`run.train`) and its step loop with callbacks, the
memory plan, metrics and FLOPs, the work directory (its lock, reading a run back, export).

May import `data`, `interop`, `models`, `adapters`, `parallel` and `errors`; never `eval`, the
demo, the CLI or the config defaults (a run takes its config). Evaluation, sampling and the
demo hook in through `train.callbacks`.
"""
