"""Batched decoding with a KV cache: one prefill, then one jitted decode step per token.

Prompts are left-padded to a common length (padding is segment 0, which no real token attends
to; positions count from each prompt's first real token), so every row's next token sits in the
same column and the cache advances by one slot per step for the whole batch. The decode loop is
a `lax.while_loop` inside one jit that stops when every row has produced a stop token or
`max_new_tokens`. Sampling: greedy (`temperature == 0`), or temperature with optional top-k and
top-p (nucleus) filtering. Works with any variables `Llama` accepts: plain, LoRA
(`{'params', 'lora'}`) and 4-bit bases.

The prompt and its new tokens must fit the model's positions (`context_length`: HF's
`max_position_embeddings`, or a smaller `max_length` a caller sets, e.g. `--max-seq-len`): the
cache is sized for them, and RoPE positions past the trained context are not answers. A prompt
that leaves no room for a new token is refused (`PromptTooLong`, a `UserError` naming its
length and the limit); one that leaves fewer than `max_new_tokens` gets what fits, with a
warning that says how many new tokens it gets. Prompts are never cut: a silently shortened
prompt answers a different question.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.errors import UserError
from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama
from jaxsft.models.rope import rope_type_of

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How `generate` picks tokens: at most `max_new_tokens` per answer; `temperature` 0 is greedy
  (the first maximum), else softmax sampling at that temperature after `top_k` (0 = off) and
  nucleus `top_p` (1 = off) filtering."""

  max_new_tokens: int = 256
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0            # 0 = off
  top_p: float = 1.0        # 1 = off


class PromptTooLong(UserError):
  """A prompt that leaves no room for a new token in the model's context; `index` is its
  position in the prompts given, `tokens` its length, `limit` the context in tokens."""

  def __init__(self, index: int, tokens: int, limit: int, limit_source: str):
    super().__init__(f'prompt {index + 1} has {tokens:,} tokens, but a prompt and its answer '
                     f'must fit in {limit:,} tokens ({limit_source}); shorten it to fewer than '
                     f'{limit:,} tokens.')
    self.index, self.tokens, self.limit, self.limit_source = index, tokens, limit, limit_source


def context_length(model_config: LlamaConfig) -> int:
  """The positions a model attends over: `max_position_embeddings`, times the factor of
  dynamic NTK scaling, whose whole point is to stretch RoPE past that (the other scalings
  already state their extended context there)."""
  scaling = model_config.rope_scaling or {}
  if rope_type_of(scaling) == 'dynamic':
    return int(model_config.max_position_embeddings * scaling['factor'])
  return int(model_config.max_position_embeddings)


def context_limit(model_config: LlamaConfig, max_length: int | None = None) -> tuple[int, str]:
  """(tokens of prompt + answer at most, what sets that limit in words for a message)."""
  positions = context_length(model_config)
  if max_length and max_length < positions:
    return max_length, '--max-seq-len'
  return positions, 'the model\'s positions: max_position_embeddings in its config.json'


def _filter_logits(logits_bv: jax.Array, top_k: int, top_p: float) -> jax.Array:
  masked = jnp.finfo(logits_bv.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth, masked, logits_bv)
  if top_p < 1.0:
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
    # Keep the smallest set whose probability reaches top_p (always at least one token).
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_bv, cutoff_index, axis=-1)
    logits_bv = jnp.where(logits_bv < cutoff, masked, logits_bv)
  return logits_bv


def _choose(logits_bv: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  if sampling.temperature == 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = _filter_logits(logits_bv / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model_config', 'sampling', 'total_length'))
def _generate(variables, tokens_bp, segments_bp, positions_bp, stop_ids, rng, *,
              model_config: LlamaConfig, sampling: SamplingConfig, total_length: int):
  model = Llama(model_config, decode=True)
  b, p = tokens_bp.shape
  n = sampling.max_new_tokens
  # Size the cache for prompt + new tokens, then prefill the prompt.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((b, total_length), jnp.int32)))['cache']
  cache = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  logits, mutated = model.apply({**variables, 'cache': cache}, tokens_bp, positions_bp,
                                segments_bp, mutable=['cache'])
  last_logits = logits[:, -1].astype(jnp.float32)
  next_position = positions_bp[:, -1] + 1

  def cond(carry):
    step, done = carry[0], carry[3]
    return (step < n) & ~jnp.all(done)

  def body(carry):
    step, cache, last_logits, done, out, position, rng = carry
    rng, key = jax.random.split(rng)
    chosen = _choose(last_logits, key, sampling)
    chosen = jnp.where(done, 0, chosen)
    out = out.at[:, step].set(jnp.where(done, -1, chosen))
    done = done | jnp.isin(chosen, stop_ids)
    logits, mutated = model.apply({**variables, 'cache': cache}, chosen[:, None],
                                  position[:, None], jnp.ones((b, 1), jnp.int32),
                                  mutable=['cache'])
    return (step + 1, mutated['cache'], logits[:, -1].astype(jnp.float32), done, out,
            position + 1, rng)

  carry = (jnp.zeros((), jnp.int32), mutated['cache'], last_logits, jnp.zeros((b,), bool),
           jnp.full((b, n), -1, jnp.int32), next_position, rng)
  return jax.lax.while_loop(cond, body, carry)[4]


def generate(model_config: LlamaConfig, variables: Any, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig | None = None, stop_ids: Sequence[int] = (),
             seed: int = 0, max_length: int | None = None) -> list[list[int]]:
  """New token ids for each prompt (stop tokens excluded). Prompt + new tokens fit
  `context_limit(model_config, max_length)`: a prompt with no room left raises `PromptTooLong`,
  and `sampling.max_new_tokens` shrinks to what the longest prompt leaves (a warning)."""
  sampling = sampling or SamplingConfig()
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError('generate needs at least one prompt, each with at least one token.')
  limit, limit_source = context_limit(model_config, max_length)
  for i, prompt in enumerate(prompts):
    if len(prompt) >= limit:
      raise PromptTooLong(i, len(prompt), limit, limit_source)
  width = max(len(p) for p in prompts)
  if width + sampling.max_new_tokens > limit:
    _LOG.warning('at most %d new tokens (not max_new_tokens %d): the %sprompt has %d tokens, '
                 'and a prompt and its answer must fit in %d (%s).', limit - width,
                 sampling.max_new_tokens, 'longest ' if len(prompts) > 1 else '', width, limit,
                 limit_source)
    sampling = dataclasses.replace(sampling, max_new_tokens=limit - width)
  tokens = np.zeros((len(prompts), width), np.int32)
  segments = np.zeros_like(tokens)
  positions = np.zeros_like(tokens)
  for i, prompt in enumerate(prompts):
    pad = width - len(prompt)
    tokens[i, pad:] = prompt
    segments[i, pad:] = 1
    positions[i, pad:] = np.arange(len(prompt))
  stop = jnp.asarray(list(stop_ids) or [-2], jnp.int32)
  out = np.asarray(_generate(variables, tokens, segments, positions, stop,
                             jax.random.key(seed), model_config=model_config.replace(),
                             sampling=sampling, total_length=width + sampling.max_new_tokens))
  results = []
  for row in out:
    ids = []
    for token in row.tolist():
      if token < 0 or token in stop_ids:
        break
      ids.append(token)
    results.append(ids)
  return results


@functools.partial(jax.jit, static_argnames=('model_config',))
def _next_token_uncached(variables: Any, tokens_bt: jnp.ndarray, at: jnp.ndarray, *,
                         model_config: LlamaConfig) -> jnp.ndarray:
  logits = Llama(model_config).apply(variables, tokens_bt)
  return jnp.argmax(logits[0, at - 1])


def generate_uncached(model_config: LlamaConfig, variables: Any, prompt: Sequence[int],
                      max_new_tokens: int) -> list[int]:
  """Greedy decoding by a full forward pass per token (the reference the cache is timed
  against). One compiled program per `len(prompt) + max_new_tokens`, reused across calls."""
  length = len(prompt) + max_new_tokens
  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(prompt)] = prompt
  out = []
  for i in range(max_new_tokens):
    at = len(prompt) + i
    token = int(_next_token_uncached(variables, tokens, np.int32(at), model_config=model_config))
    tokens[0, at] = token
    out.append(token)
  return out
