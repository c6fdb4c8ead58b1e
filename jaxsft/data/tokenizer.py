"""Loading the tokenizer of a run: a fast (Rust) tokenizer, since loss masks need character
offsets, from a folder that really holds a vocabulary, or a hub id in the HF cache."""

from __future__ import annotations

import os
from typing import Any

from jaxsft.errors import UserError

# Files that hold a tokenizer's vocabulary; a folder with none of them (only
# tokenizer_config.json, say) would load as a tokenizer of a few special tokens.
TOKENIZER_MODEL_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.json', 'vocab.txt',
                         'spiece.model', 'sentencepiece.bpe.model')


def load_tokenizer(path: str) -> Any:
  """A fast tokenizer (offsets are needed for loss masks) from a folder or hub id."""
  # transformers is heavy to import; only a command that tokenizes pays for it.
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  if not path:
    raise UserError('no tokenizer: set data.tokenizer (a tokenizer folder) or model.path in the '
                    'config.')
  if os.path.isdir(path):
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_MODEL_FILES):
      raise UserError(f'the tokenizer folder {path} has no vocabulary: it holds none of '
                      f'{list(TOKENIZER_MODEL_FILES)} (found {sorted(os.listdir(path))}); save '
                      'the tokenizer with tokenizer.save_pretrained(folder), or copy its '
                      'tokenizer.json / tokenizer.model there.')
  elif os.path.exists(path) or path.startswith(('/', './', '../', '~')):
    raise UserError(f'the tokenizer folder {path} does not exist; set data.tokenizer (or '
                    'model.path) to a folder holding tokenizer.json or tokenizer.model.')
  try:
    tokenizer = AutoTokenizer.from_pretrained(path)
  except OSError as error:  # a hub id that is not in the cache (offline) or not on the hub
    raise UserError(f'cannot load the tokenizer {path!r}: {error}') from error
  if not tokenizer.is_fast:
    raise UserError(f'the tokenizer at {path} is a slow (Python) tokenizer; jaxsft needs a fast '
                    'one for character offsets. Save it with tokenizer.json (use_fast=True).')
  return tokenizer
