"""Context parallelism on this machine's devices: a LoRA train step with each row split over N
devices (`mesh.shape=(1, 1, N, 1)`) against the same step on one device, float32, packed rows
whose examples cross the shard boundaries. Prints the loss, the gradient norm and the largest
relative difference of the updated adapters; exits 1 beyond `--rtol`.

  python scripts/check_context.py                  # every device of this machine (N >= 2)
  python scripts/check_context.py --fake-devices 4 # N fake CPU devices (no accelerator needed)

`scripts/device_check.sh` runs it (step context-parallel): on a lent multi-device machine over
its devices, else (one device, or the dry run) over fake CPU devices, and says which.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--fake-devices', type=int, default=0,
                      help='use this many fake CPU devices instead of the accelerators')
  parser.add_argument('--length', type=int, default=512, help='tokens per row')
  parser.add_argument('--rtol', type=float, default=1e-5)
  args = parser.parse_args()
  if args.fake_devices:
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.fake_devices}')
  # pylint: disable=import-outside-toplevel  # after the device flags
  import flax.linen as nn
  import jax
  import numpy as np

  from jaxsft.adapters import LoraSettings
  from jaxsft.models import LlamaConfig
  from jaxsft.parallel import MeshSettings, batch_sharding, global_batch, mesh_and_rules
  from jaxsft.train import OptimizerSettings, StepSettings, init_train_state, jit_train_step
  from jaxsft.train.optim import make_optimizer
  from jaxsft.train.state import state_shardings

  devices = jax.devices()
  count = min(len(devices), 8)
  if count < 2:
    print(f'check_context: {len(devices)} device here; context parallelism needs >= 2 (use '
          '--fake-devices N)')
    return 2
  length = args.length // (2 * count) * 2 * count
  model_config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                             num_layers=2, num_heads=4, num_kv_heads=2, dtype='float32',
                             attention_implementation='auto', remat_policy='full')
  lora = LoraSettings(rank=8, alpha=16.0, dropout=0.0)
  optimizer, schedule = make_optimizer(OptimizerSettings(learning_rate=1e-2, warmup_steps=0,
                                                         eps=1.0), 10)
  model_config = model_config.with_lora(lora)
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(0, 512, (2, length), dtype=np.int32),
           'targets': rng.integers(0, 512, (2, length), dtype=np.int32)}
  cuts = np.sort(rng.choice(np.arange(1, length - 8), 6, replace=False))
  segment_ids = np.searchsorted(cuts, np.arange(length), 'right').astype(np.int32) + 1
  segment_ids[-8:] = 0  # padding at the end
  batch['segment_ids'] = np.stack([segment_ids, segment_ids])
  batch['positions'] = np.stack([np.concatenate([np.arange(n) for n in np.bincount(
      segment_ids)[np.unique(segment_ids)]]).astype(np.int32)] * 2)
  batch['loss_mask'] = (batch['segment_ids'] > 0).astype(np.int32) * (rng.random((2, length))
                                                                      < 0.7)

  def step_on(shape):
    mesh, rules = mesh_and_rules(MeshSettings(shape=shape), devices[:int(np.prod(shape))])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = init_train_state(model_config, optimizer, mesh, rules, lora=lora, seed=0)
      shardings = state_shardings(model_config, optimizer, mesh, rules, lora=lora)
      rows = batch_sharding(mesh)
      step = jit_train_step(model_config, optimizer, shardings, rows, StepSettings(), schedule)
      state, metrics = step(state, global_batch(batch, rows))
      return jax.device_get(state.params), jax.device_get(metrics)

  reference, reference_metrics = step_on((1, 1, 1, 1))
  split, metrics = step_on((1, 1, count, 1))
  worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(b).max(), 1e-12))
              for a, b in zip(jax.tree_util.tree_leaves(split),
                              jax.tree_util.tree_leaves(reference)))
  loss_rel = abs(float(metrics['loss']) / float(reference_metrics['loss']) - 1)
  norm_rel = abs(float(metrics['grad_norm']) / float(reference_metrics['grad_norm']) - 1)
  kind = 'fake CPU devices' if args.fake_devices else devices[0].device_kind
  print(f'context parallel over {count} x {kind}, rows of {length} tokens: loss '
        f'{float(metrics["loss"]):.6f} vs {float(reference_metrics["loss"]):.6f} on one device '
        f'(relative {loss_rel:.2e}); grad norm relative {norm_rel:.2e}; updated adapters '
        f'relative {worst:.2e}')
  ok = max(loss_rel, norm_rel, worst) <= args.rtol
  print(f'context parallel: {"ok" if ok else "MISMATCH"} (rtol {args.rtol:g})')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
