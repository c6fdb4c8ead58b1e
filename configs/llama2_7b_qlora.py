"""LLaMA-2-7B QLoRA: NF4 frozen weights with double quantization, LoRA r=16 on every linear
layer. Fits one 24 GB GPU at 2048 tokens per row with remat.

  jaxsft plan --config configs/llama2_7b_qlora.py --device-memory-gib 24
  jaxsft train --config configs/llama2_7b_qlora.py --workdir runs/llama2-qlora \
      --config.model.path=/models/Llama-2-7b-hf
"""

from jaxsft.config import default_config


def get_config():
  config = default_config()
  config.model.path = '/models/Llama-2-7b-hf'
  config.model.preset = 'llama2-7b'
  config.model.remat_policy = 'full'
  config.quant.kind = 'nf4'
  config.quant.double_quant = True
  config.lora.enabled = True
  config.lora.rank = 16
  config.lora.alpha = 16.0
  config.lora.dropout = 0.05
  config.lora.targets = ['all-linear']
  config.data.datasets = [{'path': 'data/alpaca_en_demo.json', 'format': 'alpaca'}]
  config.data.template = 'llama2'
  config.data.max_seq_len = 2048
  config.batch_size = 1
  config.train.grad_accum_steps = 1
  config.optim.learning_rate = 2e-4
  config.train.num_epochs = 1.0
  return config
