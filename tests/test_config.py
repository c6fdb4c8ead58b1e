"""Configs: every default in one place, unknown keys are errors, overrides from the CLI."""

import pytest

from jaxsft.config import apply_override, dataset_spec, default_config, load_config


def write_config(tmp_path, body):
  path = tmp_path / 'run.py'
  path.write_text('from jaxsft.config import default_config\n\n'
                  'def get_config(arg=None):\n  config = default_config()\n' + body +
                  '  return config\n')
  return str(path)


def test_get_config_with_argument_and_overrides(tmp_path):
  path = write_config(tmp_path, "  config.data.datasets = [{'path': arg or 'x.json'}]\n")
  config = load_config(path + ':other.json', ['data.max_seq_len=512', 'data.template=chatml',
                                              'data.eval_size=3', 'data.streaming=True'])
  assert config.data.datasets == [{'path': 'other.json'}]
  assert (config.data.max_seq_len, config.data.template) == (512, 'chatml')
  assert config.data.eval_size == 3.0 and config.data.streaming is True


def test_unknown_keys_are_errors(tmp_path):
  with pytest.raises(AttributeError, match='max_seqlen'):
    load_config(write_config(tmp_path, '  config.data.max_seqlen = 5\n'))
  config = load_config(write_config(tmp_path, ''))
  with pytest.raises(KeyError, match="unknown key 'data.packng'"):
    apply_override(config, 'data.packng=greedy')
  with pytest.raises(KeyError, match="no config section 'daat'"):
    apply_override(config, 'daat.seed=1')
  with pytest.raises(ValueError, match=r"data.datasets\[0\]: unknown keys \['wieght'\]"):
    dataset_spec({'path': 'a.json', 'wieght': 2}, 'data.datasets[0]')
  with pytest.raises(TypeError):
    apply_override(config, 'data.max_seq_len=long')


def test_dataset_entries_get_defaults():
  spec = dataset_spec('a.jsonl', 'data.datasets[0]')
  assert spec['path'] == 'a.jsonl' and spec['weight'] == 1.0 and spec['format'] == 'auto'
  assert default_config().data.packing == 'bfd'


def test_cli_overrides_take_lists_tuples_and_refuse_unknown_keys():
  from jaxsft.cli import _load_config
  config = _load_config('configs/llama2_7b_lora.py', [
      "--config.data.datasets=[{'path': 'data/alpaca.json'}]", '--config.mesh.shape=(1,-1,1)',
      "--config.lora.targets=['q_proj']", '--config.model.path=',
      '--config.optim.learning_rate=1e-4', '--config.lora.enabled=False'])
  assert config.data.datasets == [{'path': 'data/alpaca.json'}]
  assert tuple(config.mesh.shape) == (1, -1, 1) and list(config.lora.targets) == ['q_proj']
  assert config.model.path == '' and config.optim.learning_rate == 1e-4
  assert config.lora.enabled is False
  with pytest.raises(SystemExit, match="unknown key 'optim.learnin_rate'"):
    _load_config('configs/llama2_7b_lora.py', ['--config.optim.learnin_rate=1'])
  with pytest.raises(SystemExit, match='cannot be casted'):
    _load_config('configs/llama2_7b_lora.py', ['--config.batch_size=big'])
