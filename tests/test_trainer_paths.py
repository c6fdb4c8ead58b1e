"""What the trainer does between steps, checked on its runs: `train.eval_every` evaluates at its
multiples and at the last step, and that last eval is what `jaxsft eval` reports for the run;
`train.grad_accum_steps` on a (2, 2, 2) mesh of 8 devices logs the losses of one big batch;
NEFTune changes the training loss and never the evaluation of a state.

The two LoRA runs go through the `jaxsft` executable on 8 fake CPU devices (XLA_FLAGS, as a
user tries a mesh on one machine); `jaxsft eval` (`jaxsft.cli.main`) and the NEFTune run
(`jaxsft.train.run.train`) run in this process (conftest's 8 devices): a process start and its
compiles cost more than the checks.
"""

import fcntl
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from user_path import ALPACA, REPO, run, tiny_model, write_config, write_json

from jaxsft import cli
from jaxsft.config import default_config
from jaxsft.train.run import train

EIGHT_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
MESH_LOG = "on mesh {'data': 2, 'fsdp': 2, 'context': 1, 'tensor': 2}"
NUM_STEPS = 4

# Held-out records (none of them is in ALPACA): the runs' eval data.
EVAL = [{'instruction': 'Name a fruit.', 'input': '', 'output': 'An apple.'},
        {'instruction': 'Spell the word.', 'input': 'dog', 'output': 'd-o-g'},
        {'instruction': 'What is 1 + 1?', 'input': '', 'output': '2'}]


def settings(root: pathlib.Path) -> dict:
  """A float32 LoRA run (dropout 0: the steps are deterministic) on a (2, 2, 2) mesh. Warmup of
  one step: the first step's learning rate is 0, so every run's state after step 1 is the base
  model's, which the NEFTune check evaluates; the three steps after it train (lr 1e-2)."""
  return {
      'model.path': str(root / 'model'), 'model.dtype': 'float32',
      'model.attention_implementation': 'xla',
      'lora.enabled': True, 'lora.rank': 4, 'lora.alpha': 8.0, 'lora.dropout': 0.0,
      'data.datasets': [{'path': str(root / 'train.json')}],
      'data.eval_datasets': [{'path': str(root / 'eval.json')}],
      'data.template': 'chatml', 'data.max_seq_len': 64, 'data.cache_dir': str(root / 'cache'),
      'batch_size': 8, 'mesh.shape': (2, 2, 2),
      'optim.learning_rate': 1e-2, 'optim.warmup_steps': 1,
      'train.num_steps': NUM_STEPS, 'train.log_every': 1, 'train.progress_bar': False,
      'train.report_to': [],
  }


def records(workdir: pathlib.Path, prefix: str) -> dict[int, dict]:
  """`metrics.jsonl` records with `prefix/` keys, by step; a step logged twice fails here."""
  out = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    values = {k.split('/', 1)[1]: v for k, v in record.items() if k.startswith(prefix + '/')}
    if values:
      assert record['step'] not in out, f'{prefix} logged twice at step {record["step"]}'
      out[record['step']] = values
  return out


RUNS = {'whole': ['--config.train.eval_every=3'],
        'accumulated': ['--config.train.eval_every=1', '--config.train.grad_accum_steps=2']}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two runs of the same LoRA config through the executable: `whole` (grad_accum_steps 1,
  eval_every 3) and `accumulated` (grad_accum_steps 2, eval_every 1).

  Made once per session: the suite's work stealing may hand this module's tests to both xdist
  workers, whose base temps share the session's folder; the first makes the runs under a lock,
  the other waits and reads them."""
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = tmp_path_factory.getbasetemp().parent / 'trainer_paths'
    root.mkdir(exist_ok=True)
  else:
    root = tmp_path_factory.mktemp('trainer_paths')
  with open(root / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = root / 'logs.json'
    if not done.exists():
      for name in ('model', 'cache', *RUNS):  # what a worker that failed here left
        shutil.rmtree(root / name, ignore_errors=True)
      tiny_model(root / 'model')
      write_json(root / 'train.json', ALPACA)
      write_json(root / 'eval.json', EVAL)
      config = write_config(root / 'lora.py', settings(root))
      logs = {name: run(['train', '--config', config, '--workdir', str(root / name),
                         *overrides], REPO, extra_env=EIGHT_DEVICES).stderr
              for name, overrides in RUNS.items()}
      done.write_text(json.dumps(logs))
  return {'root': root, 'logs': json.loads(done.read_text()), **{name: root / name
                                                                for name in RUNS}}


def test_eval_every_evaluates_at_its_multiples_and_the_last_step(runs, tmp_path):
  for name, every in (('whole', 3), ('accumulated', 1)):
    assert MESH_LOG in runs['logs'][name]
    assert sorted(records(runs[name], 'train')) == list(range(1, NUM_STEPS + 1))
    # Multiples of eval_every before the last step, then the last step once (4 is both a
    # multiple of 1 and the last step of `accumulated`: one record, `records` checks).
    expected = [s for s in range(1, NUM_STEPS) if s % every == 0] + [NUM_STEPS]
    assert sorted(records(runs[name], 'eval')) == expected, name

  # The last eval is the eval of the final state on the run's eval data: what `jaxsft eval
  # --workdir` (its default data: the run's eval_datasets) reports. Both sum per-token losses
  # over the same packed rows in float32, in another order (8 devices vs the eval's batches).
  # `jaxsft eval` runs in this process (`cli.main`, the executable's entry point): one process
  # start and compile fewer than the executable.
  assert cli.main(['eval', '--workdir', str(runs['whole']), '--out',
                   str(tmp_path / 'report.json')]) == 0
  report = json.loads((tmp_path / 'report.json').read_text())
  final = records(runs['whole'], 'eval')[NUM_STEPS]
  assert report['data'].endswith('eval.json')
  assert final['supervised_tokens'] == report['supervised_tokens'] > 0
  np.testing.assert_allclose(final['loss'], report['nll'], rtol=1e-5)
  np.testing.assert_allclose(final['accuracy'], report['accuracy'], rtol=1e-6)
  np.testing.assert_allclose(final['perplexity'], report['perplexity'], rtol=1e-5)
  # The eval changed as the adapters trained (else "the final state" would not be tested).
  first = records(runs['accumulated'], 'eval')[1]
  assert abs(first['loss'] - final['loss']) > 1e-3


def test_gradient_accumulation_on_a_mesh_logs_the_losses_of_one_batch(runs):
  """Two micro-batches of 4 rows, each spread over the 4 data x fsdp devices, against one batch
  of 8 rows. The loss is the summed token loss over the batch's supervised tokens either way;
  in float32 only the summation order differs: measured, the losses and grad norms agree to
  1e-7 relative after 3 updates (float32 model, lora dropout 0). rtol 1e-5 leaves room for
  other CPUs' reduction orders and is 40x below what a wrong accumulation gives here: each
  micro-batch normalised by its own supervised tokens, then averaged, logs 4.6271 for 4.6253 at
  step 2 (4e-4), where the micro-batches hold different numbers of supervised tokens."""
  whole, accumulated = records(runs['whole'], 'train'), records(runs['accumulated'], 'train')
  for step in range(1, NUM_STEPS + 1):
    assert whole[step]['supervised_tokens'] == accumulated[step]['supervised_tokens']
    np.testing.assert_allclose(accumulated[step]['loss'], whole[step]['loss'], rtol=1e-5,
                               err_msg=f'step {step}')
    np.testing.assert_allclose(accumulated[step]['grad_norm'], whole[step]['grad_norm'],
                               rtol=1e-5, err_msg=f'step {step}')
  # The runs trained (lr 0 at step 1, then 1e-2): the later losses test the updates too.
  assert whole[1]['lr'] == 0 and whole[2]['lr'] > 0
  assert whole[NUM_STEPS]['loss'] < whole[2]['loss'] - 0.05
  # And the state after them evaluates the same.
  np.testing.assert_allclose(records(runs['accumulated'], 'eval')[NUM_STEPS]['loss'],
                             records(runs['whole'], 'eval')[NUM_STEPS]['loss'], rtol=1e-5)


def test_neftune_changes_training_only(runs, tmp_path):
  """The `accumulated` run again with NEFTune (alpha 5, the paper's): its first step's training
  loss moves (the noise is on), while its eval of the state after step 1 (the base model: lr 0)
  equals the noise-free run's eval of that same state."""
  config = default_config()
  for key, value in settings(runs['root']).items():
    section, _, name = key.rpartition('.')
    setattr(config[section] if section else config, name, value)
  config.train.grad_accum_steps = 2
  config.train.num_steps = 1
  config.train.neftune_alpha = 5.0
  config.data.cache_dir = str(tmp_path / 'cache')  # not the runs' (another worker may read it)
  result = train(config, str(tmp_path / 'neftune'))
  assert result['steps'] == 1

  plain_train = records(runs['accumulated'], 'train')[1]
  plain_eval = records(runs['accumulated'], 'eval')[1]
  noisy_train = records(tmp_path / 'neftune', 'train')[1]
  noisy_eval = records(tmp_path / 'neftune', 'eval')[1]
  assert noisy_train['lr'] == plain_train['lr'] == 0
  assert noisy_train['supervised_tokens'] == plain_train['supervised_tokens']
  assert abs(noisy_train['loss'] - plain_train['loss']) > 1e-3 * plain_train['loss']
  # This process and the executable's compile the eval at other XLA optimisation levels
  # (conftest.py): the same float32 arithmetic, possibly fused in another order.
  assert noisy_eval['supervised_tokens'] == plain_eval['supervised_tokens']
  np.testing.assert_allclose(noisy_eval['loss'], plain_eval['loss'], rtol=1e-6)
  np.testing.assert_allclose(noisy_eval['accuracy'], plain_eval['accuracy'], rtol=1e-6)
