"""QLoRA with your own loop: an HF folder onto a mesh of every device, LoRA on chosen projections
over an NF4 base, chat records encoded and packed with response-only masks, a few steps of a
plain Python loop with your own optax optimizer, then merge, save as an HF folder, and compare
the saved folder's logits with the trained model's in transformers.

  python examples/lora_qlora_loop.py --model HF_FOLDER --tokenizer TOKENIZER_FOLDER
"""

import argparse
import tempfile

import flax.linen as nn
import jax
import numpy as np
import optax

from jaxsft.adapters import LoraSettings, QuantSettings, dense_params
from jaxsft.data import encode_messages, load_template, load_tokenizer, pack, pad_rows
from jaxsft.interop import load_config, save_checkpoint
from jaxsft.models import Llama
from jaxsft.parallel import MeshSettings, batch_sharding, global_batch, mesh_and_rules
from jaxsft.train import init_train_state, jit_train_step, state_shardings

CHATS = [[{'role': 'user', 'content': f'What is {a} plus {b}?'},
          {'role': 'assistant', 'content': str(a + b)}] for a in range(4) for b in range(4)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', required=True)
  parser.add_argument('--tokenizer', required=True)
  parser.add_argument('--template', default='chatml')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args()

  # Every device on the data axis; weights sharded by their logical axes under `rules`.
  mesh, rules = mesh_and_rules(MeshSettings(shape=(-1, 1, 1)))
  model_config = load_config(args.model, dtype='float32', attention_implementation='xla')
  lora = LoraSettings(rank=8, alpha=16.0, targets=('q_proj', 'v_proj', 'down_proj'))
  quant = QuantSettings(kind='nf4')  # the base's targeted kernels in 4 bits, read shard by shard
  optimizer = optax.adamw(3e-3)
  with nn.logical_axis_rules(rules):
    state = init_train_state(model_config, optimizer, mesh, rules, base=args.model, lora=lora,
                             quant=quant)
    shardings = state_shardings(model_config, optimizer, mesh, rules, lora=lora, quant=quant)

  # Response-only masks, examples packed into rows that never see each other, and the rows
  # padded to a multiple of the devices that split them.
  tokenizer = load_tokenizer(args.tokenizer)
  template = load_template(args.template, tokenizer)
  examples = [encode_messages(chat, tokenizer, template) for chat in CHATS]
  rows = pad_rows(pack(examples, seq_len=64), mesh.shape['data'] * mesh.shape['fsdp'])
  row_sharding = batch_sharding(mesh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jit_train_step(model_config, optimizer, shardings, row_sharding)
    batch = global_batch(rows, row_sharding)  # one process: its rows are the global batch
    for i in range(args.steps):
      state, metrics = step(state, batch)
      print(f'step {i + 1}: loss {float(metrics["loss"]):.4f}')
    adapted = Llama(state.model_config(model_config)).apply(
        state.variables(), batch['inputs'], batch['positions'], batch['segment_ids'])

  # The adapters folded into the dequantized base, in float32, saved as an HF folder.
  out = args.out or tempfile.mkdtemp(prefix='qlora_merged_')
  save_checkpoint(out, model_config, dense_params(state.frozen, state.params, lora.scale),
                  dtype='float32', tokenizer_dir=args.tokenizer)
  print(f'saved the merged model to {out}')

  import torch  # the reference: transformers on the saved folder
  import transformers
  reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  worst = 0.0
  for row in range(len(rows['inputs'])):
    for segment in set(rows['segment_ids'][row].tolist()) - {0}:
      where = rows['segment_ids'][row] == segment
      with torch.no_grad():
        theirs = reference(torch.tensor(rows['inputs'][row][where][None])).logits[0].numpy()
      ours = np.asarray(adapted[row])[where]
      worst = max(worst, float(np.abs(ours - theirs).max()))
  print(f'max |logit diff| vs transformers: {worst:.3g}')


if __name__ == '__main__':
  main()
