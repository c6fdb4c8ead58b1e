"""Rotary position embeddings in HF's "rotate half" layout, with HF's RoPE scalings.

Every scaling matches transformers 5's `modeling_rope_utils` (its `ROPE_INIT_FUNCTIONS` and the
`dynamic_rope_update` of the rotary modules) to float32 rounding: the inverse frequencies are
constants of the config, computed once per trace in numpy with transformers' float32 steps
(python-float scalars, as there); only `dynamic` depends on the positions, and is computed in
the traced graph. The angles per position are float32, and cos/sin are cast to the activation
dtype last, as transformers does.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models.config import ROPE_TYPES


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
  """HF's rope type of a rope dict (`type` is transformers 4's older spelling)."""
  scaling = rope_scaling or {}
  return scaling.get('rope_type', scaling.get('type', 'default'))


def rope_init(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None,
              max_position_embeddings: int | None = None) -> tuple[np.ndarray, float]:
  """Returns (`[head_dim // 2]` float32 inverse frequencies, attention factor).

  The counterpart of transformers' `ROPE_INIT_FUNCTIONS[rope_type](config)`: the attention factor
  multiplies cos and sin (HF's `attention_scaling`; 1.0 except for `yarn`). For `dynamic` these
  are the frequencies of a sequence within `max_position_embeddings` (plain RoPE); longer ones
  are recomputed from the positions in `rotary_embedding`.
  """
  scaling = rope_scaling or {}
  rope_type = rope_type_of(scaling)
  if scaling.get('partial_rotary_factor', 1.0) != 1.0:
    raise ValueError(f'rope_scaling has partial_rotary_factor={scaling["partial_rotary_factor"]}; '
                     'jaxsft rotates the whole head (partial_rotary_factor 1.0).')
  if rope_type == 'default':
    return _default_frequencies(head_dim, theta), 1.0
  if rope_type == 'linear':
    return (_default_frequencies(head_dim, theta) / scaling['factor']).astype(np.float32), 1.0
  if rope_type == 'llama3':
    return _llama3_scaling(_default_frequencies(head_dim, theta), scaling), 1.0
  if rope_type == 'yarn':
    return _yarn(head_dim, theta, scaling, _required_context(max_position_embeddings, 'yarn'))
  if rope_type == 'dynamic':
    # HF's init runs with seq_len = max_position_embeddings: the base is scaled by exactly 1 in
    # float64 (kept, to round as HF does), then used as a float32 scalar.
    context = _required_context(max_position_embeddings, 'dynamic')
    factor = scaling['factor']
    base = theta * ((factor * context / context) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _default_frequencies(head_dim, base), 1.0
  raise ValueError(f'rope_type {rope_type!r} is not implemented; supported: {ROPE_TYPES}.')


def inverse_frequencies(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None,
                        max_position_embeddings: int | None = None) -> np.ndarray:
  """Returns `[head_dim // 2]` float32 inverse frequencies after the configured scaling (for
  `dynamic`, those of sequences within `max_position_embeddings`)."""
  return rope_init(head_dim, theta, rope_scaling, max_position_embeddings)[0]


def _required_context(max_position_embeddings: int | None, rope_type: str) -> int:
  if max_position_embeddings is None:
    raise ValueError(f'rope_type {rope_type!r} needs max_position_embeddings.')
  return max_position_embeddings


def _base_powers(head_dim: int, base: float) -> np.ndarray:
  """`[head_dim // 2]` float32 `base ** (2i / head_dim)`, as transformers' float32 torch.pow.

  torch raises the float32 base to the float32 exponents nearly correctly rounded; float32 numpy
  pow is off by an ulp on about a fifth of them, float64 pow rounded to float32 on well under 1%.
  """
  exponents = np.arange(0, head_dim, 2).astype(np.float32) / head_dim
  return (np.float64(np.float32(base)) ** exponents.astype(np.float64)).astype(np.float32)


def _default_frequencies(head_dim: int, base: float) -> np.ndarray:
  return (1.0 / _base_powers(head_dim, base)).astype(np.float32)


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


def _yarn_attention_factor(scaling: dict[str, Any], factor: float) -> float:
  """YaRN's cos/sin scale: `attention_factor` if given, else `0.1 ln(factor) + 1`, or with
  DeepSeek's `mscale`/`mscale_all_dim` (both set and nonzero) the ratio of two such terms."""
  if scaling.get('attention_factor') is not None:
    return scaling['attention_factor']

  def get_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

  mscale, mscale_all_dim = scaling.get('mscale'), scaling.get('mscale_all_dim')
  if mscale and mscale_all_dim:
    return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
  return get_mscale(factor)


def _yarn(head_dim: int, theta: float, scaling: dict[str, Any], max_position_embeddings: int
          ) -> tuple[np.ndarray, float]:
  """YaRN: per frequency, a blend of interpolation (`/ factor`) for the dimensions that rotate
  fewer than `beta_slow` times over the original context and extrapolation (unchanged) for those
  that rotate more than `beta_fast` times, with a linear ramp between.

  As transformers 5: `original_max_position_embeddings` missing means the config's
  `max_position_embeddings` (its `standardize_rope_params`); `factor` missing or None means
  `max_position_embeddings / original_max_position_embeddings` (DeepSeek-V3's convention);
  `beta_fast`/`beta_slow` missing or 0 mean 32/1; `truncate` (default True) rounds the ramp's
  ends outwards to whole dimensions.
  """
  original = scaling.get('original_max_position_embeddings') or max_position_embeddings
  factor = scaling.get('factor')
  if factor is None:
    factor = max_position_embeddings / original
  attention_factor = _yarn_attention_factor(scaling, factor)
  beta_fast = scaling.get('beta_fast') or 32
  beta_slow = scaling.get('beta_slow') or 1

  def correction_dim(num_rotations):
    # The dimension whose wavelength fits `num_rotations` times into the original context.
    return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if scaling.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp

  pos_freqs = _base_powers(head_dim, theta)
  extrapolation = 1.0 / pos_freqs
  interpolation = 1.0 / (factor * pos_freqs)
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_share = 1 - ramp
  inv_freq = interpolation * (1 - extrapolation_share) + extrapolation * extrapolation_share
  return inv_freq.astype(np.float32), attention_factor


def _dynamic_frequencies(positions_bt: jnp.ndarray, head_dim: int, theta: float,
                         scaling: dict[str, Any], max_position_embeddings: int,
                         short_inv_freq: np.ndarray) -> jnp.ndarray:
  """Dynamic NTK's traced `[head_dim // 2]` float32 frequencies for a forward over `positions_bt`.

  transformers' `dynamic_rope_update` takes `seq_len = max(position_ids) + 1` over the whole
  batch; beyond `max_position_embeddings` it raises the base to
  `theta * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (d / (d - 2))`, in
  float32 (a 0-dim tensor there). A `jnp.where` stands for its Python branch.
  """
  factor = scaling['factor']
  seq_len = jnp.max(positions_bt).astype(jnp.int32) + 1
  # As transformers' torch.maximum; it also keeps the unused branch's log finite within context.
  length = jnp.maximum(seq_len, max_position_embeddings).astype(jnp.float32)
  stretch = (np.float32(factor) * length / np.float32(max_position_embeddings)
             - np.float32(factor - 1))
  # torch raises the float32 stretch to the float64 exponent d / (d - 2) in float64. A float32
  # exponent is off by ~3e-8 and moves the base by an ulp almost every time; as
  # `s + s * expm1((d / (d - 2) - 1) ln s)` the exponent's rounding error scales with the small
  # 2 / (d - 2), and the base rounds as torch's in most cases (an ulp off in the rest).
  excess = np.float32(head_dim / (head_dim - 2) - 1)
  base = np.float32(theta) * (stretch + stretch * jnp.expm1(excess * jnp.log(stretch)))
  exponents = np.arange(0, head_dim, 2).astype(np.float32) / head_dim
  long_inv_freq = 1.0 / base ** jnp.asarray(exponents)
  return jnp.where(seq_len > max_position_embeddings, long_inv_freq, jnp.asarray(short_inv_freq))


def rotary_angles(positions_bt: jnp.ndarray, inv_freq: np.ndarray | jnp.ndarray, dtype: Any,
                  attention_factor: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Returns `(cos_bth, sin_bth)` of shape `[B, T, head_dim]` in `dtype`, both scaled by
  `attention_factor` in float32 before the cast (HF's `attention_scaling`)."""
  angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if attention_factor != 1.0:
    cos, sin = cos * np.float32(attention_factor), sin * np.float32(attention_factor)
  return cos.astype(dtype), sin.astype(dtype)


def rotary_frequencies(positions_bt: jnp.ndarray, *, head_dim: int, theta: float,
                       rope_scaling: dict[str, Any] | None, max_position_embeddings: int
                       ) -> tuple[np.ndarray | jnp.ndarray, float]:
  """(`[head_dim // 2]` float32 inverse frequencies, attention factor) of one forward over the
  `[B, T]` int positions: numpy constants, except `dynamic`'s (traced: they follow the positions).
  """
  scaling = rope_scaling or {}
  inv_freq, attention_factor = rope_init(head_dim, theta, scaling, max_position_embeddings)
  if rope_type_of(scaling) == 'dynamic':
    inv_freq = _dynamic_frequencies(positions_bt, head_dim, theta, scaling,
                                    max_position_embeddings, inv_freq)
  return inv_freq, attention_factor


def rotary_embedding(positions_bt: jnp.ndarray, *, head_dim: int, theta: float,
                     rope_scaling: dict[str, Any] | None, max_position_embeddings: int,
                     dtype: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Returns `(cos_bth, sin_bth)` `[B, T, head_dim]` in `dtype` for `[B, T]` int positions,
  under the configured RoPE scaling (`rope_scaling`: HF's rope dict without `rope_theta`).

  `dynamic` reproduces one transformers forward over these positions: the frequencies follow
  `max(positions_bt) + 1` over the whole batch (jit-safe, no retrace per length). Hence:
  - packed rows: the longest segment anywhere in the batch (positions restart per segment) sets
    the frequencies of every segment, so a sequence's logits depend on what it is batched with,
    exactly as in transformers given the same `position_ids`;
  - KV-cache decoding: each step sees only its new positions, so keys cached earlier keep the
    rotation of their own step while new tokens use the frequencies of `position + 1`, as in
    transformers' generate from a fresh model. transformers' module is stateful (it keeps the
    largest length seen until a sequence within the original context resets it); this function
    is not, so a later forward shorter than an earlier one (but beyond the original context)
    matches a fresh transformers model, not one that ran the longer forward first.
  """
  inv_freq, attention_factor = rotary_frequencies(
      positions_bt, head_dim=head_dim, theta=theta, rope_scaling=rope_scaling,
      max_position_embeddings=max_position_embeddings)
  return rotary_angles(positions_bt, inv_freq, dtype, attention_factor)


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
