"""Qwen3-8B, LoRA on every projection with its per-head q/k norms trained whole (PEFT's
`modules_to_save`), OpenAI-style messages with reasoning rendered by the built-in Qwen3
template (`<think>` blocks as HF renders them).

  jaxsft train --config configs/qwen3_8b_lora.py --workdir runs/qwen3-lora \
      --config.model.path=/models/Qwen3-8B
"""

from jaxsft.config import default_config


def get_config():
  config = default_config()
  config.model.path = '/models/Qwen3-8B'
  config.model.preset = 'qwen3-8b'
  config.model.remat_policy = 'save_dots'
  # Under LoRA `param_dtype` is the frozen base's dtype (the adapters train in float32): bf16,
  # as the checkpoint is, holds the 8.2B weights in 15.3 GiB instead of 30.5.
  config.model.param_dtype = 'bfloat16'
  config.lora.enabled = True
  config.lora.rank = 32
  config.lora.alpha = 64.0
  config.lora.targets = ['all-linear']
  # The q/k norms are 2 x 128 weights per layer; training them costs nothing and lets the
  # attention logits' scale move with the adapters. `[]` keeps them frozen (PEFT's default).
  config.lora.modules_to_save = ['q_norm', 'k_norm']
  config.data.datasets = [{'path': 'data/chat.jsonl', 'format': 'messages'}]
  config.data.template = 'qwen3'
  config.data.max_seq_len = 4096
  config.data.eval_size = 0.02
  config.batch_size = 32
  config.optim.learning_rate = 1e-4
  config.train.num_epochs = 2.0
  return config
