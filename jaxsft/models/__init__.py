"""LLaMA-family models in Flax Linen: the decoder (`llama`), its layers and projections
(`layers`), mixture-of-experts layers (`moe`) and their grouped matmuls (`grouped`), attention
kernels (`attention`, `blocked_attention`, `indexed_attention`, `ring_attention`,
`splash_attention`), RoPE (`rope`) and the model config (`config`).

A projection applies LoRA and dequantizes 4-bit kernels, so models import `jaxsft.adapters`;
nothing else of jaxsft. `Llama` and `LlamaConfig` below are the public API the README shows;
jaxsft's own modules import them from `models.llama` and `models.config`.
"""

from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama, head_kernel

__all__ = ['Llama', 'LlamaConfig', 'head_kernel']
