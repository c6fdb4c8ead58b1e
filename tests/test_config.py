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
