"""The LM head and loss alone: jaxsft's fused, chunked cross-entropy against the whole-logits
reference, forward and backward, on the same hidden states.

`fused` is `jaxsft.train.loss.fused_cross_entropy` (the train step's loss): supervised positions
first, chunks of `--chunk` positions, the gradient formed inside each chunk. `reference` forms
the `[B, T, V]` logits and differentiates `logsumexp - target logit` with autodiff. Both give the
loss and the gradient w.r.t. the hidden states (and the head kernel with `--head-grad`, as full
fine-tuning needs); they are checked against each other before timing.

  python scripts/bench_loss.py                            # 1 x 2,048 tokens, D 512, V 32,000
  python scripts/bench_loss.py --supervised 0.62          # the first 38 % of each row prompt
  python scripts/bench_loss.py --batch 4 --seq 512 --head-grad
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.train.loss import fused_cross_entropy


def reference_loss(hidden_btd, kernel_dv, targets_bt, mask_bt):
  logits_btv = jnp.einsum('btd,dv->btv', hidden_btd, kernel_dv,
                          preferred_element_type=jnp.float32)
  target_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  return jnp.sum((jax.nn.logsumexp(logits_btv, axis=-1) - target_bt) * mask_bt)


def timed(fn, args, repeats: int) -> tuple[float, tuple]:
  result = jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    result = fn(*args)
  jax.block_until_ready(result)
  return (time.perf_counter() - start) / repeats, result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--seq', type=int, default=2048)
  parser.add_argument('--hidden', type=int, default=512)
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--chunk', type=int, default=256)
  parser.add_argument('--supervised', type=float, default=1.0,
                      help='fraction of each row supervised (its end)')
  parser.add_argument('--head-grad', action='store_true', help='also the head kernel gradient')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()

  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(keys[0], (args.batch, args.seq, args.hidden), dtype)
  kernel = (jax.random.normal(keys[1], (args.hidden, args.vocab)) / args.hidden ** 0.5
            ).astype(dtype)
  targets = jax.random.randint(keys[2], (args.batch, args.seq), 0, args.vocab)
  prompt = int(round((1 - args.supervised) * args.seq))
  mask = jnp.broadcast_to(jnp.arange(args.seq) >= prompt, (args.batch, args.seq)
                          ).astype(jnp.float32)
  argnums = (0, 1) if args.head_grad else 0
  sides = {
      'fused': lambda h, k, t, m: fused_cross_entropy(h, k, t, m, args.chunk)[0],
      'reference': reference_loss,
  }
  results = {}
  for name, loss in sides.items():
    step = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    seconds, value = timed(step, (hidden, kernel, targets, mask), args.repeats)
    results[name] = (seconds, value)
  (fused_s, fused_v), (ref_s, ref_v) = results['fused'], results['reference']
  diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b)) /
                                                    (jnp.max(jnp.abs(b)) + 1e-30)),
                                 fused_v, ref_v)
  worst = max(jax.tree_util.tree_leaves(diffs))
  tokens = args.batch * args.seq
  print(f'{args.batch} x {args.seq} tokens, D {args.hidden}, V {args.vocab}, '
        f'{args.supervised:.0%} supervised, {args.dtype}, head gradient {args.head_grad}; '
        f'max relative difference {worst:.1e}')
  print('| loss and gradient | ms | tokens/s |\n| --- | ---: | ---: |')
  for name, (seconds, _) in results.items():
    print(f'| {name} | {1000 * seconds:,.0f} | {tokens / seconds:,.0f} |')
  print(f'fused / reference time: {fused_s / ref_s:.2f}')
  np.testing.assert_array_less(worst, 1e-4 if dtype == jnp.float32 else 2e-2)


if __name__ == '__main__':
  main()
