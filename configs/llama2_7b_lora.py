"""LLaMA-2-7B, LoRA r=16 on every projection, Alpaca-format data, LLaMA-2 chat template.

  jaxsft train --config configs/llama2_7b_lora.py --workdir runs/llama2-lora \
      --config.model.path=/models/Llama-2-7b-hf --config.data.datasets="[{'path': 'alpaca.json'}]"

One 80 GB GPU holds it in bf16 with remat; on a TPU slice set --config.mesh.shape="(1,-1,1)"
for FSDP.
"""

from jaxsft.config import default_config


def get_config():
  config = default_config()
  config.model.path = '/models/Llama-2-7b-hf'  # a local HF folder (config.json + safetensors)
  config.model.preset = 'llama2-7b'  # the same architecture, for checks without the weights
  config.model.remat_policy = 'save_dots'
  # Under LoRA `param_dtype` is the frozen base's dtype (the adapters train in float32):
  # bf16, as the checkpoint is, holds 6.7B weights in 12.5 GiB instead of 25.
  config.model.param_dtype = 'bfloat16'
  config.lora.enabled = True
  config.lora.rank = 16
  config.lora.alpha = 32.0
  config.lora.dropout = 0.05
  config.lora.targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                         'down_proj']
  config.data.datasets = [{'path': 'data/alpaca_en_demo.json', 'format': 'alpaca'}]
  config.data.template = 'llama2'
  config.data.max_seq_len = 2048
  config.data.eval_size = 0.02
  config.batch_size = 16
  config.optim.learning_rate = 2e-4
  config.optim.warmup_ratio = 0.03
  config.train.num_epochs = 3.0
  config.train.log_every = 10
  return config
