"""Sharded log-likelihood scoring: an HF folder read shard by shard onto a mesh of every device
(weights split over `fsdp`), prompt / continuation pairs scored with `score_requests` (shared
prompts read once, the rest packed into rows), checked against transformers.

  python examples/score.py --model HF_FOLDER --tokenizer TOKENIZER_FOLDER
"""

import argparse

import jax
import numpy as np

from jaxsft.data import load_tokenizer
from jaxsft.eval import score_requests
from jaxsft.interop import load_checkpoint
from jaxsft.parallel import MeshSettings, mesh_and_rules

PAIRS = [('The capital of France is', ' Paris'), ('The capital of France is', ' Rome'),
         ('The capital of France is', ' Berlin'), ('2 + 2 =', ' 4'), ('2 + 2 =', ' 5'),
         ('Water boils at', ' 100 degrees Celsius'), ('Once upon a time', ' there was a cat')]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', required=True)
  parser.add_argument('--tokenizer', required=True)
  args = parser.parse_args()

  # Rows over `data`, every weight's embedding axis over `fsdp`: no device holds the model.
  fsdp = 2 if jax.device_count() % 2 == 0 else 1
  mesh, rules = mesh_and_rules(MeshSettings(shape=(-1, fsdp, 1)))
  model_config, params = load_checkpoint(args.model, dtype='float32', mesh=mesh, rules=rules,
                                         config_overrides={'attention_implementation': 'xla'})
  tokenizer = load_tokenizer(args.tokenizer)
  encode = lambda text: tokenizer(text, add_special_tokens=False)['input_ids']  # noqa: E731
  requests = [([tokenizer.bos_token_id] + encode(prompt), encode(continuation))
              for prompt, continuation in PAIRS]
  scored = score_requests(model_config, {'params': params}, requests)
  for (prompt, continuation), result in zip(PAIRS, scored):
    print(f'{prompt!r} + {continuation!r}: {result.logprob:.3f} nats'
          f'{" (greedy)" if result.is_greedy else ""}')

  import torch  # the reference: transformers' log-softmax over the continuation's tokens
  import transformers
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
  worst = 0.0
  for (context, continuation), result in zip(requests, scored):
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
      logprobs = torch.log_softmax(hf_model(ids).logits[0], -1).numpy()
    at = np.arange(len(context) - 1, len(context) + len(continuation) - 1)
    theirs = float(logprobs[at, continuation].sum())
    worst = max(worst, abs(result.logprob - theirs))
  print(f'max |loglik diff| vs transformers: {worst:.3g}')


if __name__ == '__main__':
  main()
