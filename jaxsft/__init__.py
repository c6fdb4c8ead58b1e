"""jaxsft: supervised fine-tuning of LLaMA-family models in JAX/Flax."""

__version__ = '0.1.0'
