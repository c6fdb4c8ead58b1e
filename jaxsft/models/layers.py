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


@jax.custom_vjp
def low_rank_update(x: jnp.ndarray, a_ir: jnp.ndarray, b_ro: jnp.ndarray) -> jnp.ndarray:
  """`(x @ a) @ b`: x `[..., in]`, a `[in, r]`, b `[r, out]` -> `[..., out]`.

  Autodiff gives the same values; the custom backward exists for speed. Autodiff contracts the
  weight gradients over the `[batch, seq]` axes with the feature-sized operand first, and
  XLA:CPU then writes transposed copies of the `[tokens, features]` activations and gradients.
  Here they are one flattened token axis with the rank-sized operand first (result
  `[r, features]`): the LoRA step of docs/benchmarks.md went from 4.11 s to 3.15 s.
  """
  return jnp.einsum('...r,ro->...o', jnp.einsum('...i,ir->...r', x, a_ir), b_ro)


def _low_rank_update_fwd(x, a_ir, b_ro):
  low_rank = jnp.einsum('...i,ir->...r', x, a_ir)
  return jnp.einsum('...r,ro->...o', low_rank, b_ro), (x, low_rank, a_ir, b_ro)


def _low_rank_update_bwd(residuals, dy):
  x, low_rank, a_ir, b_ro = residuals
  # t: every token position of the batch, flattened.
  x_ti = x.reshape(-1, x.shape[-1])
  low_rank_tr = low_rank.reshape(-1, low_rank.shape[-1])
  dy_to = dy.reshape(-1, dy.shape[-1])
  d_low_rank_tr = jnp.einsum('to,ro->tr', dy_to, b_ro)
  db_ro = jnp.einsum('tr,to->ro', low_rank_tr, dy_to)
  da_ri = jnp.einsum('tr,ti->ri', d_low_rank_tr, x_ti)
  dx = jnp.einsum('tr,ir->ti', d_low_rank_tr, a_ir).reshape(x.shape)
  return dx.astype(x.dtype), da_ri.T.astype(a_ir.dtype), db_ro.astype(b_ro.dtype)


low_rank_update.defvjp(_low_rank_update_fwd, _low_rank_update_bwd)


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
      y = y + self.lora_scale * low_rank_update(x_lora, a_ir, b_ro)
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

