"""Broken inputs as a user hands them to the installed `jaxsft` executable: an HF folder whose
config.json does not describe its weights, a damaged safetensors file or config.json, a config
file that does not run or sets a value of the wrong type. Each ends in one line `jaxsft: error:
...` that names the file (and the tensor or the line) and the fix, with exit code 2 and no
traceback, whichever command meets it (issue 24).

One tiny model folder is built per module; each test breaks a copy of it. Most folder cases go
through `jaxsft info` (no compile); `generate` and `train` are shown to give the same line.
"""

import json
import os
import pathlib
import shutil

import pytest
from safetensors.numpy import load_file, save_file
from user_path import ALPACA, REPO, run, tiny_model, write_json

NOT_THEIRS = 'does not belong to these weights: use the config.json saved with them'


def one_error_line(result):
  """The `jaxsft: error:` line of a run that exited 2, after checking it printed no traceback."""
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith('jaxsft: error: '), result.stderr
  return lines[-1]


def info_error(folder):
  return one_error_line(run(['info', str(folder)], REPO, check_rc=None))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """A tiny HF model folder (transformers wrote it) with its tokenizer; tests break copies."""
  return tiny_model(tmp_path_factory.mktemp('broken') / 'model')


def copy_of(model, tmp_path, **config_changes):
  """A copy of the model folder, with `config_changes` written into its config.json."""
  folder = pathlib.Path(shutil.copytree(model, tmp_path / 'model'))
  if config_changes:
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**config, **config_changes}))
  return folder


# ------------------------------------------------------------ config.json is not the weights'


@pytest.mark.parametrize('change, expected', [
    # The vocabulary: the first tensor's shape differs.
    ({'vocab_size': 202}, 'config.json says vocab_size 202 but model.embed_tokens.weight in '
     '{weights} is [101, 64] (expected [202, 64])'),
    # One layer configured, two stored: today's loader would drop the second without a word.
    ({'num_hidden_layers': 1}, 'config.json says num_hidden_layers 1 but {weights} holds 2 '
     'layers'),
], ids=['vocab_size', 'num_hidden_layers'])
def test_info_refuses_a_config_json_that_does_not_describe_the_weights(model, tmp_path, change,
                                                                        expected):
  folder = copy_of(model, tmp_path, **change)
  line = info_error(folder)
  assert expected.format(weights=folder / 'model.safetensors') in line
  assert f'{folder / "config.json"} {NOT_THEIRS}' in line


def _drop_tensor(tensors):
  del tensors['model.layers.1.mlp.down_proj.weight']


def _add_bias(tensors):  # as if the weights had attention biases the config does not have
  tensors['model.layers.1.self_attn.q_proj.bias'] = tensors['model.norm.weight']


@pytest.mark.parametrize('change, expected', [
    (_drop_tensor, '{weights} lacks 1 tensors that {config} requires, e.g. '
     'model.layers.1.mlp.down_proj.weight; the weights are incomplete (download them again)'),
    (_add_bias, 'model.layers.1.self_attn.q_proj.bias in {weights} is not a tensor of the llama '
     'model that {config} describes'),
], ids=['missing', 'extra'])
def test_info_refuses_a_missing_or_an_extra_tensor(model, tmp_path, change, expected):
  folder = copy_of(model, tmp_path)
  tensors = load_file(folder / 'model.safetensors')
  change(tensors)
  save_file(tensors, folder / 'model.safetensors', {'format': 'pt'})
  line = info_error(folder)
  assert expected.format(weights=folder / 'model.safetensors',
                         config=folder / 'config.json') in line
  assert NOT_THEIRS in line


def test_generate_train_and_info_give_the_same_line(model, tmp_path):
  """The check is in the loader, so every command that reads the folder stops the same way
  (before anything is compiled): hidden_size 32 on weights of hidden size 64."""
  folder = copy_of(model, tmp_path, hidden_size=32)
  expected = (f'jaxsft: error: config.json says hidden_size 32 but model.embed_tokens.weight in '
              f'{folder / "model.safetensors"} is [101, 64] (expected [101, 32]); '
              f'{folder / "config.json"} {NOT_THEIRS}.')
  assert info_error(folder) == expected
  generated = run(['generate', '--hf', str(folder), '--prompt', 'hi'], REPO, check_rc=None)
  assert one_error_line(generated) == expected
  config = tmp_path / 'run.py'
  config.write_text(
      'from jaxsft.config import default_config\n\n\ndef get_config():\n'
      '  config = default_config()\n'
      f'  config.model.path = {str(folder)!r}\n'
      f"  config.data.datasets = [{{'path': {str(write_json(tmp_path / 'a.json', ALPACA))!r}}}]\n"
      "  config.data.template = 'chatml'\n  config.data.max_seq_len = 64\n"
      '  config.batch_size = 2\n  config.train.num_steps = 1\n  return config\n')
  trained = run(['train', '--config', str(config), '--workdir', str(tmp_path / 'run')], REPO,
                check_rc=None)
  assert one_error_line(trained) == expected


# ------------------------------------------------------------------------------ damaged files


def _truncate(folder):
  path = folder / 'model.safetensors'
  size = os.path.getsize(path)
  os.truncate(path, size - 1000)  # a download cut short
  return (f'{path} is cut short: it is {size - 1000:,} bytes but its header describes '
          f'{size:,}; download or copy it again')


def _garble_header(folder):
  path = folder / 'model.safetensors'
  with open(path, 'r+b') as f:
    f.seek(8)
    f.write(b'\x00' * 16)
  return f'{path} has a garbled safetensors header'


def _break_config_json(folder):
  (folder / 'config.json').write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}')
  return f'{folder / "config.json"} is not valid JSON (Expecting property name enclosed in ' \
         'double quotes: line 2 column 21'


def _lose_a_shard(folder):
  """A sharded checkpoint (index + 2 files) whose first shard never arrived."""
  names = sorted(load_file(folder / 'model.safetensors'))
  weight_map = {name: f'model-0000{1 + i % 2}-of-00002.safetensors'
                for i, name in enumerate(names)}
  (folder / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  os.replace(folder / 'model.safetensors', folder / 'model-00002-of-00002.safetensors')
  return (f'{folder / "model.safetensors.index.json"} puts {len(names[::2])} tensors (e.g. '
          f'{names[0]}) in model-00001-of-00002.safetensors, which is not in {folder}; download '
          'the missing shard again')


@pytest.mark.parametrize('damage', [_truncate, _garble_header, _break_config_json,
                                    _lose_a_shard])
def test_info_names_a_damaged_file(model, tmp_path, damage):
  folder = copy_of(model, tmp_path)
  expected = damage(folder)
  assert expected in info_error(folder)


# ------------------------------------------------------------------------------- config files


@pytest.mark.parametrize('body, expected', [
    ('  config = default_config(\n  return config\n',
     "{path}, line 5: SyntaxError: '(' was never closed"),
    # The locked ConfigDict refuses the assignment; the line is the file's.
    ('  config = default_config()\n  config.batch_size = "four"\n  return config\n',
     "{path}, line 6: batch_size takes an integer, not 'four' (a str); each setting keeps the "
     'type of its default in jaxsft/config.py'),
    # ... but takes None: the check of every setting against its default's type finds it.
    ('  config = default_config()\n  config.data.template = None\n  return config\n',
     "{path}, line 6: data.template is None, but data.template takes a string (its default is "
     "'llama2')"),
    ("  return {'batch_size': 4}\n", "{path}: get_config() returned {{'batch_size': 4}} (a "
     'dict), not an ml_collections.ConfigDict; start from config = '
     'jaxsft.config.default_config()'),
], ids=['syntax error', 'wrong type', 'None', 'a dict'])
def test_a_broken_config_file_is_one_line_naming_its_line(tmp_path, body, expected):
  path = tmp_path / 'run.py'
  path.write_text('from jaxsft.config import default_config\n\n\ndef get_config(arg=None):\n'
                  + body)
  line = one_error_line(run(['data', 'inspect', '--config', str(path)], REPO, check_rc=None))
  assert f'config file {expected.format(path=path)}' in line


def test_an_override_of_the_wrong_type_is_one_line(tmp_path):
  """ml_collections takes None for any setting; the override is checked against the default's
  type first."""
  path = tmp_path / 'run.py'
  path.write_text('from jaxsft.config import default_config\n\n\ndef get_config():\n'
                  '  return default_config()\n')
  result = run(['data', 'inspect', '--config', str(path), '--config.data.template=None'], REPO,
               check_rc=None)
  assert one_error_line(result) == (
      'jaxsft: error: --config.data.template=None: expected str, got None; each setting keeps '
      'the type of its default in jaxsft/config.py.')


# --------------------------------------------------------------------------------- data files


def test_a_data_file_that_is_not_text_is_one_line_and_nothing_else(model, tmp_path):
  """A .json file of Latin-1 bytes (or no text at all) and a .parquet file that is not one:
  the one error line names the file (and the line), and `datasets`' own error log lines about
  the parse do not precede it."""
  latin1 = tmp_path / 'latin1.json'
  latin1.write_bytes(b'[{"instruction": "Caf\xe9?",\n"output": "oui"}]')
  not_parquet = tmp_path / 'data.parquet'
  not_parquet.write_bytes(os.urandom(2048))
  path = tmp_path / 'run.py'
  path.write_text('from jaxsft.config import default_config\n\n\ndef get_config(arg):\n'
                  '  config = default_config()\n'
                  f'  config.model.path = {str(model)!r}\n'
                  "  config.data.template = 'chatml'\n"
                  "  config.data.datasets = [{'path': arg}]\n"
                  '  return config\n')
  for data, expected in [
      (latin1, f'dataset file {latin1}, line 1: byte {latin1.read_bytes().index(0xe9)} is not '
       'UTF-8 (invalid continuation byte); JSON data files are UTF-8 text'),
      (not_parquet, f"could not load dataset '{not_parquet}' (split 'train'): Parquet magic "
       'bytes not found in footer')]:
    result = run(['data', 'inspect', '--config', f'{path}:{data}'], REPO, check_rc=None)
    assert expected in one_error_line(result)
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        one_error_line(result)], result.stderr
