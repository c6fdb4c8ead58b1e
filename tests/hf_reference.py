"""Tiny random transformers (torch) models: the reference jaxsft is compared against."""

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512)

# name -> (config class, extra config fields)
VARIANTS = {
    'llama2_mha': (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    'llama3_gqa': (transformers.LlamaConfig, dict(
        num_key_value_heads=2, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                      'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192})),
    'llama_linear_rope': (transformers.LlamaConfig, dict(
        num_key_value_heads=2, rope_scaling={'rope_type': 'linear', 'factor': 4.0})),
    'llama_tied': (transformers.LlamaConfig, dict(num_key_value_heads=2,
                                                  tie_word_embeddings=True)),
    'llama_mqa_bias': (transformers.LlamaConfig, dict(num_key_value_heads=1,
                                                      attention_bias=True, mlp_bias=True)),
    'mistral': (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=4096)),
    'mistral_window5': (transformers.MistralConfig, dict(num_key_value_heads=2,
                                                         sliding_window=5)),
    'qwen2_bias': (transformers.Qwen2Config, dict(num_key_value_heads=2)),
    # Qwen3: per-head q/k RMSNorm; head_dim 32 where hidden / heads says 16.
    'qwen3': (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=32,
                                             tie_word_embeddings=False)),
    'qwen3_tied': (transformers.Qwen3Config, dict(num_key_value_heads=2,
                                                  tie_word_embeddings=True)),
}


def make_model(variant: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
  """A tiny fp32 model with weights large enough that a wrong op moves the logits visibly."""
  config_cls, extra = VARIANTS[variant]
  config = config_cls(**{**TINY, **extra, **overrides})
  config._attn_implementation = 'eager'
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager')
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith('norm.weight'):
        param.copy_(1.0 + 0.1 * torch.randn_like(param))
      else:
        param.copy_(0.08 * torch.randn_like(param))
  return model.eval()


def save_model(variant: str, folder, seed: int = 0, **save_kwargs) -> transformers.PreTrainedModel:
  model = make_model(variant, seed)
  model.save_pretrained(folder, **save_kwargs)
  return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def random_tokens(batch: int, length: int, vocab: int = TINY['vocab_size'], seed: int = 0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)
