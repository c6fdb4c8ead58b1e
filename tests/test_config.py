"""Configs: every default in one place, unknown keys are errors, overrides from the CLI."""

import pytest

from jaxsft.config import apply_override, default_config, load_config
from jaxsft.data.spec import dataset_spec
from jaxsft.errors import UserError


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
  with pytest.raises(UserError, match=r"run.py, line 5: unknown setting 'max_seqlen'. Did you "
                     "mean 'max_seq_len'"):
    load_config(write_config(tmp_path, '  config.data.max_seqlen = 5\n'))
  config = load_config(write_config(tmp_path, ''))
  with pytest.raises(UserError, match="data.packng: unknown key. Did you mean 'data.packing'"):
    apply_override(config, 'data.packng=greedy')
  with pytest.raises(UserError, match="there is no config section 'daat'"):
    apply_override(config, 'daat.seed=1')
  with pytest.raises(ValueError, match=r"data.datasets\[0\]: unknown keys \['wieght'\]"):
    dataset_spec({'path': 'a.json', 'wieght': 2}, 'data.datasets[0]')
  with pytest.raises(UserError, match='expected'):
    apply_override(config, 'data.max_seq_len=long')


def test_dataset_entries_get_defaults():
  spec = dataset_spec('a.jsonl', 'data.datasets[0]')
  assert spec['path'] == 'a.jsonl' and spec['weight'] == 1.0 and spec['format'] == 'auto'
  assert default_config().data.packing == 'bfd'


def test_overrides_take_lists_tuples_and_refuse_unknown_keys():
  """The loader the CLI uses (tests/test_user_path.py drives it through the executable)."""
  config = load_config('configs/llama2_7b_lora.py', [
      "data.datasets=[{'path': 'data/alpaca.json'}]", 'mesh.shape=(1,-1,1)',
      "lora.targets=['q_proj']", 'model.path=', 'optim.learning_rate=1e-4',
      'lora.enabled=false'])
  assert config.data.datasets == [{'path': 'data/alpaca.json'}]
  assert tuple(config.mesh.shape) == (1, -1, 1) and list(config.lora.targets) == ['q_proj']
  assert config.model.path == '' and config.optim.learning_rate == 1e-4
  assert config.lora.enabled is False
  with pytest.raises(UserError, match="Did you mean 'optim.learning_rate'"):
    load_config('configs/llama2_7b_lora.py', ['optim.learnin_rate=1'])
  with pytest.raises(UserError, match='batch_size=big: expected int'):
    load_config('configs/llama2_7b_lora.py', ['batch_size=big'])
