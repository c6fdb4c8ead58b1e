"""Model FLOPs of a training step and MFU, counted the way MaxText and PaLM count them.

Per token, per training step (forward + backward):

- every matmul with a trained kernel of P parameters: 6 P (2 forward, 2 for the input's
  gradient, 2 for the kernel's gradient);
- every matmul with a frozen kernel (LoRA/QLoRA base weights, a frozen LM head): 4 P, since no
  kernel gradient is formed; LoRA's A and B factors are trained matmuls: 6 (r I + r O) each;
- causal self-attention: QK^T and PV are 2 x 2 N H flops per visible key forward, with
  (T + 1) / 2 visible keys on average in a causal row of T (fewer with a sliding window),
  times 3 for the backward (both are activation matmuls, trained or not).

Embedding lookups, norms, activations, softmax, the loss and dequantizing 4-bit weights are not
model FLOPs. Dense attention (no causal saving) is available to compare with XLA's cost
analysis of the `xla` attention, which computes the whole `T x T` square.

MFU = model FLOPs per second / the device's peak dense bf16 FLOP/s (`PEAK_FLOPS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from jaxsft.adapters.targets import target_matcher
from jaxsft.models.config import LlamaConfig

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity), by substring of
# `device.device_kind`; the first match wins, so longer names come first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ('TPU v6', 918e12),    # v6e (Trillium)
    ('TPU v5p', 459e12),
    ('TPU v5', 197e12),    # v5e / v5 lite
    ('TPU v4', 275e12),
    ('H200', 989e12),      # SXM
    ('H100 PCIe', 756e12),
    ('H100', 989e12),      # SXM
    ('A100', 312e12),
    ('L4', 121e12),
    ('A10G', 70e12),
)


def peak_flops_of_kind(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of a `device.device_kind` string, or None where unknown (CPUs)."""
  for name, flops in PEAK_FLOPS:
    if name in device_kind:
      return flops
  return None


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak bf16 FLOP/s of one device (default: the first), or None where unknown (CPUs)."""
  return peak_flops_of_kind((device or jax.devices()[0]).device_kind)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Model FLOPs per token of one training step, by kind."""

  trained_matmuls: float
  frozen_matmuls: float
  attention: float

  @property
  def total(self) -> float:
    return self.trained_matmuls + self.frozen_matmuls + self.attention


def mean_visible_keys(seq_len: int, sliding_window: int | None = None,
                      causal: bool = True) -> float:
  """Average number of keys a query attends to in a row of `seq_len`."""
  if not causal:
    return float(seq_len)
  visible = np.arange(1, seq_len + 1, dtype=np.float64)
  if sliding_window is not None:
    visible = np.minimum(visible, sliding_window)
  return float(visible.mean())


def _layer_kernels(config: LlamaConfig, sparse: bool
                   ) -> dict[tuple[str, ...], tuple[int, int, int]]:
  """Each matmul kernel of a layer one token goes through: path -> (in, out, how many times):
  a sparse layer's router once and `num_experts_per_tok` experts' projections."""
  d, h = config.hidden_size, config.head_dim
  q, kv = config.num_heads * h, config.num_kv_heads * h
  kernels = {('layers', 'self_attn', name, 'kernel'): (i, o, 1) for name, (i, o) in
             (('q_proj', (d, q)), ('k_proj', (d, kv)), ('v_proj', (d, kv)), ('o_proj', (q, d)))}
  if sparse:
    f, k = config.moe_intermediate_size, config.num_experts_per_tok
    kernels[('layers', 'mlp', 'gate', 'kernel')] = (d, config.num_experts, 1)
    kernels[('layers', 'mlp', 'experts', 'gate_up_proj', 'kernel')] = (d, 2 * f, k)
    kernels[('layers', 'mlp', 'experts', 'down_proj', 'kernel')] = (f, d, k)
  else:
    f = config.intermediate_size
    kernels.update({('layers', 'mlp', name, 'kernel'): (i, o, 1) for name, (i, o) in
                    (('gate_proj', (d, f)), ('up_proj', (d, f)), ('down_proj', (f, d)))})
  return kernels


def train_flops_per_token(config: LlamaConfig, seq_len: int, *, lora_rank: int = 0,
                          lora_targets: Sequence[str] | str = (), causal: bool = True
                          ) -> StepFlops:
  """Model FLOPs per token of a training step on rows of `seq_len` tokens.

  `lora_rank` > 0: LoRA (or QLoRA) on the kernels `lora_targets` selects (the same rules as
  `lora.targets`), every base weight frozen; else full fine-tuning. A mixture-of-experts layer
  counts the router and the `num_experts_per_tok` experts a token goes through (with their
  adapters), not the others.
  """
  matches = target_matcher(lora_targets) if lora_rank > 0 else (lambda path: False)
  base = adapters = 0
  for layer in range(config.num_layers):
    for path, (i, o, count) in _layer_kernels(config, config.is_sparse_layer(layer)).items():
      base += count * i * o
      adapters += count * lora_rank * (i + o) if matches(path) else 0
  base += config.hidden_size * config.vocab_size
  if matches(('lm_head', 'kernel')):
    adapters += lora_rank * (config.hidden_size + config.vocab_size)
  if lora_rank > 0:
    trained, frozen = 6.0 * adapters, 4.0 * base
  else:
    trained, frozen = 6.0 * base, 0.0
  keys = mean_visible_keys(seq_len, config.sliding_window, causal)
  attention = 3.0 * 4.0 * config.num_layers * config.num_heads * config.head_dim * keys
  return StepFlops(trained_matmuls=trained, frozen_matmuls=frozen, attention=attention)


def mfu(flops_per_token: float, tokens_per_s: float, num_devices: int = 1,
        peak_flops: float | None = None) -> float | None:
  """Model FLOPs utilization, or None on a device without a known peak."""
  peak = peak_flops if peak_flops is not None else device_peak_flops()
  if not peak:
    return None
  return flops_per_token * tokens_per_s / (peak * num_devices)
