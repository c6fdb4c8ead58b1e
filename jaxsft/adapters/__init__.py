"""Adaptations of a model's weights: LoRA (the low-rank update as a second variable collection,
its initialisation and merge) and 4-bit kernels (NF4 / int4 `QuantizedKernel` pytree nodes),
with one target matcher (`targets`) that both read.

`models` builds on this part (a projection applies a LoRA update and dequantizes a 4-bit
kernel), so it must not import models, interop, data, train, eval or the CLI; it may use
`jaxsft.parallel` and `jaxsft.errors`.
"""
