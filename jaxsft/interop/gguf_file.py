"""A dense model as one GGUF file for llama.cpp (Ollama, LM Studio): weights, tokenizer and
chat template, written with the `gguf` package (llama.cpp's own reader/writer; the `gguf`
extra).

What llama.cpp expects, and where it differs from the HF folder:
- tensor names are llama.cpp's (`blk.0.attn_q.weight`), mapped from HF's by `gguf`'s own
  `TensorNameMap` for the architecture (`llama` for LLaMA 1/2/3 and Mistral, `qwen2`, `qwen3`);
- the `llama` architecture rotates interleaved pairs of each head's dimensions where HF rotates
  halves, so q and k projections are written with each head's rows reordered (row 2i <- row i,
  row 2i + 1 <- row i + head_dim / 2; `interleave_rope_rows`), as llama.cpp's converter does;
  Qwen's architectures rotate halves and take them as they are;
- LLaMA-3.1's rope scaling travels as a `rope_freqs` tensor of per-frequency divisors (jaxsft's
  default over scaled inverse frequencies), linear scaling as metadata; other scalings
  (yarn, dynamic) are refused rather than written approximately;
- 1-D tensors (norms, biases) stay float32 in every `gguf_type`; `q8_0` quantizes the 2-D ones
  whose rows are whole 32-value blocks (others stay f16);
- the tokenizer: a SentencePiece `tokenizer.model` (LLaMA 1/2, Mistral) as llama.cpp's `llama`
  model with its pieces, scores and types, read with the SentencePiece protobuf transformers
  ships; a byte-level BPE `tokenizer.json` (LLaMA-3, Qwen) as `gpt2` with its merges and the
  pre-tokenizer llama.cpp names for its split pattern (`llama-bpe`, `qwen2`; another pattern is
  refused, since llama.cpp would split text differently); a vocabulary of single ASCII
  characters (the demo's WordLevel tokenizer) as a byte-level BPE without merges, which splits
  text the same way. Special token ids and add-BOS come from `gguf.SpecialVocab`; the
  vocabulary is padded to the model's rows with unused tokens.

Mixture-of-experts models are refused (their llama.cpp layout is not written here).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from jaxsft.errors import UserError
from jaxsft.interop.hf import hf_tensors
from jaxsft.models.config import LlamaConfig
from jaxsft.models.rope import inverse_frequencies, rope_type_of

_LOG = logging.getLogger('jaxsft')
GGUF_TYPES = ('f32', 'f16', 'bf16', 'q8_0')
ARCHITECTURES = {'llama': 'LLAMA', 'mistral': 'LLAMA', 'qwen2': 'QWEN2', 'qwen3': 'QWEN3'}
# llama.cpp's names for byte-level BPE split patterns (its `tokenizer.ggml.pre`).
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": 'llama-bpe',
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": 'qwen2',
}


def interleave_rope_rows(weight_oi: np.ndarray, num_heads: int) -> np.ndarray:
  """HF's rotate-half row order of a q or k projection `[heads * head_dim, in]` -> llama.cpp's
  interleaved pairs (`[.., 2, head_dim / 2, ..]` -> `[.., head_dim / 2, 2, ..]` per head)."""
  rows = weight_oi.shape[0]
  split = weight_oi.reshape(num_heads, 2, rows // num_heads // 2, *weight_oi.shape[1:])
  return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight_oi.shape))


def check_gguf_model(config: LlamaConfig) -> None:
  """Refuses (`UserError`) a model this writer would not write exactly."""
  if config.model_type not in ARCHITECTURES or config.num_experts:
    raise UserError(f'--format gguf writes the dense families {sorted(ARCHITECTURES)}; this '
                    f'run is a {config.model_type} model (export --format merged and convert '
                    "it with llama.cpp's convert_hf_to_gguf.py).")
  if rope_type_of(config.rope_scaling) not in ('default', 'linear', 'llama3'):
    raise UserError(f'--format gguf: rope scaling {rope_type_of(config.rope_scaling)!r} is not '
                    'written by jaxsft (default, linear and llama3 are); export --format merged '
                    "and convert it with llama.cpp's convert_hf_to_gguf.py.")
  if config.o_bias:
    raise UserError('--format gguf: an output-projection bias (attention_bias) is not written '
                    'by jaxsft; export --format merged and convert it with llama.cpp.')


def save_gguf(path: str, config: LlamaConfig, params: Any, *, tokenizer_dir: str,
              chat_template: str | None, gguf_type: str = 'f16', name: str = '',
              metadata: dict[str, str] | None = None) -> None:
  """Writes `params` (dense, as `jaxsft.adapters.lora.dense_params` gives them) of `config` to
  the GGUF file `path` with the tokenizer of `tokenizer_dir` and `chat_template`, plus the
  string `metadata` entries. Every process must call it (arrays may need gathering); only
  process 0's file matters."""
  import gguf  # pylint: disable=import-outside-toplevel
  check_gguf_model(config)
  if gguf_type not in GGUF_TYPES:
    raise UserError(f'--gguf-type {gguf_type}: choose one of {", ".join(GGUF_TYPES)}.')
  arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type])
  writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
  _write_metadata(writer, gguf, config, gguf_type, name)
  _write_tokenizer(writer, gguf, config, tokenizer_dir, chat_template)
  for key, value in (metadata or {}).items():
    writer.add_string(key, value)
  names = gguf.get_tensor_name_map(arch, config.num_layers)
  for hf_name, tensor in hf_tensors(config, params, np.float32):
    stem, suffix = hf_name.rsplit('.', 1)
    if ARCHITECTURES[config.model_type] == 'LLAMA' and stem.endswith(('q_proj', 'k_proj')):
      heads = config.num_heads if stem.endswith('q_proj') else config.num_kv_heads
      tensor = interleave_rope_rows(tensor, heads)
    _add_tensor(writer, gguf, f'{names.get_name(stem)}.{suffix}', tensor, gguf_type)
  if rope_type_of(config.rope_scaling) == 'llama3':
    plain = inverse_frequencies(config.head_dim, config.rope_theta, None)
    scaled = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + '.weight',
                      (plain / scaled).astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _add_tensor(writer, gguf, name: str, tensor: np.ndarray, gguf_type: str) -> None:
  if tensor.ndim == 1 or gguf_type == 'f32':
    writer.add_tensor(name, tensor.astype(np.float32))
  elif gguf_type == 'f16' or (gguf_type == 'q8_0' and tensor.shape[-1] % 32):
    writer.add_tensor(name, tensor.astype(np.float16))
  else:
    kind = {'bf16': gguf.GGMLQuantizationType.BF16, 'q8_0': gguf.GGMLQuantizationType.Q8_0}
    packed = gguf.quants.quantize(tensor.astype(np.float32), kind[gguf_type])
    writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind[gguf_type])


def _write_metadata(writer, gguf, config: LlamaConfig, gguf_type: str, name: str) -> None:
  c = config
  file_types = {'f32': gguf.LlamaFileType.ALL_F32, 'f16': gguf.LlamaFileType.MOSTLY_F16,
                'bf16': gguf.LlamaFileType.MOSTLY_BF16, 'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}
  # The `{arch}.*` keys llama.cpp reads, each from its `LlamaConfig` field.
  fields = {'name': name or c.model_type, 'file_type': file_types[gguf_type],
            'context_length': c.max_position_embeddings, 'embedding_length': c.hidden_size,
            'block_count': c.num_layers, 'feed_forward_length': c.intermediate_size,
            'head_count': c.num_heads, 'head_count_kv': c.num_kv_heads,
            'key_length': c.head_dim, 'value_length': c.head_dim,
            'rope_dimension_count': c.head_dim, 'rope_freq_base': c.rope_theta,
            'layer_norm_rms_eps': c.rms_norm_eps, 'vocab_size': c.vocab_size}
  for field, value in fields.items():
    getattr(writer, f'add_{field}')(value)
  if rope_type_of(c.rope_scaling) == 'linear':
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(c.rope_scaling['factor'])
  if c.sliding_window and c.sliding_window < c.max_position_embeddings:
    _LOG.warning('GGUF: llama.cpp attends to all earlier tokens in this architecture; the '
                 "model's sliding window of %d tokens is not applied to longer rows.",
                 c.sliding_window)


def _write_tokenizer(writer, gguf, config: LlamaConfig, tokenizer_dir: str,
                     chat_template: str | None) -> None:
  model_file = os.path.join(tokenizer_dir, 'tokenizer.model')
  json_file = os.path.join(tokenizer_dir, 'tokenizer.json')
  added = {}
  if os.path.isfile(json_file):
    with open(json_file, encoding='utf-8') as f:
      tokenizer_json = json.load(f)
    added = {t['id']: t for t in tokenizer_json.get('added_tokens', [])}
  else:
    tokenizer_json = None
  if os.path.isfile(model_file):
    tokens, scores, types = _sentencepiece_vocab(model_file, gguf)
    writer.add_tokenizer_model('llama')
    writer.add_tokenizer_pre('default')
    merges = False
  elif tokenizer_json is not None and _is_byte_level_bpe(tokenizer_json):
    tokens, scores, types = _byte_level_vocab(tokenizer_json, gguf)
    writer.add_tokenizer_model('gpt2')
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer_json, tokenizer_dir))
    merges = True
  elif tokenizer_json is not None and _is_ascii_char_level(tokenizer_json, added):
    # One token per ASCII character (the demo's tokenizer): exactly a byte-level BPE without
    # merges, each character under its byte-level spelling (' ' -> 'Ġ', '\n' -> 'Ċ').
    byte_chars = _byte_level_alphabet()
    by_id = {i: t for t, i in tokenizer_json['model']['vocab'].items()}
    tokens = [(by_id[i] if i in added else byte_chars[ord(by_id[i])]).encode('utf-8')
              for i in range(len(by_id))]
    scores, types = [0.0] * len(tokens), [gguf.TokenType.NORMAL] * len(tokens)
    writer.add_tokenizer_model('gpt2')
    writer.add_tokenizer_pre('default')
    # llama.cpp needs a merge list and GGUF none empty: one that never applies, of two special
    # tokens (matched whole before byte-pair merging ever sees text).
    specials = [t['content'] for t in added.values() if t.get('special') and ' ' not in
                t['content']][:2]
    if len(specials) < 2:
      raise UserError(f'--format gguf: the character-level tokenizer in {tokenizer_dir} needs '
                      'two special tokens; export --format merged instead.')
    writer.add_token_merges([' '.join(specials)])
    merges = False
  else:
    kind = (tokenizer_json or {}).get('model', {}).get('type', 'unknown')
    raise UserError(f'--format gguf: the tokenizer in {tokenizer_dir} (model {kind}) is neither '
                    'SentencePiece (tokenizer.model) nor byte-level BPE (tokenizer.json), the '
                    "tokenizers llama.cpp reads; export --format merged instead.")
  for token_id, token in sorted(added.items()):  # tokens added to the base vocabulary
    kind = gguf.TokenType.CONTROL if token.get('special') else gguf.TokenType.USER_DEFINED
    while len(tokens) < token_id:  # ids no token has
      tokens.append(f'[PAD{len(tokens)}]'.encode('utf-8'))
      scores.append(-1000.0)
      types.append(gguf.TokenType.UNUSED)
    if token_id == len(tokens):
      tokens.append(token['content'].encode('utf-8'))
      scores.append(-1000.0)
      types.append(kind)
    elif types[token_id] == gguf.TokenType.NORMAL:  # unknown, byte, control pieces stay so
      tokens[token_id] = token['content'].encode('utf-8')
      types[token_id] = kind
  if len(tokens) > config.vocab_size:
    raise UserError(f'--format gguf: the tokenizer in {tokenizer_dir} has {len(tokens)} tokens, '
                    f'more than the model\'s {config.vocab_size} embedding rows.')
  for index in range(len(tokens), config.vocab_size):  # rows no token reaches
    tokens.append(f'[PAD{index}]'.encode('utf-8'))
    scores.append(-1000.0)
    types.append(gguf.TokenType.UNUSED)
  writer.add_token_list(tokens)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  # (Its notes on post-processors llama.cpp does not use are not the user's concern.)
  vocab_log = logging.getLogger('gguf.vocab')
  level, vocab_log.level = vocab_log.level, logging.ERROR
  try:
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=merges, n_vocab=config.vocab_size)
  finally:
    vocab_log.setLevel(level)
  special.chat_template = chat_template  # the template the run trained with
  special.add_to_gguf(writer, quiet=True)


def _sentencepiece_vocab(model_file: str, gguf) -> tuple[list[bytes], list[float], list[Any]]:
  # pylint: disable=import-outside-toplevel
  from transformers.convert_slow_tokenizer import import_protobuf
  proto = import_protobuf().ModelProto()
  with open(model_file, 'rb') as f:
    proto.ParseFromString(f.read())
  tokens = [piece.piece.encode('utf-8') for piece in proto.pieces]
  scores = [float(piece.score) for piece in proto.pieces]
  # SentencePiece's piece types (1 normal .. 6 byte) are GGUF's token types, value for value.
  types = [gguf.TokenType(piece.type) for piece in proto.pieces]
  return tokens, scores, types


def _is_byte_level_bpe(tokenizer_json: dict[str, Any]) -> bool:
  model, decoder = tokenizer_json.get('model') or {}, tokenizer_json.get('decoder') or {}
  return (model.get('type') == 'BPE' and not model.get('byte_fallback', False)
          and decoder.get('type') == 'ByteLevel')


def _byte_level_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character map of byte-level BPE (`gguf.vocab`'s own)."""
  from gguf.vocab import bytes_to_unicode  # pylint: disable=import-outside-toplevel
  return bytes_to_unicode()


def _is_ascii_char_level(tokenizer_json: dict[str, Any], added: dict[int, Any]) -> bool:
  model = tokenizer_json.get('model') or {}
  vocab = model.get('vocab') or {}
  return (model.get('type') == 'WordLevel' and isinstance(vocab, dict) and
          all(i in added or (len(t) == 1 and ord(t) < 128) for t, i in vocab.items()))


def _byte_level_vocab(tokenizer_json: dict[str, Any], gguf
                      ) -> tuple[list[bytes], list[float], list[Any]]:
  by_id = {i: token for token, i in tokenizer_json['model']['vocab'].items()}
  tokens = [by_id[i].encode('utf-8') for i in range(len(by_id))]
  return tokens, [0.0] * len(tokens), [gguf.TokenType.NORMAL] * len(tokens)


def _pre_tokenizer(tokenizer_json: dict[str, Any], tokenizer_dir: str) -> str:
  def patterns(node):
    if isinstance(node, dict):
      if node.get('type') == 'Split':
        yield node.get('pattern', {}).get('Regex')
      for value in node.values():
        yield from patterns(value)
    elif isinstance(node, list):
      for value in node:
        yield from patterns(value)

  found = [p for p in patterns(tokenizer_json.get('pre_tokenizer')) if p]
  for pattern in found:
    if pattern in PRE_TOKENIZERS:
      return PRE_TOKENIZERS[pattern]
  raise UserError(f'--format gguf: the byte-level BPE tokenizer in {tokenizer_dir} splits text '
                  f'with {found[:1] or "no pattern"}, which is not one of the pre-tokenizers '
                  "jaxsft names for llama.cpp (LLaMA-3's, Qwen's); export --format merged and "
                  "convert it with llama.cpp's convert_hf_to_gguf.py.")
