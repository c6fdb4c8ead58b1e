"""GGUF export (`jaxsft.interop.gguf_file`), read back with `gguf`'s own reader: every tensor
under llama.cpp's name equals the HF checkpoint's (q/k rows in llama.cpp's interleaved order for
the `llama` architecture), f16 / bf16 / q8_0 within their rounding; the vocabulary equals the
tokenizer's (SentencePiece LLaMA-2 from ../shared, a byte-level BPE with Qwen's split pattern);
special ids, the chat template and the architecture's metadata are there. The executable's
export of a trained run (equal to its merged export) is `tests/test_readme.py`'s, and llama.cpp
itself runs the file in `scripts/check_gguf.py`."""

import json

import flax.linen as nn
import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
import transformers
from conftest import llama2_tokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxsft.errors import UserError
from jaxsft.interop import gguf_file, hf
from jaxsft.interop.hf_config import config_from_hf as hf_config_to_jaxsft


def _reader_tensors(path):
  reader = gguf.GGUFReader(path)
  out = {}
  for tensor in reader.tensors:
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    out[tensor.name] = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
  return reader, out


def _field(reader, key):
  return reader.fields[key].contents()


def _deinterleave(weight_oi, heads):
  rows = weight_oi.shape[0]
  split = weight_oi.reshape(heads, rows // heads // 2, 2, *weight_oi.shape[1:])
  return split.swapaxes(1, 2).reshape(weight_oi.shape)


def _random_params(config, seed=0):
  """Random float32 parameters of `config` (numpy, in jaxsft's tree)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: (rng.standard_normal(leaf.shape) * 0.02).astype(np.float32),
                      nn.unbox(hf.abstract_params(config)))


@pytest.fixture(scope='module')
def llama2():
  """A random 2-layer LLaMA (hidden 64, LLaMA-3.1 rope scaling) with LLaMA-2's SentencePiece
  tokenizer (its folder as HF writes it, plus the `tokenizer.model` it came from)."""
  folder = llama2_tokenizer()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  hf_config = transformers.LlamaConfig(
      vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                    'high_freq_factor': 4.0, 'original_max_position_embeddings': 64})
  config = hf_config_to_jaxsft(hf_config.to_dict())
  return folder, tokenizer, hf_config, config, _random_params(config)


def test_llama_tensors_vocabulary_and_metadata(llama2, tmp_path):
  folder, tokenizer, hf_config, config, params = llama2
  expected = dict(hf.hf_tensors(config, params, np.float32))
  path = str(tmp_path / 'f32.gguf')
  gguf_file.save_gguf(path, config, params, tokenizer_dir=str(folder),
                      chat_template='{{ messages }}', gguf_type='f32', name='tiny',
                      metadata={'jaxsft.export': '{"step": 3}'})
  reader, tensors = _reader_tensors(path)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
  assert len(tensors) == len(expected) + 1  # + rope_freqs
  for hf_name, value in expected.items():
    stem, suffix = hf_name.rsplit('.', 1)
    got = tensors[f'{names.get_name(stem)}.{suffix}']
    if stem.endswith(('q_proj', 'k_proj')):  # llama.cpp's pair order, undone
      got = _deinterleave(got, 4 if stem.endswith('q_proj') else 2)
    np.testing.assert_array_equal(got, value)
  # LLaMA-3.1 scaling as llama.cpp reads it: each frequency divided by its factor.
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, 16, 2) / 16))
  hf_inv_freq = ROPE_INIT_FUNCTIONS['llama3'](hf_config, 'cpu')[0].numpy()
  np.testing.assert_allclose(inv_freq / tensors['rope_freqs.weight'], hf_inv_freq, rtol=1e-6)

  assert _field(reader, 'general.architecture') == 'llama'
  assert _field(reader, 'llama.block_count') == 2
  assert _field(reader, 'llama.attention.head_count_kv') == 2
  assert _field(reader, 'llama.rope.dimension_count') == 16
  assert _field(reader, 'tokenizer.ggml.model') == 'llama'
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  assert tokens == tokenizer.convert_ids_to_tokens(list(range(32000)))
  types = _field(reader, 'tokenizer.ggml.token_type')
  assert [types[i] for i in (0, 1, 2, 3, 500)] == [2, 3, 3, 6, 1]  # unk, control, byte, normal
  assert _field(reader, 'tokenizer.ggml.bos_token_id') == tokenizer.bos_token_id
  assert _field(reader, 'tokenizer.ggml.eos_token_id') == tokenizer.eos_token_id
  assert _field(reader, 'tokenizer.chat_template') == '{{ messages }}'
  assert json.loads(_field(reader, 'jaxsft.export')) == {'step': 3}


def _byte_level_tokenizer(folder, pattern):
  """A small byte-level BPE trained here, splitting text with `pattern` as Qwen's does."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(pattern), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>', '<|im_start|>',
                                                                '<|im_end|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(['Give three tips for staying healthy.', 'Add 2 and 3.'] * 50,
                              trainer)
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, eos_token='<|im_end|>', pad_token='<|endoftext|>')
  tokenizer.save_pretrained(folder)
  return tokenizer


def test_qwen3_with_a_byte_level_bpe_tokenizer(tmp_path):
  pattern = next(p for p, name in gguf_file.PRE_TOKENIZERS.items() if name == 'qwen2')
  tokenizer = _byte_level_tokenizer(tmp_path, pattern)
  config = transformers.Qwen3Config(
      vocab_size=416, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
      tie_word_embeddings=True)
  model_config = hf_config_to_jaxsft(config.to_dict())
  params = _random_params(model_config)
  def save(kind):
    path = str(tmp_path / f'qwen3-{kind}.gguf')
    gguf_file.save_gguf(path, model_config, params, tokenizer_dir=str(tmp_path),
                        chat_template='t', gguf_type=kind)
    return path

  reader, tensors = _reader_tensors(save('f32'))
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 2)
  expected = dict(hf.hf_tensors(model_config, params, np.float32))
  assert len(tensors) == len(expected) and 'output.weight' not in tensors  # tied head
  for hf_name, value in expected.items():  # halves rotated: q and k as they are
    stem, suffix = hf_name.rsplit('.', 1)
    np.testing.assert_array_equal(tensors[f'{names.get_name(stem)}.{suffix}'], value)
  assert _field(reader, 'general.architecture') == 'qwen3'
  assert _field(reader, 'qwen3.attention.key_length') == 32
  assert _field(reader, 'tokenizer.ggml.model') == 'gpt2'
  assert _field(reader, 'tokenizer.ggml.pre') == 'qwen2'
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  vocab = len(tokenizer)
  assert tokens[:vocab] == tokenizer.convert_ids_to_tokens(list(range(vocab)))
  assert tokens[vocab:] == [f'[PAD{i}]' for i in range(vocab, 416)]  # rows no token reaches
  merges = json.loads((tmp_path / 'tokenizer.json').read_text())['model']['merges']
  assert _field(reader, 'tokenizer.ggml.merges') == [' '.join(m) if isinstance(m, list) else m
                                                     for m in merges]
  types = _field(reader, 'tokenizer.ggml.token_type')
  assert [types[tokenizer.convert_tokens_to_ids(t)] for t in ('<|im_end|>', 'G')] == [3, 1]
  assert _field(reader, 'tokenizer.ggml.eos_token_id') == tokenizer.eos_token_id
  # The other types: f16 and bf16 as numpy / ml_dtypes round, q8_0 within half its step.
  for kind, rounded in (('f16', lambda x: x.astype(np.float16)),
                        ('bf16', lambda x: x.astype(ml_dtypes.bfloat16))):
    _, other = _reader_tensors(save(kind))
    for name, value in tensors.items():
      want = value if value.ndim == 1 else rounded(value).astype(np.float32)
      np.testing.assert_array_equal(other[name], want, err_msg=f'{kind} {name}')
  _, q8 = _reader_tensors(save('q8_0'))
  for name, value in tensors.items():
    blocks = np.abs(value.reshape(-1, 32) if value.ndim > 1 else value[None])
    # Q8_0: 32 values share a scale.
    # Rounded with the step d = max / 127, read back with d in f16 (off by up to d 2^-11, times
    # |q| <= 127).
    step = blocks.max(-1, keepdims=True) / 127
    bound = np.repeat(step * (0.5 + 127 * 2**-11) + 1e-7, blocks.shape[-1], -1)
    assert np.all(np.abs(q8[name] - value).reshape(blocks.shape) <= bound), name


def test_what_llama_cpp_would_read_differently_is_refused(llama2, tmp_path):
  folder, _, _, config, params = llama2
  _byte_level_tokenizer(tmp_path / 'other', r'\w+|\s+')
  with pytest.raises(UserError, match='not one of the pre-tokenizers'):
    gguf_file.save_gguf(str(tmp_path / 'x.gguf'), config, params,
                        tokenizer_dir=str(tmp_path / 'other'), chat_template=None)
  yarn = config.replace(rope_scaling={'rope_type': 'yarn', 'factor': 4.0,
                                      'original_max_position_embeddings': 64})
  with pytest.raises(UserError, match="rope scaling 'yarn'"):
    gguf_file.check_gguf_model(yarn)
  with pytest.raises(UserError, match='dense families'):
    gguf_file.check_gguf_model(config.replace(model_type='qwen3_moe', num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=32))
