"""Building blocks with logical axis names: the linear projection and RMSNorm.

`Projection` is the one place a kernel meets activations, so every kind of kernel (plain, LoRA
adapters from the `lora` collection, quantized pytree nodes) plugs in here and nowhere else.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsft.quant import QuantizedKernel, dequantize

default_kernel_init = nn.initializers.normal(stddev=0.02)


class Projection(nn.Module):
  """`y = x @ kernel (+ bias)` over the last axis. kernel `[in, out]` (HF weight transposed).

  Attributes:
    features: output width.
    axes: logical names of the kernel's `(in, out)` axes, e.g. `('embed', 'mlp')`.
  """

  features: int
  axes: tuple[str, str]
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_scale: float = 1.0
  lora_dropout: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.has_variable('params', 'kernel') and isinstance(
        self.get_variable('params', 'kernel'), QuantizedKernel):
      # 4-bit frozen weights: dense only here, one layer at a time, in the compute dtype.
      kernel = dequantize(self.get_variable('params', 'kernel'), self.dtype)
    else:
      kernel = self.param('kernel', nn.with_logical_partitioning(default_kernel_init, self.axes),
                          (x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = jnp.einsum('...i,io->...o', x, jnp.asarray(kernel, self.dtype))
    if self.has_variable('lora', 'a'):
      # x @ W + scale * (dropout(x) @ A) @ B: the frozen W never enters a weight gradient.
      a_ir = jnp.asarray(self.get_variable('lora', 'a'), self.dtype)
      b_ro = jnp.asarray(self.get_variable('lora', 'b'), self.dtype)
      x_lora = nn.Dropout(self.lora_dropout, deterministic=self.deterministic)(x)
      low_rank = jnp.einsum('...i,ir->...r', x_lora, a_ir)
      y = y + self.lora_scale * jnp.einsum('...r,ro->...o', low_rank, b_ro)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[1:]),
                        (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: normalise in float32, cast back, then scale (HF's order of casts)."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return jnp.asarray(scale, self.dtype) * normed.astype(self.dtype)

