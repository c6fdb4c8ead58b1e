"""Qwen2.5-7B, LoRA (rsLoRA scaling) on every projection, OpenAI-style messages, the
tokenizer's own ChatML Jinja template.

  jaxsft train --config configs/qwen2_5_7b_lora.py --workdir runs/qwen-lora \
      --config.model.path=/models/Qwen2.5-7B-Instruct
"""

from jaxsft.config import default_config


def get_config():
  config = default_config()
  config.model.path = '/models/Qwen2.5-7B-Instruct'
  config.model.preset = 'qwen2.5-7b'
  config.model.remat_policy = 'save_dots'
  # Under LoRA `param_dtype` is the frozen base's dtype (the adapters train in float32):
  # bf16, as the checkpoint is, holds 6.7B weights in 12.5 GiB instead of 25.
  config.model.param_dtype = 'bfloat16'
  config.lora.enabled = True
  config.lora.rank = 64
  config.lora.alpha = 128.0
  config.lora.rslora = True
  config.lora.targets = ['all-linear']
  config.data.datasets = [{'path': 'data/chat.jsonl', 'format': 'messages'}]
  config.data.template = 'jinja'
  config.data.max_seq_len = 4096
  config.data.eval_size = 0.02
  config.batch_size = 32
  config.optim.learning_rate = 1e-4
  config.train.num_epochs = 2.0
  config.train.neftune_alpha = 5.0
  return config
