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


def test_what_goes_wrong_in_a_config_file_is_one_line_naming_it(tmp_path):
  """Any exception of the file's own code, a result that is not a ConfigDict, and values the
  locked ConfigDict lets through (None, a replaced section, list items, a config built from
  scratch): `tests/test_broken_inputs.py` drives the rest through the executable."""
  cases = [
      ('  config.batch_size = 8 // 0\n',
       r'run.py, line 5: ZeroDivisionError: integer division or modulo by zero; fix the config '
       r'file \(--debug shows the traceback\)\.$'),
      ("  config.data.clean = {'enabled': True}\n",
       r"run.py, line 5: the config lacks the setting 'data.clean.against'.*replaces all of it"),
      ("  config.lora.targets = ['q_proj', 3]\n",
       r"run.py, line 5: lora.targets is a list \(\['q_proj', 3\]\), but lora.targets takes a "
       r'list of strings'),
      ('  config.optim.b1 = None\n', r'run.py, line 5: optim.b1 is None, but optim.b1 takes a '
       r'number \(its default is 0.9\)'),
      ('  config = None\n', r'run.py: get_config\(\) returned None \(a NoneType\), not an '
       r'ml_collections.ConfigDict'),
  ]
  for body, expected in cases:
    with pytest.raises(UserError, match=expected):
      load_config(write_config(tmp_path, body))
  path = tmp_path / 'run.py'
  path.write_text('import jaxsft_settings_of_mine\n')
  with pytest.raises(UserError, match=r"run.py, line 1: ModuleNotFoundError: No module named "
                     r"'jaxsft_settings_of_mine'"):
    load_config(str(path))
  path.write_text('import ml_collections\n\ndef get_config():\n'
                  '  return ml_collections.ConfigDict({"batch_size": 4})\n')
  with pytest.raises(UserError, match=r"run.py: the config lacks the setting 'checkpoint'; "
                     r'start from jaxsft.config.default_config\(\)'):
    load_config(str(path))


def test_integers_are_numbers_and_nothing_else_changes_type(tmp_path):
  config = load_config(write_config(tmp_path, '  config.optim.learning_rate = 1\n'
                                    '  config.mesh.shape = [1, -1, 1]\n'),
                       ['optim.b2=1', 'lora.targets=("q_proj",)'])
  assert config.optim.learning_rate == 1.0 and config.optim.b2 == 1.0
  assert tuple(config.mesh.shape) == (1, -1, 1) and list(config.lora.targets) == ['q_proj']
  with pytest.raises(UserError, match='optim.b1=True: expected float, got bool True'):
    apply_override(config, 'optim.b1=True')  # ml_collections would make it 1.0
  with pytest.raises(UserError, match='data.clean is a section of settings; set them one by '
                     'one'):
    apply_override(config, "data.clean={'enabled': True}")
