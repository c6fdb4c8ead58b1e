"""Model FLOPs accounting: by hand on a small config, and against XLA's own count of a step."""

import jax
import jax.numpy as jnp
import pytest

from jaxsft.config import default_config
from jaxsft.models import LlamaConfig
from jaxsft.train import flops, optim
from jaxsft.train.model_source import model_config_from
from jaxsft.train.run import run_settings
from jaxsft.train.state import abstract_train_state
from jaxsft.train.step import StepSettings, make_train_step

SMALL = dict(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_layers=2,
             num_heads=8, num_kv_heads=4)
# Qwen3's shape: head_dim 128 where hidden / heads says 64, per-head q/k norms.
QWEN3_SMALL = dict(SMALL, head_dim=128, qk_norm=True, model_type='qwen3')


def test_flops_by_hand():
  config = LlamaConfig(**SMALL)
  d, f, v, kv = 512, 1024, 1000, 4 * 64
  per_layer = d * d + 2 * d * kv + d * d + 3 * d * f
  base = 2 * per_layer + d * v
  attention = 3 * 4 * 2 * 8 * 64 * (128 + 1) / 2
  full = flops.train_flops_per_token(config, 128)
  assert full.trained_matmuls == 6 * base and full.frozen_matmuls == 0
  assert full.attention == pytest.approx(attention)
  lora = flops.train_flops_per_token(config, 128, lora_rank=8, lora_targets=['q_proj', 'v_proj'])
  assert lora.frozen_matmuls == 4 * base
  assert lora.trained_matmuls == 6 * 2 * 8 * ((d + d) + (d + kv))
  assert lora.attention == full.attention
  everything = flops.train_flops_per_token(config, 128, lora_rank=8, lora_targets='all-linear')
  assert everything.trained_matmuls == 6 * 2 * 8 * sum(
      i + o for i, o in ((d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)))
  windowed = flops.train_flops_per_token(LlamaConfig(**SMALL, sliding_window=16), 128)
  assert windowed.attention == pytest.approx(3 * 4 * 2 * 8 * 64 * (16 * 128 - 120) / 128)


def test_peak_flops_table():
  class Device:
    def __init__(self, kind):
      self.device_kind = kind
  assert flops.device_peak_flops(Device('NVIDIA H100 80GB HBM3')) == 989e12
  assert flops.device_peak_flops(Device('NVIDIA H100 PCIe')) == 756e12
  assert flops.device_peak_flops(Device('TPU v5 lite')) == 197e12
  assert flops.device_peak_flops(Device('TPU v5p')) == 459e12
  assert flops.device_peak_flops(Device('cpu')) is None
  assert flops.mfu(1e9, 100.0, peak_flops=1e12) == pytest.approx(0.1)


@pytest.mark.parametrize('architecture,lora', [(SMALL, False), (SMALL, True),
                                               (QWEN3_SMALL, False)])
def test_flops_match_xla_cost_analysis(architecture, lora):
  """XLA counts every flop of the step (dense `xla` attention, whole logits); ours counts
  matmuls only. They agree within a few percent: XLA adds norms, softmax and the optimizer, and
  undercounts the GQA attention backward's dot with two contracting dims (2.55x the forward
  where the four backward matmuls make 3x)."""
  config = default_config()
  config.model.architecture = architecture
  config.model.dtype = 'float32'
  config.model.attention_implementation = 'xla'
  config.model.scan_layers = False  # XLA's cost analysis counts a loop body once
  config.train.loss_chunk_size = 0
  config.lora.enabled = lora
  config.lora.rank = 16
  config.lora.targets = ['all-linear']
  settings = run_settings(config)
  model_config, _ = model_config_from(settings.model, settings.lora)
  optimizer, schedule = optim.make_optimizer(settings.optim, 10)
  state = abstract_train_state(model_config, optimizer, lora=settings.lora, quant=settings.quant)
  rows, seq = 2, 256
  batch = {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32) for k in
           ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')}
  xla = jax.jit(make_train_step(model_config, optimizer, StepSettings(loss_chunk_size=0),
                                schedule)).lower(state, batch).cost_analysis()
  ours = flops.train_flops_per_token(model_config, seq, lora_rank=16 if lora else 0,
                                     lora_targets='all-linear', causal=False)
  ratio = ours.total * rows * seq / xla['flops']
  assert 0.95 <= ratio <= 1.05, ratio
