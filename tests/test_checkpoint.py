"""Checkpoints: exact resume after SIGTERM, resharding on restore, NaN stops with the last good
checkpoint intact, partial checkpoints ignored, unwritable work directories refused early."""

import hashlib
import os
import signal

import jax
import numpy as np
import pytest

from jaxsft.config import default_config
from jaxsft.data import pipeline as pipeline_lib
from jaxsft.errors import UserError
from jaxsft.train import checkpoint
from jaxsft.train.loop import EXIT_NON_FINITE, Preempted
from jaxsft.train.metrics import MetricWriter
from jaxsft.train.model_source import model_config_from
from jaxsft.train.optim import make_optimizer
from jaxsft.train.run import run_settings, train
from jaxsft.train.state import abstract_train_state

from conftest import llama2_tokenizer, shared_data

ARCH = {'vocab_size': 32000, 'hidden_size': 64, 'intermediate_size': 128, 'num_layers': 2,
        'num_heads': 4, 'num_kv_heads': 2, 'max_position_embeddings': 512}


def run_config(tmp_path, lora=False, mesh=(8, 1, 1), steps=12):
  config = default_config()
  config.model.architecture = ARCH
  config.model.dtype = 'float32'
  config.model.attention_implementation = 'xla'
  config.lora.enabled = lora
  config.lora.rank = 4
  config.lora.dropout = 0.1 if lora else 0.0  # dropout rngs must resume too
  config.data.datasets = [{'path': str(shared_data('instructions/alpaca_tiny.json'))}]
  config.data.tokenizer = str(llama2_tokenizer())
  config.data.max_seq_len = 128
  config.data.cache_dir = str(tmp_path / 'cache')
  config.batch_size = 8
  config.mesh.shape = mesh
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 2
  config.train.num_steps = steps
  config.train.neftune_alpha = 5.0
  config.train.log_every = 1
  config.train.progress_bar = False
  config.train.report_to = []
  config.checkpoint.save_every = 4
  config.checkpoint.async_save = True
  return config


@pytest.fixture
def seen_batches(monkeypatch):
  """Hashes of every training batch the data iterators hand out, in order."""
  seen = []
  original = pipeline_lib.Pipeline.train_batches

  def recording(self, state=None):
    iterator = original(self, state)
    original_next = type(iterator).__next__

    class Recording(type(iterator)):
      def __next__(inner):
        batch = original_next(inner)
        seen.append(hashlib.sha256(batch['inputs'].tobytes()).hexdigest()[:12])
        return batch

    iterator.__class__ = Recording
    return iterator

  monkeypatch.setattr(pipeline_lib.Pipeline, 'train_batches', recording)
  return seen


def sigterm_at(monkeypatch, step):
  """Sends this process a real SIGTERM when the metrics of `step` are written."""
  original = MetricWriter.write

  def write(self, at, scalars, prefix='train'):
    original(self, at, scalars, prefix)
    if at == step and prefix == 'train':
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(MetricWriter, 'write', write)
  return original


def host_params(result):
  return jax.device_get(result['state'].params)


# LoRA and QLoRA runs resume through the executable in tests/test_user_path.py, which also checks
# that their checkpoints hold no base weights.
def test_resume_after_sigterm_is_bitwise_exact(tmp_path, monkeypatch, seen_batches):
  straight = train(run_config(tmp_path), str(tmp_path / 'straight'))
  straight_batches = list(seen_batches)
  seen_batches.clear()

  original = sigterm_at(monkeypatch, 6)
  with pytest.raises(Preempted) as preempted:
    train(run_config(tmp_path), str(tmp_path / 'interrupted'))
  assert preempted.value.step == 6
  first_part = list(seen_batches)
  seen_batches.clear()
  monkeypatch.setattr(MetricWriter, 'write', original)
  resumed = train(run_config(tmp_path), str(tmp_path / 'interrupted'))
  assert resumed['steps'] == 12
  assert first_part[:6] + seen_batches == straight_batches  # the same batches, in order
  for x, y in zip(jax.tree_util.tree_leaves(host_params(resumed)),
                  jax.tree_util.tree_leaves(host_params(straight))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_onto_another_mesh(tmp_path, monkeypatch):
  def losses(workdir):
    import json
    with open(workdir / 'metrics.jsonl') as f:
      return {r['step']: r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r}

  train(run_config(tmp_path, mesh=(8, 1, 1)), str(tmp_path / 'straight'))
  original = sigterm_at(monkeypatch, 6)
  with pytest.raises(Preempted):
    train(run_config(tmp_path, mesh=(8, 1, 1)), str(tmp_path / 'moved'))
  monkeypatch.setattr(MetricWriter, 'write', original)
  train(run_config(tmp_path, mesh=(2, 2, 2)), str(tmp_path / 'moved'))
  straight, moved = losses(tmp_path / 'straight'), losses(tmp_path / 'moved')
  for step in range(7, 13):
    np.testing.assert_allclose(moved[step], straight[step], rtol=1e-5)


def test_nan_stops_with_exit_code_and_the_last_good_checkpoint_restores(tmp_path, monkeypatch):
  from jaxsft import cli
  original = pipeline_lib.Pipeline.train_batches

  def poisoned(self, state=None):
    iterator = original(self, state)
    original_next = type(iterator).__next__
    count = [0]

    class Poisoned(type(iterator)):
      def __next__(inner):
        batch = original_next(inner)
        count[0] += 1
        if count[0] == 7:  # the batch of step 7: ids past the vocabulary give NaN
          batch = {**batch, 'inputs': np.full_like(batch['inputs'], 10 ** 6)}
        return batch

    iterator.__class__ = Poisoned
    return iterator

  monkeypatch.setattr(pipeline_lib.Pipeline, 'train_batches', poisoned)
  config_file = tmp_path / 'run.py'
  config_file.write_text(
      'import sys\nsys.path.insert(0, %r)\nfrom test_checkpoint import run_config\n'
      'import pathlib\n\ndef get_config():\n  return run_config(pathlib.Path(%r))\n'
      % (os.path.dirname(__file__), str(tmp_path)))
  code = cli.main(['train', '--config', str(config_file), '--workdir', str(tmp_path / 'run')])
  assert code == EXIT_NON_FINITE
  saved = checkpoint.Checkpointer(str(tmp_path / 'run'))
  assert saved.latest_step() == 4  # step 8 would have been saved; step 7 went NaN first
  settings = run_settings(run_config(tmp_path))
  model_config, _ = model_config_from(settings.model, settings.lora, shapes_only=True)
  like = abstract_train_state(model_config, make_optimizer(settings.optim, 1)[0],
                              lora=settings.lora, quant=settings.quant)
  like = jax.tree_util.tree_map(
      lambda x: jax.random.key(0) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      else jax.numpy.zeros(x.shape, x.dtype), like)
  state, data_states, meta = saved.restore(4, like)
  assert int(state.step) == 4 and meta['config']['train']['num_steps'] == 12
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))
  assert data_states[0]['row'] > 0


def test_partial_checkpoints_are_never_resumed(tmp_path):
  config = run_config(tmp_path, steps=4)
  train(config, str(tmp_path / 'run'))
  partial = tmp_path / 'run' / 'checkpoints' / '8.orbax-checkpoint-tmp-1234567'
  partial.mkdir()
  (partial / 'junk').write_text('cut off mid-write')
  assert checkpoint.Checkpointer(str(tmp_path / 'run')).latest_step() == 4


def test_unwritable_work_directory_fails_at_start(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(UserError, match='not writable'):
    train(run_config(tmp_path), str(blocker / 'run'))
