"""Mixture-of-experts layer speed: jaxsft's grouped matmul against the alternatives, forward and
backward of the experts of one sparse layer on the same routed tokens, side by side in one run.

  - grouped: what jaxsft runs off a TPU (`jaxsft.models.grouped`: assignments grouped by expert in
    tiles, one dense dot per tile);
  - ragged_dot: `jax.lax.ragged_dot` over the same layout (a TPU's grouped-matmul kernel; XLA on
    a CPU computes it as a dense product masked per group);
  - one-hot: every expert applied to every token, weighted by a one-hot mask of the routing
    (E / k times the FLOPs, no gather or scatter).

  python scripts/bench_moe.py                        # Qwen3-MoE-like layer of scripts/bench_train.py
  python scripts/bench_moe.py --tokens 4096 --experts 16 --top-k 4

Each is checked against the one-hot reference (values and gradients) before it is timed.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--tokens', type=int, default=2048)
  parser.add_argument('--hidden', type=int, default=512)
  parser.add_argument('--expert-size', type=int, default=512, help='each expert\'s F')
  parser.add_argument('--experts', type=int, default=8)
  parser.add_argument('--top-k', type=int, default=2)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxsft.models import grouped as grouping
  from jaxsft.models import moe

  t, d, f, e, k = args.tokens, args.hidden, args.expert_size, args.experts, args.top_k
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((t, d)) / np.sqrt(d), dtype)
  w_up = jnp.asarray(rng.standard_normal((e, d, 2 * f)) / np.sqrt(d), dtype)
  w_down = jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), dtype)
  weights, experts, _ = moe.route(jnp.asarray(rng.standard_normal((t, e)), jnp.float32), k,
                                  True)
  layout = grouping.group_by_expert(experts, e)

  def swiglu(h):
    return jax.nn.silu(h[..., :f]) * h[..., f:]

  def grouped(x, w_up, w_down, matmul=grouping.grouped_matmul):
    rows = grouping.scatter_rows(jnp.repeat(x, k, axis=0), layout)
    y = matmul(swiglu(matmul(rows, w_up, layout)), w_down, layout)
    y_tkd = jnp.take(y, layout.rows, axis=0).reshape(t, k, d)
    return jnp.einsum('tkd,tk->td', y_tkd.astype(jnp.float32), weights)

  def ragged(rows, kernel, layout):
    return jax.lax.ragged_dot(rows, kernel.astype(rows.dtype), layout.group_sizes)

  def one_hot(x, w_up, w_down):
    every = jnp.einsum('etf,efd->etd', swiglu(jnp.einsum('td,edf->etf', x, w_up)), w_down)
    gate_te = jnp.sum(jax.nn.one_hot(experts, e) * weights[..., None], axis=1)
    return jnp.einsum('etd,te->td', every.astype(jnp.float32), gate_te)

  probe = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  paths = {'grouped': grouped, 'ragged_dot': lambda *a: grouped(*a, matmul=ragged),
           'one-hot': one_hot}
  steps = {name: jax.jit(jax.value_and_grad(lambda *w, fn=fn: jnp.sum(fn(*w) * probe),
                                            (0, 1, 2)))
           for name, fn in paths.items()}
  reference = steps['one-hot'](x, w_up, w_down)
  tolerance = 1e-3 if dtype == jnp.float32 else 5e-2
  results = {}
  for name, step in steps.items():
    out = step(x, w_up, w_down)
    for got, want in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(reference)):
      scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
      error = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
      assert error <= tolerance * scale, (name, error, scale)
    start = time.perf_counter()
    for _ in range(args.repeats):
      jax.block_until_ready(step(x, w_up, w_down))
    results[name] = (time.perf_counter() - start) / args.repeats
  useful = 3 * 2 * t * k * 3 * d * f  # forward + backward of the k chosen experts' matmuls
  print(json.dumps({'tokens': t, 'hidden': d, 'expert_size': f, 'experts': e, 'top_k': k,
                    'dtype': args.dtype, 'device': jax.devices()[0].device_kind,
                    'tile': layout.tile, 'grouped_rows': layout.length}))
  print('| path | fwd+bwd (ms) | vs grouped | useful GFLOP/s |')
  print('| --- | ---: | ---: | ---: |')
  for name, seconds in results.items():
    print(f'| {name} | {1e3 * seconds:.1f} | {seconds / results["grouped"]:.2f}x | '
          f'{useful / seconds / 1e9:.1f} |')


if __name__ == '__main__':
  main()
