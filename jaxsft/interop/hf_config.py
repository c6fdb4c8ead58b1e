"""HF `config.json` <-> `LlamaConfig`, and finding an HF checkpoint folder.

`config_from_hf` reads the `config.json` of transformers 4 and 5 for the LLaMA family (LLaMA
1/2/3, Mistral, Qwen2, Qwen3, and the mixture-of-experts Qwen3-MoE and Mixtral),
`config_to_hf` writes one transformers loads; `resolve_checkpoint_dir`
takes a local folder or fetches a hub id into the HF cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxsft.errors import UserError
from jaxsft.models.config import LlamaConfig

SUPPORTED_MODEL_TYPES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                         'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
                         'qwen3_moe': 'Qwen3MoeForCausalLM', 'mixtral': 'MixtralForCausalLM'}
# Families whose q/k/v/o biases follow one `attention_bias` flag (Qwen2 always has q/k/v biases
# and no o bias); the Qwen families' sliding window follows `use_sliding_window`; Mixtral's as
# Mistral's. Qwen3 and Qwen3-MoE have per-head q/k norms.
_ONE_ATTENTION_BIAS = ('llama', 'qwen3', 'qwen3_moe')
_QWEN = ('qwen2', 'qwen3', 'qwen3_moe')
_MISTRAL = ('mistral', 'mixtral')
_QK_NORM = ('qwen3', 'qwen3_moe')
# transformers' defaults where a config.json leaves a mixture-of-experts field out.
_MOE_DEFAULTS = {'qwen3_moe': dict(num_experts_per_tok=8, norm_topk_prob=False,
                                   router_aux_loss_coef=0.001),
                 'mixtral': dict(num_experts_per_tok=2, norm_topk_prob=True,
                                 router_aux_loss_coef=0.001)}


class _UnsupportedConfig(UserError, NotImplementedError):
  """A config.json jaxsft cannot run as is (a `NotImplementedError` too, as it once was)."""


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
  """Maps an HF `config.json` dict (transformers 4 or 5) to a `LlamaConfig`.

  `overrides` set `LlamaConfig` fields the file does not hold (`scan_layers`, `dtype`, ...).
  """
  model_type = hf.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UserError(f'config.json has model_type={model_type!r} (architectures='
                    f'{hf.get("architectures")}); jaxsft supports '
                    f'{sorted(SUPPORTED_MODEL_TYPES)}.')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise UserError(f'config.json has hidden_act={hf["hidden_act"]!r}; LLaMA-family models in '
                    'jaxsft use silu (SwiGLU).')

  # transformers 5 nests theta and scaling in `rope_parameters`; 4 has `rope_theta` and
  # `rope_scaling` (whose type key was once `type`).
  rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  rope_theta = rope.pop('rope_theta', hf.get('rope_theta', 10000.0))
  if 'type' in rope and 'rope_type' not in rope:
    rope['rope_type'] = rope.pop('type')
  rope.pop('type', None)
  rope_scaling = rope if rope.get('rope_type', 'default') != 'default' else None

  num_layers = hf['num_hidden_layers']
  sliding_window = _sliding_window(hf, model_type, num_layers)
  attention_bias = bool(hf.get('attention_bias', False))
  qkv_bias = True if model_type == 'qwen2' else attention_bias
  num_heads = hf['num_attention_heads']
  fields = dict(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      intermediate_size=hf['intermediate_size'], num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=hf.get('num_key_value_heads') or num_heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // num_heads,
      rms_norm_eps=hf.get('rms_norm_eps', 1e-6), rope_theta=float(rope_theta),
      rope_scaling=rope_scaling,
      max_position_embeddings=hf.get('max_position_embeddings', 4096),
      tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
      qkv_bias=qkv_bias, o_bias=attention_bias and model_type in _ONE_ATTENTION_BIAS,
      mlp_bias=bool(hf.get('mlp_bias', False)), qk_norm=model_type in _QK_NORM,
      sliding_window=sliding_window, **_moe_fields(hf, model_type),
      model_type=model_type, bos_token_id=hf.get('bos_token_id'),
      eos_token_id=hf.get('eos_token_id'), pad_token_id=hf.get('pad_token_id'))
  fields.update(overrides)
  try:
    return LlamaConfig(**fields)
  except ValueError as error:  # a combination LlamaConfig refuses (heads per KV group, rope)
    if isinstance(error, UserError):
      raise
    raise UserError(f'config.json: {error}') from None


def _moe_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
  """The mixture-of-experts fields of `LlamaConfig` from a Qwen3-MoE or Mixtral config.json
  (none for dense families)."""
  if model_type not in _MOE_DEFAULTS:
    return {}
  defaults = _MOE_DEFAULTS[model_type]
  num_experts = hf.get('num_experts') or hf.get('num_local_experts')
  if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
    raise UserError(f'config.json of a {model_type} model has num_experts='
                    f'{num_experts!r} (num_local_experts); it needs the number of experts, '
                    'a positive integer: use the config.json saved with the weights.')
  if hf.get('router_jitter_noise'):
    raise _UnsupportedConfig(
        f'config.json has router_jitter_noise={hf["router_jitter_noise"]}; jaxsft does not '
        'jitter the router\'s inputs in training. Set it to 0 (Mixtral ships with 0).')
  if model_type == 'mixtral':  # the experts are `intermediate_size` wide; every layer sparse
    return dict(num_experts=num_experts, moe_intermediate_size=hf['intermediate_size'],
                num_experts_per_tok=hf.get('num_experts_per_tok',
                                           defaults['num_experts_per_tok']),
                norm_topk_prob=True, router_aux_loss_coef=float(
                    hf.get('router_aux_loss_coef', defaults['router_aux_loss_coef'])))
  return dict(num_experts=num_experts,
              moe_intermediate_size=hf.get('moe_intermediate_size') or hf['intermediate_size'],
              num_experts_per_tok=hf.get('num_experts_per_tok', defaults['num_experts_per_tok']),
              norm_topk_prob=bool(hf.get('norm_topk_prob', defaults['norm_topk_prob'])),
              decoder_sparse_step=hf.get('decoder_sparse_step', 1),
              mlp_only_layers=tuple(hf.get('mlp_only_layers') or ()),
              router_aux_loss_coef=float(hf.get('router_aux_loss_coef',
                                                defaults['router_aux_loss_coef'])))


def _sliding_window(hf: Mapping[str, Any], model_type: str, num_layers: int) -> int | None:
  window = hf.get('sliding_window')
  if model_type == 'llama' or window is None:
    return None
  if model_type in _MISTRAL:
    return int(window)
  # Qwen2/3: a window only where `use_sliding_window`, and then only from `max_window_layers` on.
  layer_types = hf.get('layer_types')
  if layer_types is None:
    if not hf.get('use_sliding_window', False):
      return None
    start = hf.get('max_window_layers', num_layers)
    layer_types = ['sliding_attention' if i >= start else 'full_attention'
                   for i in range(num_layers)]
  kinds = set(layer_types)
  if kinds == {'full_attention'}:
    return None
  if kinds == {'sliding_attention'}:
    return int(window)
  raise _UnsupportedConfig(
      'config.json mixes sliding-window and full-attention layers (layer_types='
      f'{layer_types}); jaxsft applies one attention pattern to every layer. Set '
      '"use_sliding_window": false (what Qwen2 checkpoints ship with) to train with full '
      'attention.')


def config_to_hf(config: LlamaConfig, dtype: Any = jnp.bfloat16) -> dict[str, Any]:
  """An HF `config.json` dict that transformers 4 and 5 both read."""
  c = config
  rope_parameters = {'rope_type': 'default', **(c.rope_scaling or {}), 'rope_theta': c.rope_theta}
  rope_scaling = dict(c.rope_scaling) if c.rope_scaling else None
  dtype_name = jnp.dtype(dtype).name
  hf = {
      'architectures': [SUPPORTED_MODEL_TYPES[c.model_type]], 'model_type': c.model_type,
      'vocab_size': c.vocab_size, 'hidden_size': c.hidden_size,
      'intermediate_size': c.intermediate_size, 'num_hidden_layers': c.num_layers,
      'num_attention_heads': c.num_heads, 'num_key_value_heads': c.num_kv_heads,
      'head_dim': c.head_dim, 'hidden_act': 'silu', 'rms_norm_eps': c.rms_norm_eps,
      'max_position_embeddings': c.max_position_embeddings,
      'tie_word_embeddings': c.tie_word_embeddings, 'rope_theta': c.rope_theta,
      'rope_scaling': rope_scaling, 'rope_parameters': rope_parameters,
      'bos_token_id': c.bos_token_id, 'eos_token_id': c.eos_token_id,
      'pad_token_id': c.pad_token_id, 'torch_dtype': dtype_name, 'dtype': dtype_name,
      'use_cache': True, 'initializer_range': 0.02, 'attention_dropout': 0.0,
  }
  if c.qk_norm != (c.model_type in _QK_NORM):
    raise UserError(f'model_type={c.model_type!r} with qk_norm={c.qk_norm}: transformers has '
                    'per-head q/k norms in Qwen3 and Qwen3-MoE only.')
  if bool(c.num_experts) != (c.model_type in _MOE_DEFAULTS):
    raise UserError(f'model_type={c.model_type!r} with num_experts={c.num_experts}: '
                    'transformers has experts in Qwen3-MoE and Mixtral only.')
  if c.model_type == 'qwen3_moe':
    hf.update(num_experts=c.num_experts, num_local_experts=c.num_experts,
              num_experts_per_tok=c.num_experts_per_tok,
              moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
              decoder_sparse_step=c.decoder_sparse_step,
              mlp_only_layers=list(c.mlp_only_layers),
              router_aux_loss_coef=c.router_aux_loss_coef, output_router_logits=False)
  elif c.model_type == 'mixtral':
    if (not c.norm_topk_prob or c.moe_intermediate_size != c.intermediate_size
        or not all(c.sparse_layers)):
      raise UserError('Mixtral in transformers renormalizes the top-k weights, has experts '
                      'of intermediate_size in every layer; this config differs.')
    hf.update(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
              router_aux_loss_coef=c.router_aux_loss_coef, router_jitter_noise=0.0,
              output_router_logits=False)
  if c.model_type in _ONE_ATTENTION_BIAS:
    if c.qkv_bias != c.o_bias:
      raise UserError(f'{c.model_type} in transformers has one attention_bias for q/k/v/o; '
                      f'this config has qkv_bias={c.qkv_bias}, o_bias={c.o_bias}.')
    hf.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
  if c.model_type in _MISTRAL:
    hf['sliding_window'] = c.sliding_window
  elif c.model_type in _QWEN:
    hf.update(use_sliding_window=c.sliding_window is not None,
              sliding_window=c.sliding_window, max_window_layers=0 if c.sliding_window else
              c.num_layers,
              layer_types=['sliding_attention' if c.sliding_window else 'full_attention'] *
              c.num_layers)
  return hf


def resolve_checkpoint_dir(path: str | os.PathLike) -> str:
  """A local folder as is; anything else is taken as a hub id and fetched into the HF cache."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return path
  if os.path.exists(path) or path.startswith(('/', './', '../', '~')):
    raise UserError(f'{path!r} is not a folder. Pass the folder holding config.json and '
                    '*.safetensors, or a hub id such as "meta-llama/Llama-2-7b-hf".')
  import huggingface_hub  # only when a hub id is given: loading local folders needs no network
  try:
    return huggingface_hub.snapshot_download(
        repo_id=path, allow_patterns=['*.json', '*.safetensors', 'tokenizer.model', '*.txt',
                                      '*.jinja'])
  except Exception as error:  # not a folder here, and not fetchable (offline, private, typo)
    raise UserError(f'{path!r} is not a local folder, and fetching it as a hub model failed '
                    f'({type(error).__name__}); pass the folder holding config.json and '
                    '*.safetensors.') from error


# The config.json fields every LLaMA-family checkpoint has: sizes, positive integers.
_REQUIRED_SIZES = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                   'num_attention_heads')
_OPTIONAL_SIZES = ('num_key_value_heads', 'head_dim')


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """The `config.json` of an HF folder as a dict, its size fields checked (`UserError` naming
  the file and the field for a file that is not JSON or lacks one)."""
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise UserError(f'{path!r} has no config.json; it is not an HF model folder (pass the '
                    'folder holding config.json and *.safetensors).')
  try:
    with open(config_path, encoding='utf-8') as f:
      hf = json.load(f)
  except ValueError as error:  # JSONDecodeError names the line and column; or not UTF-8
    raise UserError(f'{config_path} is not valid JSON ({error}); fix it or download it '
                    'again.') from None
  if not isinstance(hf, dict):
    raise UserError(f'{config_path} holds a JSON {type(hf).__name__}, not an object of '
                    'settings; fix it or download it again.')
  for key in _REQUIRED_SIZES + _OPTIONAL_SIZES:
    value = hf.get(key)
    if value is None and key in _OPTIONAL_SIZES:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      have = 'lacks' if key not in hf else f'has {key}={value!r}, not a positive integer, for'
      raise UserError(f'{config_path} {have} {key}; jaxsft reads the config.json that '
                      'transformers saves with a LLaMA-family model: use that one.')
  return hf


def load_config(path: str | os.PathLike, **overrides: Any) -> LlamaConfig:
  """The `LlamaConfig` of the HF checkpoint folder (or cached hub id) at `path`, from its
  `config.json`, with `overrides` (execution fields such as `dtype='float32'`,
  `attention_implementation`, `scan_layers`) applied; no weight is read."""
  return config_from_hf(read_hf_config(resolve_checkpoint_dir(path)), **overrides)
