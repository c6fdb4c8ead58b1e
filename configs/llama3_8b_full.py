"""LLaMA-3-8B full fine-tuning (bf16 compute, fp32 master weights), ShareGPT data, LLaMA-3
template. Needs FSDP across devices: 8B parameters with fp32 Adam are ~128 GB of state.

  jaxsft train --config configs/llama3_8b_full.py --workdir runs/llama3-full \
      --config.model.path=/models/Meta-Llama-3-8B
"""

from jaxsft.config import default_config


def get_config():
  config = default_config()
  config.model.path = '/models/Meta-Llama-3-8B'
  config.model.preset = 'llama3-8b'
  config.model.remat_policy = 'full'
  config.mesh.shape = (1, -1, 1)  # FSDP over every device
  config.data.datasets = [{'path': 'data/sharegpt.jsonl', 'format': 'sharegpt'}]
  config.data.template = 'llama3'
  config.data.max_seq_len = 4096
  config.data.eval_size = 0.01
  config.batch_size = 64
  config.optim.learning_rate = 1e-5
  config.optim.weight_decay = 0.0
  config.optim.warmup_ratio = 0.03
  config.train.num_epochs = 2.0
  return config
