"""Rotary position embeddings in HF's "rotate half" layout.

The inverse frequencies are computed once in float64 numpy (they are constants of the config),
the angles per position in float32, exactly as transformers does before casting cos/sin to the
activation dtype.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None
                        ) -> np.ndarray:
  """Returns `[head_dim // 2]` float32 inverse frequencies after the configured scaling."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                               / head_dim))
  inv_freq = inv_freq.astype(np.float32)
  scaling = rope_scaling or {}
  rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
  if rope_type == 'default':
    return inv_freq
  if rope_type == 'linear':
    return (inv_freq / np.float32(scaling['factor'])).astype(np.float32)
  if rope_type == 'llama3':
    return _llama3_scaling(inv_freq, scaling)
  raise ValueError(f'rope_type {rope_type!r} is not implemented (supported: default, linear, '
                   'llama3).')


def _llama3_scaling(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
  """LLaMA-3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth blend
  between `low_freq_factor` and `high_freq_factor`."""
  factor = scaling['factor']
  low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
  old_context = scaling['original_max_position_embeddings']
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
  return np.where(is_medium, blended, scaled).astype(np.float32)


def rotary_angles(positions_bt: jnp.ndarray, inv_freq: np.ndarray, dtype: Any
                  ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Returns `(cos_bth, sin_bth)` of shape `[B, T, head_dim]` in `dtype`."""
  angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


@jax.custom_vjp
def apply_rotary(x_btnh: jnp.ndarray, cos_bth: jnp.ndarray, sin_bth: jnp.ndarray) -> jnp.ndarray:
  """Rotates `[B, T, heads, head_dim]` by the per-position angles (rotate-half layout).

  The backward is the inverse rotation, the same function with `-sin` (cos and sin are
  constants of the positions: no gradient). Autodiff's form (pads, slices and sums, each
  rounded to bf16 on XLA:CPU) cost about 9 ms per call on the CPU benchmark.
  """
  half = x_btnh.shape[-1] // 2
  rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
  return x_btnh * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]


def _apply_rotary_fwd(x_btnh, cos_bth, sin_bth):
  return apply_rotary(x_btnh, cos_bth, sin_bth), (cos_bth, sin_bth)


def _apply_rotary_bwd(residuals, dy_btnh):
  cos_bth, sin_bth = residuals
  return (apply_rotary(dy_btnh, cos_bth, -sin_bth), jnp.zeros_like(cos_bth),
          jnp.zeros_like(sin_bth))


apply_rotary.defvjp(_apply_rotary_fwd, _apply_rotary_bwd)
