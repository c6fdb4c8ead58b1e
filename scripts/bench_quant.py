"""4-bit benchmark: bits per parameter, reconstruction error vs bitsandbytes, and the step time
of QLoRA vs LoRA on the same model.

  python scripts/bench_quant.py                      # CPU
  python scripts/bench_quant.py --hidden 2048 --layers 8 --seq 2048 --dtype bfloat16   # GPU

Error: mean |W_hat - W| / mean |W| over LLaMA-2-7B-shaped kernels (HF [out, in]) drawn at
std 0.02 with a few outlier columns, for bitsandbytes (`quantize_4bit`, NF4, blocksize 64) and
jaxsft, with and without double quantization.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def error_table(seed: int = 0) -> list[dict]:
  import bitsandbytes.functional as bnb
  import jax.numpy as jnp
  import torch

  from jaxsft import quant
  rng = np.random.default_rng(seed)
  rows = []
  for name, shape in (('q_proj', (4096, 4096)), ('gate_proj', (11008, 4096)),
                      ('down_proj', (4096, 11008))):
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w[:, rng.integers(0, shape[1], 8)] *= 20
    scale = np.abs(w).mean()
    for double in (False, True):
      packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64,
                                        compress_statistics=double, quant_type='nf4')
      reference = bnb.dequantize_4bit(packed, state).numpy()
      row = {'kernel': name, 'shape': shape, 'double_quant': double,
             'bnb_error': float(np.abs(reference - w).mean() / scale)}
      roundings = ('min_error', 'nearest') if double else ('-',)
      for rounding in roundings:
        node = quant.quantize_kernel(jnp.asarray(w.T), 'nf4', 64, double,
                                     rounding if double else 'nearest')
        ours = np.asarray(quant.dequantize(node)).T
        row[f'jaxsft_error_{rounding}'] = float(np.abs(ours - w).mean() / scale)
        row['max_abs_diff_vs_bnb' if not double else f'max_abs_diff_vs_bnb_{rounding}'] = float(
            np.abs(ours - reference).max())
        row['bits_per_parameter'] = quant.bits_per_parameter(node)
      rows.append(row)
  return rows


def step_times(args) -> dict:
  import flax.linen as nn
  import jax

  from jaxsft import optim, sharding, train
  from jaxsft.config import default_config
  times = {}
  for kind in ('none', 'nf4'):
    config = default_config()
    config.model.architecture = {
        'vocab_size': 32000, 'hidden_size': args.hidden, 'intermediate_size': args.hidden * 11 // 4,
        'num_layers': args.layers, 'num_heads': args.hidden // 64, 'num_kv_heads': args.hidden // 64}
    config.model.dtype = args.dtype
    config.model.attention_implementation = 'xla' if args.dtype == 'float32' else 'auto'
    config.lora.enabled = True
    config.lora.targets = ['all-linear']
    config.quant.kind = kind
    config.batch_size = args.batch
    model_config, _ = train.model_config_from(config)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    optimizer, schedule = optim.make_optimizer(config.optim, 100)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      state = train.init_train_state(config, model_config, None, optimizer, mesh,
                                     sharding.DEFAULT_RULES)
      step = jax.jit(train.make_train_step(model_config, optimizer, schedule),
                     donate_argnums=(0,))
      rng = np.random.default_rng(0)
      batch = {k: jax.numpy.asarray(rng.integers(0, 32000, (args.batch, args.seq), np.int32))
               for k in ('inputs', 'targets')}
      batch['loss_mask'] = jax.numpy.ones((args.batch, args.seq), jax.numpy.int32)
      batch['segment_ids'] = jax.numpy.ones((args.batch, args.seq), jax.numpy.int32)
      batch['positions'] = jax.numpy.broadcast_to(jax.numpy.arange(args.seq, dtype='int32'),
                                                  (args.batch, args.seq))
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times['qlora' if kind == 'nf4' else 'lora'] = (time.perf_counter() - start) / args.steps
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--hidden', type=int, default=512)
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--seq', type=int, default=512)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--skip-error', action='store_true')
  args = parser.parse_args()
  import jax
  results = {'device': jax.devices()[0].device_kind}
  if not args.skip_error:
    results['error'] = error_table()
    for row in results['error']:
      print(json.dumps(row))
  results['step_seconds'] = step_times(args)
  print(f'step time ({results["device"]}, hidden {args.hidden}, {args.layers} layers, '
        f'{args.batch}x{args.seq} tokens, {args.dtype}): LoRA '
        f'{results["step_seconds"]["lora"]:.3f} s, QLoRA {results["step_seconds"]["qlora"]:.3f} s '
        f'({results["step_seconds"]["qlora"] / results["step_seconds"]["lora"]:.2f}x)')
  print(json.dumps(results))


if __name__ == '__main__':
  main()
