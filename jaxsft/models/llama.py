"""The LLaMA-family decoder as Flax Linen modules.

Parameter paths mirror HF module names (`layers/self_attn/q_proj/kernel`), so LoRA target
regexes written for PEFT (`q_proj`, `down_proj`) select the same projections here. With
`scan_layers` the per-layer parameters are stacked under `layers` with a leading `layers` axis;
without it, or where dense and sparse (mixture-of-experts, `jaxsft.models.moe`) layers mix,
they live under `layers_0 ... layers_{L-1}` (`LlamaConfig.scanned`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxsft.adapters.quant import QuantizedKernel, dequantize
from jaxsft.models.attention import attention
from jaxsft.models.config import LlamaConfig
from jaxsft.models.layers import Projection, RMSNorm, default_kernel_init
from jaxsft.models.moe import SparseMoE
from jaxsft.models.rope import apply_rotary, rotary_embedding
from jaxsft.parallel.context import ContextLayout, context_layout, from_zigzag, to_zigzag

_REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole layer in the backward pass
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_dots_with_batch': jax.checkpoint_policies.checkpoint_dots,
    'save_attention_out': jax.checkpoint_policies.save_only_these_names('attention_out'),
}


def _projection(c: LlamaConfig, deterministic: bool, **kwargs):
  return functools.partial(Projection, dtype=c.dtype, param_dtype=c.param_dtype,
                           lora_scale=c.lora_scale, lora_dropout=c.lora_dropout,
                           deterministic=deterministic, **kwargs)


class Attention(nn.Module):
  config: LlamaConfig
  deterministic: bool = True
  decode: bool = False  # use and extend the KV cache in the `cache` collection
  context: ContextLayout | None = None  # rows split over devices, in zig-zag order

  @nn.compact
  def __call__(self, x_btd, cos_bth, sin_bth, segment_ids_bt):
    c = self.config
    b, t, _ = x_btd.shape
    n, k, h = c.num_heads, c.num_kv_heads, c.head_dim
    proj = _projection(c, self.deterministic)
    q_btnh = proj(n * h, ('embed', 'heads'), c.qkv_bias, name='q_proj')(x_btd).reshape(b, t, n, h)
    k_btkh = proj(k * h, ('embed', 'kv_heads'), c.qkv_bias, name='k_proj')(x_btd).reshape(
        b, t, k, h)
    v_btkh = proj(k * h, ('embed', 'kv_heads'), c.qkv_bias, name='v_proj')(x_btd).reshape(
        b, t, k, h)
    if c.qk_norm:  # Qwen3: each head's queries and keys normalised before the rotation
      norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=c.dtype,
                               param_dtype=c.param_dtype)
      q_btnh = norm(name='q_norm')(q_btnh)
      k_btkh = norm(name='k_norm')(k_btkh)
    q_btnh = nn.with_logical_constraint(apply_rotary(q_btnh, cos_bth, sin_bth),
                                        ('act_batch', 'act_length', 'act_heads', None))
    k_btkh = nn.with_logical_constraint(apply_rotary(k_btkh, cos_bth, sin_bth),
                                        ('act_batch', 'act_length', 'act_kv_heads', None))
    v_btkh = nn.with_logical_constraint(v_btkh, ('act_batch', 'act_length', 'act_kv_heads', None))
    kv_segment_ids, q_offset = segment_ids_bt, 0
    if self.decode:
      k_btkh, v_btkh, kv_segment_ids, q_offset = self._extend_cache(k_btkh, v_btkh,
                                                                    segment_ids_bt)
    # `init` only needs the parameters' shapes, and runs on a token or so, which the fused
    # kernels cannot serve: the reference computes it without a fallback warning.
    implementation = 'xla' if self.is_initializing() else c.attention_implementation
    out_btnh = attention(q_btnh, k_btkh, v_btkh, q_segment_ids=segment_ids_bt,
                         kv_segment_ids=kv_segment_ids, implementation=implementation,
                         q_offset=q_offset, sliding_window=c.sliding_window,
                         context=self.context, segment_sets=c.segment_sets)
    out_btnh = checkpoint_name(out_btnh, 'attention_out')
    return proj(c.hidden_size, ('heads', 'embed'), c.o_bias, name='o_proj')(
        out_btnh.reshape(b, t, n * h))


  def _extend_cache(self, k_btkh, v_btkh, segment_ids_bt):
    """Writes this call's keys/values at the cache index and returns the whole cache.

    The cache is created by `init` on an input of the full length S (prompt + new tokens), so
    its arrays are `[B, S, K, H]`; later calls write their T entries at `cache_index`. Unwritten
    slots have segment 0, which no real query attends to.
    """
    b, t, k, h = k_btkh.shape
    initialized = self.has_variable('cache', 'cached_key')
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, k_btkh.shape, k_btkh.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, v_btkh.shape, v_btkh.dtype)
    cached_segments = self.variable('cache', 'cached_segments', jnp.zeros, segment_ids_bt.shape,
                                    jnp.int32)
    index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
    if not initialized:  # `init` only sizes the cache
      return k_btkh, v_btkh, segment_ids_bt, 0
    start = index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_btkh.astype(
        cached_key.value.dtype), (0, start, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v_btkh.astype(
        cached_value.value.dtype), (0, start, 0, 0))
    cached_segments.value = jax.lax.dynamic_update_slice(
        cached_segments.value, segment_ids_bt.astype(jnp.int32), (0, start))
    index.value = start + t
    return cached_key.value, cached_value.value, cached_segments.value, start


def _mlp(module: nn.Module, x_btd):
  """SwiGLU of `module` (an `MLP` or `_MLPChunk`): its projections are its children."""
  c = module.config
  proj = _projection(c, module.deterministic, use_bias=c.mlp_bias)
  gate_btf = proj(c.intermediate_size, ('embed', 'mlp'), name='gate_proj')(x_btd)
  up_btf = proj(c.intermediate_size, ('embed', 'mlp'), name='up_proj')(x_btd)
  hidden_btf = nn.with_logical_constraint(nn.silu(gate_btf) * up_btf,
                                          ('act_batch', 'act_length', 'act_mlp'))
  return proj(c.hidden_size, ('mlp', 'embed'), name='down_proj')(hidden_btf)


class MLP(nn.Module):
  config: LlamaConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_btd):
    return _mlp(self, x_btd)


class _MLPChunk(nn.Module):
  """The MLP as an `nn.scan` body over chunks of tokens (the carry passes through)."""

  config: LlamaConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, carry, x_btd):
    return carry, _mlp(self, x_btd)


def chunked_mlp(config: LlamaConfig, deterministic: bool, shards: int, x_btd):
  """The layer's MLP (a child named `mlp`), over `config.mlp_chunk_size` tokens of each
  device's part of the rows at a time (ALST's tiled MLP): a long row's `[T, F]` gate/up/hidden
  tensors and their gradients then exist one rematerialized chunk at a time. The MLP works
  token by token, so the chunks' order does not matter; each device keeps its own tokens
  (`shards`: the devices a row's tokens are split over), the last chunk padded with zeros
  where the chunk does not divide them. Same parameters, same paths (`mlp/gate_proj/kernel`)
  as `MLP`: they are broadcast to every chunk."""
  b, t, d = x_btd.shape
  chunk, local = config.mlp_chunk_size, t // shards
  if not chunk or t % shards or local <= chunk:
    return MLP(config, deterministic, name='mlp')(x_btd)
  n = -(-local // chunk)
  x_bsld = x_btd.reshape(b, shards, local, d)
  if n * chunk != local:
    x_bsld = jnp.pad(x_bsld, ((0, 0), (0, 0), (0, n * chunk - local), (0, 0)))
  x_nbtd = x_bsld.reshape(b, shards, n, chunk, d).transpose(2, 0, 1, 3, 4).reshape(
      n, b, shards * chunk, d)
  scan = nn.scan(nn.remat(_MLPChunk), variable_broadcast=('params', 'lora'),
                 split_rngs={'params': False, 'dropout': True}, length=n)
  _, y_nbtd = scan(config, deterministic, name='mlp')(None, x_nbtd)
  y_bsld = y_nbtd.reshape(n, b, shards, chunk, d).transpose(1, 2, 0, 3, 4).reshape(
      b, shards, n * chunk, d)
  return y_bsld[:, :, :local].reshape(b, t, d)


class DecoderLayer(nn.Module):
  """Pre-norm residual block. Returns `(x, None)` so it serves as an `nn.scan` body."""

  config: LlamaConfig
  deterministic: bool = True
  decode: bool = False
  context: ContextLayout | None = None
  sparse: bool = False  # experts (`moe.SparseMoE`) instead of the dense MLP

  @nn.compact
  def __call__(self, x_btd, cos_bth, sin_bth, segment_ids_bt):
    c = self.config
    norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=c.dtype,
                             param_dtype=c.param_dtype)
    x_btd = x_btd + Attention(c, self.deterministic, self.decode, self.context,
                              name='self_attn')(
        norm(name='input_layernorm')(x_btd), cos_bth, sin_bth, segment_ids_bt)
    normed_btd = norm(name='post_attention_layernorm')(x_btd)
    if self.sparse:
      x_btd = x_btd + SparseMoE(c, name='mlp')(normed_btd, segment_ids_bt)
    else:
      x_btd = x_btd + chunked_mlp(c, self.deterministic,
                                  self.context.size if self.context else 1, normed_btd)
    x_btd = nn.with_logical_constraint(x_btd, ('act_batch', 'act_length', 'act_embed'))
    return x_btd, None


def neftune_noise(rng: jax.Array, segment_ids_bt: jnp.ndarray, hidden_size: int,
                  alpha: float) -> jnp.ndarray:
  """NEFTune (Jain et al. 2023): uniform noise in [-1, 1] scaled by alpha / sqrt(L * D), with L
  the length of the example each token belongs to (its packed segment), zero on padding.
  Returns `[B, T, D]` float32."""
  b, t = segment_ids_bt.shape
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  segment_lengths_bs = jnp.zeros((b, t + 1), jnp.float32).at[rows, segment_ids_bt].add(1.0)
  length_bt = jnp.take_along_axis(segment_lengths_bs, segment_ids_bt, axis=1)
  scale_bt = jnp.where(segment_ids_bt > 0, alpha / jnp.sqrt(length_bt * hidden_size), 0.0)
  noise_btd = jax.random.uniform(rng, (b, t, hidden_size), jnp.float32, -1.0, 1.0)
  return noise_btd * scale_bt[..., None]


class Llama(nn.Module):
  """`Llama(config).apply({'params': params}, tokens, positions=..., segment_ids=...)`.

  Args (to `__call__`):
    tokens: `[B, T]` int32 token ids.
    positions: `[B, T]` int32 positions, restarting at 0 per packed segment; default arange.
    segment_ids: `[B, T]` int32, 1.. per packed example, 0 for padding; default all ones.
    neftune_alpha: NEFTune noise on the input embeddings (training only; needs a `neftune` rng).
    return_hidden: skip the LM head and return the final-normed hidden states `[B, T, D]`
      (the fused loss applies the head itself, chunk by chunk; see `jaxsft.train.loss`).
  Returns:
    logits `[B, T, V]` in `config.logits_dtype`.

  `deterministic=False` turns on LoRA dropout (needs a `dropout` rng).
  """

  config: LlamaConfig
  deterministic: bool = True
  decode: bool = False  # KV cache in the `cache` collection (see jaxsft.eval.generate)

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, neftune_alpha: float = 0.0,
               return_hidden: bool = False):
    c = self.config
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)

    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                     embedding_init=nn.with_logical_partitioning(default_kernel_init,
                                                                 ('vocab', 'embed')),
                     name='embed_tokens')
    x_btd = embed(tokens)
    if neftune_alpha:
      x_btd = x_btd + neftune_noise(self.make_rng('neftune'), segment_ids, c.hidden_size,
                                    neftune_alpha).astype(x_btd.dtype)
    x_btd = nn.with_logical_constraint(x_btd, ('act_batch', 'act_length', 'act_embed'))
    # Rows split over a context axis run the layers in zig-zag order (jaxsft.parallel.context):
    # the noise above and everything after the layers see the natural order.
    context = None if self.decode or self.is_initializing() else context_layout(t)
    if context is not None:
      x_btd, positions, segment_ids = (to_zigzag(a, context)
                                       for a in (x_btd, positions, segment_ids))
    cos_bth, sin_bth = rotary_embedding(
        positions, head_dim=c.head_dim, theta=c.rope_theta, rope_scaling=c.rope_scaling,
        max_position_embeddings=c.max_position_embeddings, dtype=c.dtype)

    layer_cls = DecoderLayer
    if c.remat_policy != 'none':
      layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[c.remat_policy],
                           prevent_cse=not c.scanned)
    if c.scanned:
      stack = nn.scan(layer_cls,
                      variable_axes={'params': 0, 'lora': 0, 'cache': 0, 'intermediates': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_btd, _ = stack(c, self.deterministic, self.decode, context, c.is_sparse_layer(0),
                       name='layers')(x_btd, cos_bth, sin_bth, segment_ids)
    else:
      for i in range(c.num_layers):
        x_btd, _ = layer_cls(c, self.deterministic, self.decode, context, c.is_sparse_layer(i),
                             name=f'layers_{i}')(x_btd, cos_bth, sin_bth, segment_ids)
    if context is not None:
      x_btd = from_zigzag(x_btd, context)

    x_btd = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name='norm')(x_btd)
    if return_hidden:
      return x_btd
    if c.tie_word_embeddings:
      logits_btv = embed.attend(x_btd)
    else:
      logits_btv = Projection(c.vocab_size, ('embed', 'vocab'), dtype=c.dtype,
                              param_dtype=c.param_dtype, name='lm_head')(x_btd)
    logits_btv = nn.with_logical_constraint(logits_btv, ('act_batch', 'act_length', 'act_vocab'))
    return logits_btv.astype(c.logits_dtype)


def head_kernel(config: LlamaConfig, variables: dict) -> jnp.ndarray | None:
  """The LM head as one dense `[D, V]` matrix in the compute dtype (the tied embedding
  transposed, a 4-bit head dequantized), or None when LoRA adapts the head itself."""
  if 'lm_head' in variables.get('lora', {}):
    return None
  params = variables['params']
  if config.tie_word_embeddings:
    return jnp.asarray(params['embed_tokens']['embedding'], config.dtype).T
  kernel = params['lm_head']['kernel']
  if isinstance(kernel, QuantizedKernel):
    return dequantize(kernel, config.dtype)
  return jnp.asarray(kernel, config.dtype)
