"""`jaxsft export` writes only what it owns: into a new or empty folder, or over an earlier
jaxsft export of the same format (its `jaxsft_export.json`), leaving other files alone; never
over the run's base or tokenizer folder or the work directory's own files; through a folder
beside the target, so that a failed export leaves the target as it was. Driven through the
installed executable on one tiny finished LoRA run; refusals come before JAX loads (fast).
"""

import hashlib
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from user_path import ALPACA, REPO, run, tiny_model, write_config, write_json

from jaxsft.errors import UserError
from jaxsft.interop import hf
from jaxsft.train import export

MARKER = 'jaxsft_export.json'

SETTINGS = {
    'model.dtype': 'float32', 'model.attention_implementation': 'xla', 'lora.enabled': True,
    'lora.rank': 4, 'lora.alpha': 8.0, 'data.template': 'chatml', 'data.max_seq_len': 64,
    'batch_size': 2, 'train.num_steps': 2, 'train.report_to': [],
    'checkpoint.save_every': 0}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(base model folder, tokenizer folder, work directory) of a finished 2-step LoRA run whose
  tokenizer is a folder of its own."""
  root = tmp_path_factory.mktemp('export_safety')
  model = tiny_model(root / 'model')
  tokenizer = root / 'tokenizer'
  tokenizer.mkdir()
  for name in hf.TOKENIZER_FILES:
    if (model / name).exists():
      shutil.copy(model / name, tokenizer / name)
  config = write_config(root / 'lora.py', {
      **SETTINGS, 'model.path': str(model), 'data.tokenizer': str(tokenizer),
      'data.datasets': [{'path': str(write_json(root / 'a.json', ALPACA))}],
      'data.cache_dir': str(root / 'cache')})
  workdir = root / 'run'
  run(['train', '--config', str(config), '--workdir', str(workdir)], REPO)
  return model, tokenizer, workdir


@pytest.fixture(scope='module')
def merged(trained):
  """A merged export into a folder that already held two unrelated files."""
  _, _, workdir = trained
  out = workdir.parent / 'shared_folder'
  out.mkdir()
  save_file({'score.weight': np.ones((2, 3), np.float32)}, str(out / 'reward_model.safetensors'))
  (out / 'notes.txt').write_text('keep me')
  before = _digest(out)
  export_cli(workdir, 'merged', out)
  return out, before


@pytest.fixture(scope='module')
def adapter(trained):
  """A PEFT export into a new folder inside the work directory (allowed: not the run's own)."""
  _, _, workdir = trained
  out = workdir / 'export' / 'peft'
  export_cli(workdir, 'peft', out)
  return out


def export_cli(workdir, fmt, out, check_rc=0):
  return run(['export', '--workdir', str(workdir), '--format', fmt, '--out', str(out)], REPO,
             check_rc=check_rc)


def refused(workdir, fmt, out):
  """The one error line of an export that must be refused with exit code 2."""
  result = export_cli(workdir, fmt, out, check_rc=2)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert 'Traceback' not in result.stderr, result.stderr
  assert lines[-1].startswith('jaxsft: error: '), result.stderr
  return lines[-1]


def _digest(folder: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def _marker(folder: pathlib.Path) -> dict:
  return json.loads((folder / MARKER).read_text())


def _no_staging_left(parent: pathlib.Path):
  assert not [p.name for p in parent.iterdir() if '.jaxsft-tmp-' in p.name]


def test_merged_export_leaves_unrelated_files_and_loads(merged, trained):
  import torch
  import transformers
  out, before = merged
  after = _digest(out)
  for name in ('reward_model.safetensors', 'notes.txt'):
    assert after[name] == before[name]
  marker = _marker(out)
  assert marker['format'] == 'merged' and marker['step'] == 2
  assert marker['workdir'] == str(trained[2])
  assert sorted(marker['files']) == sorted(set(after) - {'reward_model.safetensors',
                                                          'notes.txt', MARKER})
  assert 'model.safetensors' in marker['files'] and 'config.json' in marker['files']
  _no_staging_left(out.parent)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  with safe_open(str(out / 'model.safetensors'), 'np') as f:
    assert sorted(f.keys()) == sorted(model.state_dict())
  assert transformers.AutoTokenizer.from_pretrained(out).chat_template


def test_an_export_over_the_other_format_is_refused(merged, adapter, trained, tmp_path):
  workdir = trained[2]
  peft_copy = pathlib.Path(shutil.copytree(adapter, tmp_path / 'adapter'))
  merged_copy = pathlib.Path(shutil.copytree(merged[0], tmp_path / 'merged'))
  peft_before, merged_before = _digest(peft_copy), _digest(merged_copy)
  assert {'adapter_config.json', 'adapter_model.safetensors'} <= set(peft_before)
  assert _marker(adapter)['format'] == 'peft'  # written into a new folder of the work directory
  assert 'peft export' in refused(workdir, 'merged', peft_copy)
  assert 'merged export' in refused(workdir, 'peft', merged_copy)
  assert _digest(peft_copy) == peft_before and _digest(merged_copy) == merged_before
  _no_staging_left(tmp_path)


def test_base_and_tokenizer_folders_are_refused_and_the_run_still_exports(merged, trained,
                                                                          tmp_path):
  """Refused, and the base stays bit-identical: the run's next export (over its earlier one)
  works, replacing exactly that export's files. The earlier export was sharded and copied a
  tokenizer.model: its shards, index and tokenizer.model go; the unrelated files and a user's
  own shard-like file stay."""
  model, tokenizer, workdir = trained
  base_before, tokenizer_before = _digest(model), _digest(tokenizer)
  assert "the run's base model folder" in refused(workdir, 'merged', model)
  (tmp_path / 'link').symlink_to(model)  # the same folder under another name
  assert "the run's base model folder" in refused(workdir, 'merged', tmp_path / 'link')
  assert "the run's tokenizer folder" in refused(workdir, 'peft', tokenizer)
  assert _digest(model) == base_before and _digest(tokenizer) == tokenizer_before

  out = pathlib.Path(shutil.copytree(merged[0], tmp_path / 'out'))
  marker = _marker(out)
  stale = ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors',
           'model.safetensors.index.json', 'tokenizer.model']
  for name in stale:
    (out / name).write_text('from the earlier export')
  marker['files'] += stale
  (out / MARKER).write_text(json.dumps(marker))
  (out / 'model-draft.safetensors').write_text('not an export file')
  (out / 'model.safetensors').write_text('the earlier export')  # replaced by a readable one
  before = _digest(out)
  export.export_run(str(workdir), 'merged', str(out))  # in process: no second JAX import
  after = _digest(out)
  assert not set(stale) & set(after)
  for name in ('reward_model.safetensors', 'notes.txt', 'model-draft.safetensors'):
    assert after[name] == before[name]
  assert sorted(_marker(out)['files']) == sorted(set(after) - {
      'reward_model.safetensors', 'notes.txt', 'model-draft.safetensors', MARKER})
  with safe_open(str(out / 'model.safetensors'), 'np') as new, \
      safe_open(str(merged[0] / 'model.safetensors'), 'np') as first:
    assert sorted(new.keys()) == sorted(first.keys())
  _no_staging_left(tmp_path)


def test_the_work_directory_and_its_files_are_refused(trained):
  workdir = trained[2]
  before = _digest(workdir)
  assert 'the work directory' in refused(workdir, 'merged', workdir)
  assert 'which the run writes' in refused(workdir, 'peft', workdir / 'checkpoints')
  assert _digest(workdir) == before
  _no_staging_left(workdir)


def test_unwritable_targets_are_one_line_errors(trained, tmp_path):
  workdir = trained[2]
  (tmp_path / 'somefile').write_text('a file')
  assert 'is a file' in refused(workdir, 'peft', tmp_path / 'somefile')
  assert 'which is a file' in refused(workdir, 'peft', tmp_path / 'somefile' / 'out')
  # A folder even root cannot write to (sysfs).
  assert 'cannot write the export to /sys/jaxsft-export' in refused(workdir, 'peft',
                                                                     '/sys/jaxsft-export')
  assert (tmp_path / 'somefile').read_text() == 'a file'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['somefile']


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes to read-only folders')
def test_a_read_only_folder_is_a_one_line_error(trained, tmp_path):
  locked = tmp_path / 'locked'
  locked.mkdir(mode=0o500)
  try:
    assert 'cannot write the export to' in refused(trained[2], 'peft', locked / 'out')
  finally:
    locked.chmod(0o700)


@pytest.mark.parametrize('name', ['config.json', 'model.safetensors'])
def test_a_clash_with_a_foreign_file_is_refused_before_anything_is_written(trained, tmp_path,
                                                                           name):
  out = tmp_path / 'out'
  out.mkdir()
  (out / name).write_text('not from jaxsft')
  (out / 'notes.txt').write_text('keep me')
  before = _digest(out)
  assert name in refused(trained[2], 'merged', out)
  assert _digest(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_a_failed_or_non_writing_export_leaves_the_target_as_it_was(adapter, trained, tmp_path,
                                                                    monkeypatch):
  """In process: a write that fails after the weights were written (disk full), and a process
  other than 0 of a multi-host export, change nothing; the export knows every file it writes."""
  out = pathlib.Path(shutil.copytree(adapter, tmp_path / 'out'))
  before = _digest(out)

  def full_disk(folder, template):
    raise OSError(28, 'No space left on device', str(folder))

  monkeypatch.setattr(hf, 'write_chat_template', full_disk)
  with pytest.raises(UserError, match='cannot write the export to .*No space left on device'):
    export.export_run(str(trained[2]), 'peft', str(out))
  assert _digest(out) == before
  monkeypatch.undo()
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  export.export_run(str(trained[2]), 'peft', str(tmp_path / 'elsewhere'))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
  assert set(hf.TOKENIZER_FILES) <= export.EXPORT_FILES


def test_save_checkpoint_replaces_only_the_checkpoint_it_replaces(tmp_path):
  """The library call: into a folder holding a sharded checkpoint and other `*.safetensors`, a
  single-file save removes the old shards and index (transformers would read them first) and
  nothing else."""
  from hf_reference import save_model
  save_model('llama3_gqa', tmp_path / 'original')
  config, params = hf.load_checkpoint(tmp_path / 'original')
  out = tmp_path / 'out'
  out.mkdir()
  save_file({'score.weight': np.ones((2, 3), np.float32)}, str(out / 'reward_model.safetensors'))
  (out / 'adapter_model.safetensors').write_bytes((out / 'reward_model.safetensors').read_bytes())
  hf.save_checkpoint(out, config, params, max_shard_bytes=60_000)
  assert (out / hf.SAFETENSORS_INDEX).exists()
  hf.save_checkpoint(out, config, params)
  assert sorted(p.name for p in out.iterdir()) == [
      'adapter_model.safetensors', 'config.json', 'model.safetensors', 'reward_model.safetensors']
  _, again = hf.load_checkpoint(out)
  for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
