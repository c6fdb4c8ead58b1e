"""4-bit benchmark: bits per parameter and reconstruction error vs bitsandbytes.

  python scripts/bench_quant.py

The step time of QLoRA vs LoRA on the same model is `scripts/bench_train.py --methods lora,qlora`.

Error: mean |W_hat - W| / mean |W| over LLaMA-2-7B-shaped kernels (HF [out, in]) drawn at
std 0.02 with a few outlier columns, for bitsandbytes (`quantize_4bit`, NF4, blocksize 64) and
jaxsft, with and without double quantization.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def error_table(seed: int = 0) -> list[dict]:
  import bitsandbytes.functional as bnb
  import jax.numpy as jnp
  import torch

  from jaxsft.adapters import quant
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  for row in error_table(args.seed):
    print(json.dumps(row))


if __name__ == '__main__':
  main()
