"""Decode speed: tokens/s of KV-cache generation vs a full forward pass per token.

  python scripts/bench_generate.py                          # CPU, a small random model
  python scripts/bench_generate.py --hidden 2048 --layers 16 --batch 8 --dtype bfloat16   # GPU

Both decode greedily from the same prompt; the cached path is one prefill plus one jitted
`while_loop` (jaxsft.eval.generate), the uncached path re-runs the model over the whole sequence for
every new token. Times exclude compilation (one warm-up call each).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--hidden', type=int, default=512)
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--prompt', type=int, default=128)
  parser.add_argument('--new', type=int, default=128)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxsft.eval.generate import SamplingConfig, generate, generate_uncached
  from jaxsft.models import Llama, LlamaConfig
  config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden,
                       intermediate_size=args.hidden * 11 // 4, num_layers=args.layers,
                       num_heads=args.hidden // 64, num_kv_heads=args.hidden // 64,
                       dtype=args.dtype, attention_implementation='xla')
  params = nn.unbox(jax.jit(lambda: Llama(config).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))()['params'])
  variables = {'params': params}
  prompts = np.random.default_rng(0).integers(0, 32000, (args.batch, args.prompt)).tolist()
  sampling = SamplingConfig(max_new_tokens=args.new)
  generate(config, variables, prompts, sampling)  # compile
  start = time.perf_counter()
  cached = generate(config, variables, prompts, sampling)
  cached_s = time.perf_counter() - start
  generate_uncached(config, variables, prompts[0], args.new)  # compile this length
  start = time.perf_counter()
  uncached = generate_uncached(config, variables, prompts[0], args.new)
  uncached_s = time.perf_counter() - start
  assert cached[0] == uncached[:len(cached[0])], 'cached and uncached decoding disagree'
  result = {'device': jax.devices()[0].device_kind, 'hidden': args.hidden,
            'layers': args.layers, 'prompt': args.prompt, 'new_tokens': args.new,
            'batch': args.batch, 'dtype': args.dtype,
            'cached_tokens_per_s': args.batch * args.new / cached_s,
            'uncached_tokens_per_s': args.new / uncached_s}
  print(f'{result["device"]}: KV cache {result["cached_tokens_per_s"]:.1f} tok/s '
        f'(batch {args.batch}), no cache {result["uncached_tokens_per_s"]:.1f} tok/s (batch 1), '
        f'{result["cached_tokens_per_s"] / args.batch / result["uncached_tokens_per_s"]:.1f}x '
        'per sequence')
  print(json.dumps(result))


if __name__ == '__main__':
  main()
