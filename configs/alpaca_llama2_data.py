"""Alpaca-format instructions with the LLaMA-2 chat template (the data section only).

  jaxsft data inspect --config configs/alpaca_llama2_data.py:path/to/data.json \
      --config.data.tokenizer=PATH/TO/TOKENIZER
"""

from jaxsft.config import default_config


def get_config(arg=None):
  config = default_config()
  config.data.datasets = [{'path': arg or 'data/alpaca_en_demo.json', 'format': 'alpaca'}]
  config.data.template = 'llama2'
  config.data.max_seq_len = 2048
  config.data.eval_size = 0.02
  return config
