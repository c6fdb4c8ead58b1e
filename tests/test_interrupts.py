"""Ctrl-C and full disks during `jaxsft train`, through the installed executable on a tiny
from-scratch model: a first Ctrl-C saves after the current step and exits 130, a second one
stops at once, Ctrl-C during start-up writes nothing; a save that cannot be written is one error
line (exit 2); no interrupt or failed save leaves a partial checkpoint that hides the newest
complete one, and the next start removes Orbax's leftover temporary folders and resumes.

The full disk is a file size limit (`RLIMIT_FSIZE`, set on the running process with `prlimit`
once its first checkpoint is complete, SIGXFSZ ignored): writes beyond it fail with EFBIG as
writes to a full disk fail with ENOSPC, with no mount and no privilege needed.
"""

import json
import pathlib
import resource
import shutil
import signal
import subprocess
import threading
import time

import pytest
from user_path import ALPACA, JAXSFT, REPO, env, write_config, write_json

from jaxsft.errors import UserError
from jaxsft.train import checkpoint

SETTINGS = {
    'model.dtype': 'float32', 'model.attention_implementation': 'xla',
    'data.template': 'chatml', 'data.max_seq_len': 64, 'batch_size': 2,
    'optim.warmup_steps': 0, 'train.num_steps': 10, 'train.log_every': 1,
    'checkpoint.save_every': 2}


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  """A config file for a tiny from-scratch model (no HF weights to load) on a few records."""
  from jaxsft import demo
  root = tmp_path_factory.mktemp('interrupts')
  tokenizer = demo.build_tokenizer(str(root / 'tokenizer'))
  return write_config(root / 'tiny.py', {
      **SETTINGS, 'model.architecture': {
          'vocab_size': len(tokenizer), 'hidden_size': 32, 'intermediate_size': 64,
          'num_layers': 1, 'num_heads': 2, 'num_kv_heads': 2, 'max_position_embeddings': 128},
      'data.tokenizer': str(root / 'tokenizer'),
      'data.datasets': [{'path': str(write_json(root / 'alpaca.json', ALPACA))}],
      'data.cache_dir': str(root / 'cache')})


class Run:
  """`jaxsft train` in a subprocess whose stderr lines are collected as they come."""

  def __init__(self, config, workdir, *overrides, preexec_fn=None):
    self.process = subprocess.Popen(
        [JAXSFT, 'train', '--config', config, '--workdir', str(workdir), *overrides], cwd=REPO,
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=preexec_fn)
    self.lines: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stderr:
      self.lines.append(line)

  def wait_for(self, predicate, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
      assert self.process.poll() is None, f'exited {self.process.returncode}:\n{self.stderr}'
      assert time.time() < deadline, f'timed out:\n{self.stderr}'
      time.sleep(0.005)

  def finish(self, timeout=300):
    self.process.wait(timeout=timeout)
    self._reader.join(timeout=10)
    self.process.stdout.close()
    return self.process.returncode

  @property
  def stderr(self):
    return ''.join(self.lines)


def train(config, workdir, *overrides):
  run = Run(config, workdir, *overrides)
  assert run.finish() == 0, run.stderr
  return run.stderr


def listed(workdir):
  return checkpoint.complete_steps(pathlib.Path(workdir) / 'checkpoints')


def partial(workdir):
  folder = pathlib.Path(workdir) / 'checkpoints'
  return sorted(p.name for p in folder.iterdir() if checkpoint.TMP_SUFFIX in p.name)


def logged_steps(workdir):
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [r['step'] for r in map(json.loads, path.read_text().splitlines()) if 'train/loss' in r]


def assert_quiet(stderr):
  assert 'Traceback' not in stderr and 'Event loop is closed' not in stderr, stderr
  assert 'ERROR' not in stderr, stderr


def test_ctrl_c_as_a_save_begins_saves_the_step_and_exits_130(config, tmp_path):
  """Ctrl-C as Orbax starts writing step 2 in the background: the save completes, the current
  step is saved too, the run exits 130 without a traceback, and the same command resumes from
  that step (each step logged once)."""
  workdir = tmp_path / 'run'
  run = Run(config, workdir)
  folder = workdir / 'checkpoints'
  run.wait_for(lambda: folder.is_dir() and any(p.name.startswith('2') for p in folder.iterdir()))
  run.process.send_signal(signal.SIGINT)
  assert run.finish() == 130, run.stderr
  assert_quiet(run.stderr)
  stopped = int(run.stderr.split('interrupted (Ctrl-C) at step ')[1].split(';')[0])
  assert stopped >= 2 and listed(workdir)[-1] == stopped and not partial(workdir), run.stderr
  assert logged_steps(workdir) == list(range(1, stopped + 1))

  resumed = train(config, workdir)
  assert f'resuming from the checkpoint at step {stopped} ' in resumed
  assert logged_steps(workdir) == list(range(1, 11))


def test_second_ctrl_c_stops_at_once_and_the_next_start_cleans_up(config, tmp_path):
  """Two Ctrl-C while step 4 is being saved: exit 130 at once, one line, no traceback, and
  the newest listed checkpoint is complete. The next start names and removes the temporary
  folders of unfinished saves (one made by hand besides whatever the stop left), then
  resumes from the newest listed checkpoint."""
  workdir = tmp_path / 'run'
  run = Run(config, workdir)
  folder = workdir / 'checkpoints'
  run.wait_for(lambda: (folder / '2').is_dir()
               and any(p.name.startswith('4') for p in folder.iterdir()))
  run.process.send_signal(signal.SIGINT)
  time.sleep(0.05)
  run.process.send_signal(signal.SIGINT)
  assert run.finish() == 130, run.stderr
  assert_quiet(run.stderr)
  assert run.stderr.rstrip().splitlines()[-1].startswith('jaxsft: interrupted again (Ctrl-C)')
  newest = listed(workdir)[-1]
  assert newest >= 2

  shutil.copytree(folder / str(newest), folder / f'8{checkpoint.TMP_SUFFIX}')
  left = partial(workdir)
  resumed = train(config, workdir)
  warnings = [line for line in resumed.splitlines() if 'unfinished checkpoint folder' in line]
  assert len(warnings) == 1 and all(name in warnings[0] for name in left), resumed
  assert not partial(workdir)
  assert f'resuming from the checkpoint at step {newest} ' in resumed
  assert logged_steps(workdir) == list(range(1, 11))


def test_ctrl_c_during_start_up_writes_nothing(config, tmp_path):
  """Ctrl-C while the step compiles (after the model is built): exit 130 at once with one
  line, and the work directory holds no config, metrics or checkpoint."""
  workdir = tmp_path / 'run'
  run = Run(config, workdir)
  run.wait_for(lambda: any('INFO jaxsft: model ' in line for line in run.lines))
  run.process.send_signal(signal.SIGINT)
  assert run.finish() == 130, run.stderr
  assert_quiet(run.stderr)
  assert run.stderr.rstrip().splitlines()[-1] == (
      'jaxsft: interrupted (Ctrl-C) before training started; nothing was saved.')
  assert sorted(p.name for p in workdir.iterdir()) == ['.jaxsft.lock']


def test_full_disk_mid_run_is_one_error_line_and_resumes(config, tmp_path):
  """Once step 2 is saved, files may not grow past half its largest file: the next save fails.
  One `jaxsft: error:` line names the folder, the cause and the space a checkpoint needs; exit
  2; no temporary folder is left; the same command with room again resumes from the newest
  complete checkpoint and finishes."""
  workdir = tmp_path / 'run'
  run = Run(config, workdir, preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
  folder = workdir / 'checkpoints'
  run.wait_for(lambda: (folder / '2').is_dir())
  largest = max(p.stat().st_size for p in (folder / '2').rglob('*') if p.is_file())
  resource.prlimit(run.process.pid, resource.RLIMIT_FSIZE, (largest // 2, largest // 2))
  assert run.finish() == 2, run.stderr
  assert_quiet(run.stderr)
  line = run.stderr.rstrip().splitlines()[-1]
  assert line.startswith('jaxsft: error: saving the checkpoint of step '), run.stderr
  assert f'to {folder} failed: File too large (errno 27)' in line
  assert 'A checkpoint of this run needs about ' in line and ' bytes before compression' in line
  newest = listed(workdir)[-1]
  assert f'it resumes from the checkpoint at step {newest}.' in line
  assert not partial(workdir)

  resumed = train(config, workdir)
  assert f'resuming from the checkpoint at step {newest} ' in resumed
  assert logged_steps(workdir) == list(range(1, 11))


def test_start_up_space_check_counts_each_checkpoint_once(tmp_path, monkeypatch):
  """1.5 MiB checkpoints, keep 40: Orbax writes the next before deleting the oldest, so 41 of
  them, 61.5 MiB, stated once (not 'times checkpoint.keep' again); checkpoints already there
  count as taken."""
  size = 3 * 2**19
  assert checkpoint.space_needed(size, keep=40) == 41 * size
  assert checkpoint.space_needed(size, keep=3, existing=3) == size
  assert checkpoint.space_needed(size, keep=3, existing=5) == size
  monkeypatch.setattr(shutil, 'disk_usage', lambda _: shutil._ntuple_diskusage(
      2**30, 2**30 - 2**20, 2**20))
  with pytest.raises(UserError) as error:
    checkpoint.check_writable(str(tmp_path), size, keep=40)
  assert str(error.value) == (
      f'the work directory {tmp_path} has 1.0 MiB free but its checkpoints need about 61.5 MiB '
      'more: 1.5 MiB each, checkpoint.keep=40 of them plus the next one while it is written; '
      'free space, lower checkpoint.keep or choose another --workdir.')
  with pytest.raises(UserError, match='need about 4.5 MiB more: .*, 38 of which are there'):
    checkpoint.check_writable(str(tmp_path), size, keep=40, existing=38)
  checkpoint.check_writable(str(tmp_path), 2**19, keep=1)  # 1 MiB: fits
