"""A custom objective from per-token log-probabilities: DPO (a pairwise preference loss) on
chosen / rejected answers, with the frozen base as the reference, gradients w.r.t. the LoRA
tree only, jitted with the state's shardings. The log-probabilities come from
`jaxsft.train.batch_logprobs`, which applies the LM head in chunks and never forms the
`[B, T, V]` logits.

  python examples/custom_objective.py --model HF_FOLDER --tokenizer TOKENIZER_FOLDER
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsft.adapters import LoraSettings
from jaxsft.data import encode_messages, load_template, load_tokenizer, pack, pad_rows
from jaxsft.interop import load_config
from jaxsft.models import Llama
from jaxsft.parallel import MeshSettings, batch_sharding, global_batch, mesh_and_rules
from jaxsft.train import batch_logprobs, init_train_state, state_shardings

# (prompt, chosen, rejected)
PAIRS = [(f'Say {word} twice.', f'{word} {word}', f'{word}') for word in
         ('red', 'blue', 'green', 'gold', 'pink', 'gray', 'teal', 'navy')]
BETA = 0.5


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', required=True)
  parser.add_argument('--tokenizer', required=True)
  parser.add_argument('--template', default='chatml')
  parser.add_argument('--steps', type=int, default=8)
  args = parser.parse_args()

  mesh, rules = mesh_and_rules(MeshSettings(shape=(-1, 1, 1)))
  model_config = load_config(args.model, dtype='float32', attention_implementation='xla')
  lora = LoraSettings(rank=4, alpha=8.0, targets='all-linear')
  optimizer = optax.adam(1e-2)
  with nn.logical_axis_rules(rules):
    state = init_train_state(model_config, optimizer, mesh, rules, base=args.model, lora=lora)
    shardings = state_shardings(model_config, optimizer, mesh, rules, lora=lora)

  # One answer per row (strategy 'none'): rows 2i and 2i + 1 are pair i's chosen and rejected.
  tokenizer = load_tokenizer(args.tokenizer)
  template = load_template(args.template, tokenizer)
  examples = [encode_messages([{'role': 'user', 'content': prompt},
                               {'role': 'assistant', 'content': answer}], tokenizer, template)
              for prompt, chosen, rejected in PAIRS for answer in (chosen, rejected)]
  rows = pad_rows(pack(examples, seq_len=48, strategy='none'),
                  mesh.shape['data'] * mesh.shape['fsdp'])
  pairs = len(PAIRS)
  policy = Llama(state.model_config(model_config))
  base = Llama(model_config)

  def answer_logprobs(model, variables, batch):
    """Summed log-probability of each row's answer `[rows]` (nats)."""
    return batch_logprobs(model, variables, batch, chunk=16).sum(axis=1)

  def dpo_loss(adapters, frozen, batch):
    chosen_minus_rejected = lambda x: x[0:2 * pairs:2] - x[1:2 * pairs:2]  # noqa: E731
    ours = answer_logprobs(policy, {'params': frozen, 'lora': adapters}, batch)
    reference = jax.lax.stop_gradient(answer_logprobs(base, {'params': frozen}, batch))
    margin = chosen_minus_rejected(ours) - chosen_minus_rejected(reference)
    return -jnp.mean(jax.nn.log_sigmoid(BETA * margin))

  def update(adapters, frozen, opt_state, batch):
    loss, grads = jax.value_and_grad(dpo_loss)(adapters, frozen, batch)  # adapters only
    updates, opt_state = optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  row_sharding = batch_sharding(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = global_batch(rows, row_sharding)
    update = jax.jit(update, in_shardings=(shardings.params, shardings.frozen,
                                           shardings.opt_state, row_sharding),
                     out_shardings=(shardings.params, shardings.opt_state, None),
                     donate_argnums=(0, 2))
    adapters, opt_state = state.params, state.opt_state
    losses = []
    for _ in range(args.steps):
      adapters, opt_state, loss = update(adapters, state.frozen, opt_state, batch)
      losses.append(float(loss))
    reference = jax.jit(lambda frozen, batch: batch_logprobs(
        base, {'params': frozen}, batch, chunk=16))(state.frozen, batch)
  print(f'DPO loss before: {losses[0]:.4f}, after {args.steps} steps: {losses[-1]:.4f}')

  import torch  # the reference: transformers' log-softmax on the same tokens
  import transformers
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
  worst = 0.0
  for row in range(2 * pairs):
    real = rows['segment_ids'][row] > 0
    with torch.no_grad():
      logits = hf_model(torch.tensor(rows['inputs'][row][real][None])).logits[0]
    theirs = torch.log_softmax(logits, -1).numpy()[np.arange(real.sum()),
                                                     rows['targets'][row][real]]
    mask = rows['loss_mask'][row][real] > 0
    worst = max(worst, float(np.abs(np.asarray(reference[row])[real][mask] - theirs[mask]).max()))
  print(f'max |logprob diff| vs transformers: {worst:.3g}')


if __name__ == '__main__':
  main()
