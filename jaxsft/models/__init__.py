"""LLaMA-family models: `Llama` (Flax Linen) and its `LlamaConfig`."""

from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama

__all__ = ['Llama', 'LlamaConfig']
