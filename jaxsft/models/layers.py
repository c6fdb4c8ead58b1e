"""Building blocks with logical axis names: the linear projection and RMSNorm.

`Projection` is the one place a kernel meets activations, so later kinds of kernel (LoRA
adapters in the `lora` collection, quantized pytree nodes) plug in here and nowhere else.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param('kernel', nn.with_logical_partitioning(default_kernel_init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.einsum('...i,io->...o', x.astype(self.dtype), jnp.asarray(kernel, self.dtype))
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

