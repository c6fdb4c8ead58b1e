"""The HF ecosystem in and out: `config.json` <-> `LlamaConfig` (`hf_config`), safetensors
weights and tokenizer files (`hf`), the safetensors headers and their checks against
`config.json` before any tensor is read (`hf_headers`), PEFT LoRA adapters (`peft`) and named
architectures without weights (`presets`).

Usable in research code without the trainer: it may import `models`, `adapters`, `parallel`
and `errors`, never `data`, `train`, `eval`, the CLI or the config defaults.
"""
