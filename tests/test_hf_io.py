"""HF checkpoints in and out: round trips, sharded files, dtypes, config formats, clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsft.errors import UserError
from jaxsft.interop import hf
from jaxsft.interop.hf_config import config_from_hf

from conftest import shared_data
from hf_reference import random_tokens, save_model, torch_logits


def load_hf(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(
      folder, attn_implementation='eager', dtype='float32').eval()


def assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('variant', ['llama3_gqa', 'llama_tied', 'llama_mqa_bias', 'mistral',
                                     'qwen2_bias', 'qwen3', 'qwen3_tied'])
def test_round_trip_through_transformers(tmp_path, variant):
  original = save_model(variant, tmp_path / 'original')
  config, params = hf.load_checkpoint(tmp_path / 'original')
  hf.save_checkpoint(tmp_path / 'exported', config, params)
  reloaded = load_hf(tmp_path / 'exported')
  assert type(reloaded) is type(original)
  tokens = random_tokens(2, 20, seed=5)
  np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(original, tokens))
  # ... and jaxsft reads its own export back to the same parameters.
  config_again, params_again = hf.load_checkpoint(tmp_path / 'exported')
  assert config_again == config
  assert_trees_equal(params_again, params)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
  model = save_model('llama3_gqa', tmp_path / 'single')
  model.save_pretrained(tmp_path / 'sharded', max_shard_size='40KB')
  files = sorted(os.listdir(tmp_path / 'sharded'))
  assert hf.SAFETENSORS_INDEX in files and sum(f.endswith('.safetensors') for f in files) > 2
  _, single = hf.load_checkpoint(tmp_path / 'single')
  _, sharded = hf.load_checkpoint(tmp_path / 'sharded')
  assert_trees_equal(sharded, single)


def test_save_checkpoint_shards_above_the_threshold(tmp_path):
  original = save_model('qwen2_bias', tmp_path / 'original')
  config, params = hf.load_checkpoint(tmp_path / 'original', config_overrides={'scan_layers':
                                                                              False})
  hf.save_checkpoint(tmp_path / 'exported', config, params, max_shard_bytes=60_000)
  with open(tmp_path / 'exported' / hf.SAFETENSORS_INDEX) as f:
    index = json.load(f)
  shard_files = sorted(set(index['weight_map'].values()))
  assert len(shard_files) > 2 and shard_files[0] == f'model-00001-of-{len(shard_files):05d}' \
      '.safetensors'
  assert not any(n.endswith('.tmp') for n in os.listdir(tmp_path / 'exported'))
  tokens = random_tokens(1, 12, seed=6)
  np.testing.assert_array_equal(torch_logits(load_hf(tmp_path / 'exported'), tokens),
                                torch_logits(original, tokens))


def test_bf16_checkpoint_dtypes(tmp_path):
  model = save_model('llama2_mha', tmp_path / 'fp32')
  model.to(dtype=torch.bfloat16)
  model.save_pretrained(tmp_path / 'bf16')
  config, params = hf.load_checkpoint(tmp_path / 'bf16')  # 'auto': the stored dtype
  assert config.param_dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  _, params32 = hf.load_checkpoint(tmp_path / 'bf16', dtype=jnp.float32)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params32)} == {jnp.dtype(jnp.float32)}
  for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params32)):
    np.testing.assert_array_equal(np.asarray(x).astype(np.float32), np.asarray(y))
  hf.save_checkpoint(tmp_path / 'out', config, params32, dtype=jnp.bfloat16)
  with open(tmp_path / 'out' / 'config.json') as f:
    assert json.load(f)['dtype'] == 'bfloat16'
  assert load_hf(tmp_path / 'out').config.vocab_size == 256


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_4bit_kernels_are_saved_dequantized(tmp_path, dtype):
  """A QLoRA base (NF4 kernels, double quantization) saves as `quant.dequantize_params` cast to
  the save dtype (the layout of dense kernels is `test_round_trip_through_transformers`'s)."""
  from jaxsft.adapters import quant
  save_model('llama3_gqa', tmp_path / 'original')
  config, params = hf.load_checkpoint(tmp_path / 'original')
  quantized = quant.quantize(params)  # the defaults: NF4, double quantization
  nodes = [x for x in jax.tree_util.tree_leaves(
      quantized, is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))
      if isinstance(x, quant.QuantizedKernel)]
  assert len(nodes) == 7 and nodes[0].kind == 'nf4' and nodes[0].double_quant  # 7 projections
  hf.save_checkpoint(tmp_path / 'out', config, quantized, dtype=dtype)
  _, reloaded = hf.load_checkpoint(tmp_path / 'out')
  want = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype),
                                quant.dequantize_params(quantized, jnp.float32))
  assert_trees_equal(reloaded, want)
  # The saved kernels are the 4-bit ones, not the originals.
  assert not np.array_equal(want['layers']['mlp']['up_proj']['kernel'],
                            np.asarray(params['layers']['mlp']['up_proj']['kernel']).astype(dtype))


def test_loading_inside_a_mesh_context_equals_loading_outside(tmp_path):
  """`jax.set_mesh` + `nn.logical_axis_rules` (the context a train step is traced in) change
  nothing: same values, same shardings, with and without a mesh and a jitted `transform` (the
  trainer's QLoRA path jits one with `out_shardings`)."""
  import flax.linen as nn
  from jaxsft.parallel import mesh as mesh_lib
  save_model('llama3_gqa', tmp_path)
  mesh, rules = mesh_lib.make_mesh((2, 2, 2)), mesh_lib.DEFAULT_RULES

  def transform(path, array):
    return jax.jit(lambda x: 2 * x, out_shardings=array.sharding)(array)

  def load():
    return [hf.load_checkpoint(tmp_path, mesh=mesh, rules=rules)[1],
            hf.load_checkpoint(tmp_path, mesh=mesh, rules=rules, transform=transform)[1],
            hf.load_checkpoint(tmp_path)[1]]

  outside = load()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    inside = load()
  for want, got in zip(outside, inside):
    assert_trees_equal(got, want)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      assert x.sharding == y.sharding, (x.sharding, y.sharding)
  assert any(x.sharding.spec != jax.sharding.PartitionSpec()
             for x in jax.tree_util.tree_leaves(inside[0]))  # the mesh really shards some


def test_transformers4_config_format(tmp_path):
  """`rope_theta`/`rope_scaling`/`torch_dtype` (transformers 4) read like `rope_parameters`."""
  save_model('llama3_gqa', tmp_path)
  config5, _ = hf.load_checkpoint(tmp_path)
  with open(tmp_path / 'config.json') as f:
    hf_config = json.load(f)
  rope = hf_config.pop('rope_parameters')
  hf_config['rope_theta'] = rope.pop('rope_theta')
  hf_config['rope_scaling'] = {**rope, 'type': rope.pop('rope_type')}  # oldest spelling
  hf_config['torch_dtype'] = hf_config.pop('dtype', 'float32')
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(hf_config, f)
  config4, _ = hf.load_checkpoint(tmp_path)
  assert config4 == config5
  assert config4.rope_theta == 500000.0 and config4.rope_scaling['rope_type'] == 'llama3'


def test_tokenizer_files_are_copied(tmp_path):
  tokenizer_dir = shared_data('tokenizers/llama2')
  save_model('llama2_mha', tmp_path / 'original')
  config, params = hf.load_checkpoint(tmp_path / 'original')
  hf.save_checkpoint(tmp_path / 'out', config, params, tokenizer_dir=tokenizer_dir)
  assert (tmp_path / 'out' / 'tokenizer.model').is_file()
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  assert tokenizer.eos_token == '</s>'


def test_pickle_only_folder_says_how_to_convert(tmp_path):
  save_model('llama2_mha', tmp_path)
  os.remove(tmp_path / 'model.safetensors')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not read')
  with pytest.raises(UserError, match=r'pickle weights \(pytorch_model.bin\).*'
                     r'save_pretrained'):
    hf.load_checkpoint(tmp_path)


def test_unknown_architecture_is_named(tmp_path):
  save_model('llama2_mha', tmp_path)
  with open(tmp_path / 'config.json') as f:
    hf_config = json.load(f)
  hf_config.update(model_type='gpt2', architectures=['GPT2LMHeadModel'])
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(hf_config, f)
  with pytest.raises(ValueError, match=r"model_type='gpt2'.*GPT2LMHeadModel.*supports"):
    hf.load_checkpoint(tmp_path)


def test_missing_tensor_is_named(tmp_path):
  import safetensors.numpy
  save_model('llama2_mha', tmp_path)
  tensors = safetensors.numpy.load_file(tmp_path / 'model.safetensors')
  del tensors['model.layers.1.mlp.down_proj.weight']
  safetensors.numpy.save_file(tensors, tmp_path / 'model.safetensors', {'format': 'pt'})
  with pytest.raises(KeyError, match=r'lacks 1 tensors.*model.layers.1.mlp.down_proj.weight'):
    hf.load_checkpoint(tmp_path)


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path):
  with pytest.raises(UserError, match='is not a folder'):
    hf.load_checkpoint(tmp_path / 'nowhere')


def test_mixed_sliding_window_layers_are_refused():
  hf_config = dict(model_type='qwen2', vocab_size=8, hidden_size=8, intermediate_size=8,
                   num_hidden_layers=4, num_attention_heads=2, sliding_window=16,
                   use_sliding_window=True, max_window_layers=2)
  with pytest.raises(NotImplementedError, match='mixes sliding-window and full-attention'):
    config_from_hf(hf_config)
  hf_config['use_sliding_window'] = False
  assert config_from_hf(hf_config).sliding_window is None


def test_a_config_json_of_other_weights_is_named_before_any_read(tmp_path, monkeypatch):
  """The folder's config.json against its safetensors headers: the setting, the tensor, the
  file, both shapes (tests/test_broken_inputs.py drives the other mismatches through the CLI)."""
  save_model('qwen3', tmp_path)
  hf_config = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**hf_config, 'num_key_value_heads': 4}))
  monkeypatch.setattr(hf.SafetensorsReader, 'read', lambda *_: pytest.fail('read a tensor'))
  with pytest.raises(UserError, match=(
      r'config.json says num_key_value_heads x head_dim = 4 x 32 but '
      r'model.layers.0.self_attn.k_proj.weight in \S+/model.safetensors is \[64, 64\] '
      r'\(expected \[128, 64\]\); \S+/config.json does not belong to these weights')):
    hf.load_checkpoint(tmp_path)


def test_quantized_weights_and_disagreeing_shards_are_refused(tmp_path):
  import safetensors.numpy
  save_model('llama3_gqa', tmp_path / 'int8')
  path = tmp_path / 'int8' / 'model.safetensors'
  tensors = safetensors.numpy.load_file(path)
  tensors['model.layers.0.mlp.up_proj.weight'] = np.zeros_like(
      tensors['model.layers.0.mlp.up_proj.weight'], np.int8)
  safetensors.numpy.save_file(tensors, path, {'format': 'pt'})
  with pytest.raises(UserError, match=r'model.layers.0.mlp.up_proj.weight in \S+ is I8; jaxsft '
                     'reads float weights'):
    hf.load_checkpoint(tmp_path / 'int8')
  # An index that puts a tensor in a shard that does not hold it (files of two downloads).
  save_model('llama3_gqa', tmp_path / 'sharded').save_pretrained(tmp_path / 'sharded',
                                                                 max_shard_size='40KB')
  index_path = tmp_path / 'sharded' / hf.SAFETENSORS_INDEX
  index = json.loads(index_path.read_text())
  owner = index['weight_map']['model.norm.weight']
  index['weight_map']['model.norm.weight'] = next(
      name for name in sorted(set(index['weight_map'].values())) if name != owner)
  index_path.write_text(json.dumps(index))
  with pytest.raises(UserError, match=r'puts model.norm.weight in model-\S+, but that file does '
                     'not hold it'):
    hf.load_checkpoint(tmp_path / 'sharded')


def test_safetensors_headers_are_checked_whole(tmp_path):
  import safetensors.numpy
  path = str(tmp_path / 'x.safetensors')
  safetensors.numpy.save_file({'a': np.zeros((2, 3), np.float32)}, path)
  assert hf.read_safetensors_header(path) == {
      'a': hf.TensorInfo('x.safetensors', 'F32', (2, 3))}
  size = os.path.getsize(path)
  with open(path, 'ab') as f:
    f.write(b'\0' * 4)
  with pytest.raises(UserError, match=rf'x.safetensors is {size + 4} bytes but its header '
                     rf'describes {size} \(the rest is not safetensors data\)'):
    hf.read_safetensors_header(path)

  def write(header, data_bytes, length=None):
    raw = json.dumps(header).encode()
    with open(path, 'wb') as f:
      f.write((len(raw) if length is None else length).to_bytes(8, 'little') + raw +
              b'\0' * data_bytes)

  write({'a': {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [0, 20]}}, 20)
  with pytest.raises(UserError, match='the entry of a is .* not a dtype, shape and matching '
                     'data_offsets'):
    hf.read_safetensors_header(path)
  write({'a': {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [0, 24]}}, 24, length=2**40)
  with pytest.raises(UserError, match='does not start with a safetensors header'):
    hf.read_safetensors_header(path)


def test_config_json_problems_are_user_errors(tmp_path):
  """Each names config.json; the sliding-window refusal stays a NotImplementedError too."""
  from jaxsft.interop import hf_config as hf_config_module
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'llama', 'vocab_size': 8}))
  with pytest.raises(UserError, match=r'config.json lacks hidden_size; jaxsft reads'):
    hf_config_module.read_hf_config(tmp_path)
  (tmp_path / 'config.json').write_text('[1, 2]')
  with pytest.raises(UserError, match=r'config.json holds a JSON list'):
    hf_config_module.read_hf_config(tmp_path)
  hf_config = dict(model_type='llama', vocab_size=8, hidden_size=8, intermediate_size=8,
                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=3)
  with pytest.raises(UserError, match='config.json: .*not a multiple of num_kv_heads=3'):
    config_from_hf(hf_config)
  hf_config.update(model_type='qwen2', num_hidden_layers=4, num_key_value_heads=2,
                   sliding_window=16, use_sliding_window=True, max_window_layers=2)
  with pytest.raises(UserError, match='mixes sliding-window and full-attention'):
    config_from_hf(hf_config)
