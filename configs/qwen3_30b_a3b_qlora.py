"""Qwen3-30B-A3B QLoRA: a mixture-of-experts model (48 layers of 128 experts, 8 per token) with
every projection's weights in NF4 (the experts' too), LoRA r=16 on the attention projections.
Fits one 24 GB GPU at 2,048 tokens per row with full remat (`docs/benchmarks.md`).

  jaxsft plan --config configs/qwen3_30b_a3b_qlora.py --config.model.path= \
      --device-memory-gib 24
  jaxsft train --config configs/qwen3_30b_a3b_qlora.py --workdir runs/qwen3-moe \
      --config.model.path=/models/Qwen3-30B-A3B

Adapters on the experts too (`lora.targets` + `gate_up_proj`, `down_proj`: one adapter per
expert, PEFT's `target_parameters`) add 1.2 GiB of weights and 2.4 GiB of Adam state at r=8:
23.9 GiB in all, at the edge of 24 GiB; give them a 40 GiB device. The router trains on the load-balancing loss as well
(`model.router_aux_loss_coef`, the checkpoint's 0.001), which each log line shows as `aux`.

On 8 devices (`--config.mesh.shape='(1,8,1,1)'`, one 2,048-token row each), add
`--config.model.moe_exchange=tokens`: the experts stay on their devices and the tokens travel,
5.37 -> 4.19 GiB per device in the plan (`docs/benchmarks.md`); for rows past ~3,000 tokens a
device, gathering the experts (the default, `weights`) moves and holds less.
"""

from jaxsft.config import default_config


def get_config():
  config = default_config()
  config.model.path = '/models/Qwen3-30B-A3B'
  config.model.preset = 'qwen3-30b-a3b'  # the architecture, for plans without the weights
  config.model.param_dtype = 'bfloat16'  # embeddings, norms and routers; the rest is NF4
  config.model.remat_policy = 'full'
  config.quant.kind = 'nf4'
  config.lora.enabled = True
  config.lora.rank = 16
  config.lora.alpha = 32.0
  config.lora.dropout = 0.0
  config.lora.targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj']
  config.data.datasets = [{'path': 'data/alpaca_en_demo.json', 'format': 'alpaca'}]
  config.data.template = 'qwen3'
  config.data.max_seq_len = 2048
  config.batch_size = 1
  config.optim.learning_rate = 2e-4
  config.train.num_epochs = 1.0
  return config
