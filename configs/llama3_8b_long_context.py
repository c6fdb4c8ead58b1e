"""LLaMA-3.1-8B, LoRA r=16 on a bf16 base, rows of 1,048,576 tokens split over 8 devices
(context parallelism: `mesh.shape=(data, fsdp, context, tensor)`), OpenAI-style messages with
the LLaMA-3 template.

  jaxsft train --config configs/llama3_8b_long_context.py --workdir runs/long \
      --config.model.path=/models/Llama-3.1-8B-Instruct

  jaxsft plan --config configs/llama3_8b_long_context.py --config.model.path= --devices 8 \
      --find-max-seq-len --device-memory-gib 80      # the longest row on an 8-chip slice

Each device holds 1/8 of every row's tokens and 1/8 of the weights (FSDP over the same
devices); attention passes key/value chunks around the devices (a ring, docs/design.md). Full
remat saves one `[T / 8, 4096]` bf16 row per layer, 32 GiB per device at 1M tokens; the MLP runs
8,192 tokens at a time so its `[T, 14336]` intermediates never exist whole.
"""

from jaxsft.config import default_config


def get_config():
  config = default_config()
  config.model.path = '/models/Llama-3.1-8B-Instruct'
  config.model.preset = 'llama3.1-8b'  # the architecture, for plans without the weights
  config.model.param_dtype = 'bfloat16'  # the frozen base; the adapters train in float32
  config.model.remat_policy = 'full'
  config.model.mlp_chunk_size = 8192
  config.lora.enabled = True
  config.lora.rank = 16
  config.lora.alpha = 32.0
  config.lora.dropout = 0.0  # PEFT's default; dropout's masks cost 4 bytes a token per input
  config.data.datasets = [{'path': 'data/long_chats.jsonl', 'format': 'messages'}]
  config.data.template = 'llama3'
  config.data.max_seq_len = 1048576
  config.batch_size = 1
  config.mesh.shape = (1, 1, 8, 1)
  config.optim.learning_rate = 1e-4
  config.train.num_steps = 200
  return config
