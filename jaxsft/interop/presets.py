"""Published model shapes, as the HF `config.json` fields that define them.

For abstract shapes (memory planning, FLOP counts, benchmarks with random weights) when the
checkpoint itself is not at hand. A real run reads `config.json` from the checkpoint folder.
"""

from __future__ import annotations

from typing import Any

from jaxsft.errors import UserError, did_you_mean
from jaxsft.interop.hf_config import config_from_hf
from jaxsft.models.config import LlamaConfig

_LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}

HF_CONFIGS: dict[str, dict[str, Any]] = {
    'llama2-7b': dict(model_type='llama', vocab_size=32000, hidden_size=4096,
                      intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2),
    'llama3-8b': dict(model_type='llama', vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    'llama3.1-8b': dict(model_type='llama', vocab_size=128256, hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
                        bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    'llama3.2-1b': dict(model_type='llama', vocab_size=128256, hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                        rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, 'factor': 32.0},
                        max_position_embeddings=131072, tie_word_embeddings=True,
                        bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    'mistral-7b': dict(model_type='mistral', vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                       sliding_window=4096, max_position_embeddings=32768, bos_token_id=1,
                       eos_token_id=2),
    'qwen2.5-7b': dict(model_type='qwen2', vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=131072, use_sliding_window=False,
                       sliding_window=131072, max_window_layers=28, bos_token_id=151643,
                       eos_token_id=151643),
    # Qwen3 dense: per-head q/k norms, head_dim 128 whatever hidden / heads says.
    'qwen3-0.6b': dict(model_type='qwen3', vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, max_position_embeddings=40960,
                       tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
                       sliding_window=None, max_window_layers=28, bos_token_id=151643,
                       eos_token_id=151645),
    'qwen3-8b': dict(model_type='qwen3', vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, max_position_embeddings=40960,
                     tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
                     sliding_window=None, max_window_layers=36, bos_token_id=151643,
                     eos_token_id=151645),
    # Mixture of experts: 128 experts of 768 in every layer, 8 per token (3.3B of 30.5B active).
    'qwen3-30b-a3b': dict(model_type='qwen3_moe', vocab_size=151936, hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], router_aux_loss_coef=0.001,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                          max_position_embeddings=40960, tie_word_embeddings=False,
                          attention_bias=False, use_sliding_window=False, sliding_window=None,
                          max_window_layers=48, bos_token_id=151643, eos_token_id=151645),
    # 8 experts of 14336 in every layer, 2 per token (12.9B of 46.7B active).
    'mixtral-8x7b': dict(model_type='mixtral', vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                         router_aux_loss_coef=0.02, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                         rope_theta=1000000.0, max_position_embeddings=32768,
                         sliding_window=None, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2),
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
  """`LlamaConfig` of a published model, e.g. `preset('llama2-7b', scan_layers=True)`."""
  if name not in HF_CONFIGS:
    raise UserError(f'unknown model preset {name!r} (model.preset); known: {sorted(HF_CONFIGS)}.'
                    f'{did_you_mean(name, list(HF_CONFIGS))} For other models point '
                    'model.path at the HF folder instead.')
  return config_from_hf(HF_CONFIGS[name], **overrides)
