"""Two local JAX processes (4 CPU devices each, gloo collectives) train on a global (2,2,2)
mesh and match one process with 8 devices; their checkpoint restores in one process."""

import json
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
from test_checkpoint import run_config

from jaxsft.train import checkpoint
from jaxsft.train.run import train

from conftest import shared_data


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path):
  shared_data('instructions/alpaca_tiny.json')  # the workers read it: skip here, not in them
  port = free_port()
  worker = pathlib.Path(__file__).parent / 'multiprocess_worker.py'
  out = tmp_path / 'params.npz'
  processes = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), str(tmp_path),
                                 str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in processes]
  for p, log in zip(processes, logs):
    assert p.returncode == 0, log[-3000:]
  report = json.loads(out.with_suffix('.json').read_text())
  assert report['processes'] == 2 and report['devices'] == 8
  two_process = np.load(out)
  two_process = [two_process[f'arr_{i}'] for i in range(len(two_process.files))]

  config = run_config(tmp_path / 'single_cache', mesh=(2, 2, 2), steps=3)
  config.checkpoint.save_every = 0
  single = train(config, str(tmp_path / 'single'))
  with open(tmp_path / 'single' / 'metrics.jsonl') as f:
    losses = [r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r]
  np.testing.assert_allclose(report['losses'], losses, rtol=1e-5)
  single_params = [np.asarray(x) for x in jax.tree_util.tree_leaves(single['state'].params)]
  for x, y in zip(two_process, single_params):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)

  # The 2-process checkpoint (step 3) restores in this single process, onto its shardings.
  saved = checkpoint.Checkpointer(str(tmp_path / 'run'))
  assert saved.latest_step() == 3
  state, data_states, _ = saved.restore(3, single['state'])
  assert len(data_states) == 2
  for x, y in zip(jax.tree_util.tree_leaves(state.params), two_process):
    np.testing.assert_array_equal(np.asarray(x), y)
