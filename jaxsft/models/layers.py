"""Building blocks with logical axis names: the linear projection and RMSNorm.

`Projection` is the one place a kernel meets activations, so every kind of kernel (plain, LoRA
or DoRA adapters from the `lora` collection, quantized pytree nodes) plugs in here and nowhere
else.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsft.adapters.lora import dora_norm
from jaxsft.adapters.quant import QuantizedKernel, dequantize

default_kernel_init = nn.initializers.normal(stddev=0.02)


def accumulation_dtype(operand_dtype) -> Any:
  """The `preferred_element_type` for a dot of `operand_dtype` operands: float32 for bf16 on
  CPU, else None (the compiler's default).

  XLA:CPU has a native bf16 x bf16 -> f32 matmul kernel (370-410 GFLOP/s on the 2-core Zen 4
  of docs/benchmarks.md) but computes a bf16 -> bf16 dot as an f32 dot on upcast operands
  (180-195 GFLOP/s, no faster than float32). On GPUs and TPUs the plain dot is what the
  compilers tune for, and the dots there stay as they were.
  """
  if jnp.dtype(operand_dtype) == jnp.bfloat16 and jax.default_backend() == 'cpu':
    return jnp.float32
  return None


def dot(spec: str, a: jnp.ndarray, b: jnp.ndarray, dtype: Any = None) -> jnp.ndarray:
  """`jnp.einsum(spec, a, b)` as `dtype` (default: a's), accumulated per `accumulation_dtype`."""
  dtype = a.dtype if dtype is None else dtype
  return jnp.einsum(spec, a, b, preferred_element_type=accumulation_dtype(a.dtype)).astype(dtype)


@jax.custom_vjp
def dense(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """`x @ kernel` in x's dtype: x `[..., in]`, kernel `[in, out]` (any float dtype, cast to x's)
  -> `[..., out]`. The kernel's gradient comes back in the kernel's own dtype.

  Autodiff of a float32-accumulating dot would run its two backward dots on a float32
  cotangent and so on XLA:CPU's slow path; this backward keeps every dot bf16 x bf16 -> f32.
  `Projection` uses it where `accumulation_dtype` asks for float32, the plain einsum elsewhere.
  """
  return dot('...i,io->...o', x, kernel.astype(x.dtype))


def _dense_fwd(x, kernel):
  return dense(x, kernel), (x, kernel)


def _dense_bwd(residuals, dy):
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  dx = dot('...o,io->...i', dy, kernel.astype(x.dtype))
  dkernel = dot('...i,...o->io', x, dy, dtype=kernel.dtype)
  return dx, dkernel


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def low_rank_update(x: jnp.ndarray, a_ir: jnp.ndarray, b_ro: jnp.ndarray) -> jnp.ndarray:
  """`(x @ a) @ b` in x's dtype: x `[..., in]`, a `[in, r]`, b `[r, out]` -> `[..., out]`.

  a and b may be kept in another dtype (float32 adapters under bf16 compute): they are cast to
  x's dtype here and their gradients come back in their own dtypes, accumulated per
  `accumulation_dtype`.

  Autodiff gives the same values; the custom backward exists for speed. Autodiff contracts the
  weight gradients over the `[batch, seq]` axes with the feature-sized operand first, and
  XLA:CPU then writes transposed copies of the `[tokens, features]` activations and gradients.
  Here they are one flattened token axis with the rank-sized operand first (result
  `[r, features]`): the LoRA step of docs/benchmarks.md went from 4.11 s to 3.15 s.
  """
  return _low_rank_update_fwd(x, a_ir, b_ro)[0]


def _low_rank_update_fwd(x, a_ir, b_ro):
  low_rank = dot('...i,ir->...r', x, a_ir.astype(x.dtype))
  return dot('...r,ro->...o', low_rank, b_ro.astype(x.dtype)), (x, low_rank, a_ir, b_ro)


def _low_rank_update_bwd(residuals, dy):
  x, low_rank, a_ir, b_ro = residuals
  # t: every token position of the batch, flattened.
  x_ti = x.reshape(-1, x.shape[-1])
  low_rank_tr = low_rank.reshape(-1, low_rank.shape[-1])
  dy_to = dy.astype(x.dtype).reshape(-1, dy.shape[-1])
  d_low_rank_tr = dot('to,ro->tr', dy_to, b_ro.astype(x.dtype))
  db_ro = dot('tr,to->ro', low_rank_tr, dy_to, dtype=b_ro.dtype)
  da_ri = dot('tr,ti->ri', d_low_rank_tr, x_ti, dtype=a_ir.dtype)
  dx = dot('tr,ir->ti', d_low_rank_tr, a_ir.astype(x.dtype)).reshape(x.shape)
  return dx, da_ri.T, db_ro


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
  lora_scale: float | None = None
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

    def base(x):
      if accumulation_dtype(self.dtype) is None:
        return jnp.einsum('...i,io->...o', x, jnp.asarray(kernel, self.dtype))
      return dense(x, jnp.asarray(kernel))

    y = base(x)
    if self.has_variable('lora', 'a'):
      # x @ W + scale * (dropout(x) @ A) @ B: the frozen W never enters a weight gradient.
      if self.lora_scale is None:
        raise ValueError('the variables hold LoRA adapters (a "lora" collection) but the model '
                         'has no LoRA scale; build it with LlamaConfig.with_lora(LoraSettings('
                         '...)) so the scale is the adapters\' alpha / r.')
      a_ir = jnp.asarray(self.get_variable('lora', 'a'))
      b_ro = jnp.asarray(self.get_variable('lora', 'b'))
      x_lora = nn.Dropout(self.lora_dropout, deterministic=self.deterministic)(x)
      update = low_rank_update(x_lora, a_ir, b_ro)
      if self.has_variable('lora', 'magnitude'):
        y = self._dora(y, base, x_lora, kernel, a_ir, b_ro, update)
      else:
        y = y + self.lora_scale * update
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[1:]),
                        (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y

  def _dora(self, y, base, x_lora, kernel, a_ir, b_ro, update):
    """DoRA's output as PEFT computes it: `y + (g - 1) * dropout(x) @ W + g * scale * update`,
    `g = magnitude / ||W + scale * A @ B||` `[out]` (float32) with the norm a constant in the
    backward (the paper's section 4.3, PEFT's `detach`): A and B get gradients only through
    `update`. Without dropout this is `g * (x @ W + scale * update)`; with it, the dropped
    input reaches W only through the `g - 1` term, so the frozen matmul runs twice."""
    norm = jax.lax.stop_gradient(dora_norm(jnp.asarray(kernel), a_ir, b_ro, self.lora_scale))
    g = jnp.asarray(self.get_variable('lora', 'magnitude'), jnp.float32) / norm
    dropped = self.lora_dropout > 0 and not self.deterministic
    y_dropped = base(x_lora) if dropped else y
    dora = (g - 1) * y_dropped.astype(jnp.float32) + (
        g * self.lora_scale) * update.astype(jnp.float32)
    return (y.astype(jnp.float32) + dora).astype(self.dtype)


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: normalise in float32, cast back, then scale (HF's order of casts). A scale
  in the `lora` collection (`lora.modules_to_save`) replaces the frozen one."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    if self.has_variable('lora', 'scale'):
      scale = self.get_variable('lora', 'scale')
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return jnp.asarray(scale, self.dtype) * normed.astype(self.dtype)

