"""Adaptations of a model's weights: LoRA (the low-rank update as a second variable collection,
its initialisation and merge) and 4-bit kernels (NF4 / int4 `QuantizedKernel` pytree nodes),
with one target matcher (`targets`) that both read.

`models` builds on this part (a projection applies a LoRA update and dequantizes a 4-bit
kernel), so it must not import models, interop, data, train, eval or the CLI; it may use
`jaxsft.parallel` and `jaxsft.errors`.
"""

from jaxsft.adapters.lora import (
    LoraSettings,
    abstract_lora,
    dense_params,
    init_lora,
    lora_scale,
    merge_lora,
)
from jaxsft.adapters.quant import (
    QuantizedKernel,
    QuantSettings,
    dequantize,
    dequantize_params,
    quantize,
    quantize_kernel,
)
from jaxsft.adapters.targets import target_matcher

__all__ = ['LoraSettings', 'QuantSettings', 'QuantizedKernel', 'abstract_lora', 'dense_params',
           'dequantize', 'dequantize_params', 'init_lora', 'lora_scale', 'merge_lora',
           'quantize', 'quantize_kernel', 'target_matcher']
