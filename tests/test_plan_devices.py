"""`jaxsft plan --devices N`: a run planned for N devices on N fake CPU host devices, through the
installed executable as a user runs it, and `jaxsft.train.plan.max_seq_len`'s search (to 4M
tokens, few compiles) on fake plans."""

import math
import re
from concurrent import futures

import pytest
from user_path import run, write_config

from jaxsft.train import plan as plan_lib

# Quick to compile on XLA:CPU: float32 (no bf16 normalization), dense attention, whole logits.
QUICK = {'model.dtype': 'float32', 'model.attention_implementation': 'xla',
         'train.loss_chunk_size': 0}
# A user's own device count (flag and variable) that --devices must replace, and LLVM at -O0
# (codegen only, as conftest.py sets for in-process tests): quicker compiles.
USER_ENV = {'XLA_FLAGS': '--xla_backend_optimization_level=0 '
                         '--xla_force_host_platform_device_count=3',
            'JAX_NUM_CPU_DEVICES': '3'}


def plans(tmp_path, *commands):
  """Runs each `jaxsft plan` command line (lists) at once; their stdouts, in order."""
  with futures.ThreadPoolExecutor(len(commands)) as pool:
    results = pool.map(lambda args: run(['plan', *args], tmp_path, extra_env=USER_ENV,
                                        timeout=300), commands)
    return [r.stdout for r in results]


def gib(stdout: str, part: str) -> float:
  return float(re.search(rf'{part}\s+([\d.]+) GiB', stdout).group(1))


def test_fsdp_over_n_devices_holds_a_quarter_of_the_weights_per_device(tmp_path):
  """`--devices 4` with FSDP over all of them: JAX has 4 devices (not the user's 3), and each
  holds a quarter of the trained weights and of the optimizer state of `--devices 1`."""
  config = write_config(tmp_path / 'c.py', {
      **QUICK, 'model.architecture': {'vocab_size': 32768, 'hidden_size': 1024,
                                      'intermediate_size': 2048, 'num_layers': 1,
                                      'num_heads': 8, 'num_kv_heads': 4},
      'data.max_seq_len': 128, 'batch_size': 4, 'mesh.shape': (1, -1, 1)})
  four, one = plans(tmp_path, ['--config', config, '--devices', '4'],
                    ['--config', config, '--devices', '1'])
  assert four.startswith('planned for 4 devices (fake CPU host devices'), four
  assert one.startswith('planned for 1 device (fake CPU host devices'), one
  for part in ('trained weights', 'optimizer state'):
    assert gib(one, part) > 0.2, one
    assert gib(four, part) == pytest.approx(gib(one, part) / 4, rel=0.01), (part, four, one)


def test_devices_export_for_a_platform(tmp_path):
  """`--devices 4 --platform tpu`: the program exported for a TPU slice of 4 chips."""
  config = write_config(tmp_path / 'c.py', {
      'model.architecture': {'vocab_size': 512, 'hidden_size': 128, 'intermediate_size': 256,
                             'num_layers': 1, 'num_heads': 4, 'num_kv_heads': 2},
      'data.max_seq_len': 256, 'batch_size': 4, 'mesh.shape': (1, -1, 1)})
  stdout, = plans(tmp_path, ['--config', config, '--devices', '4', '--platform', 'tpu'])
  assert 'train step lowered for tpu on 4 devices' in stdout, stdout
  assert re.search(r'attention: splash \(\d+ fused-kernel calls', stdout), stdout


def test_search_on_n_devices_finds_the_boundary(tmp_path):
  """`--devices 2 --find-max-seq-len`: the length it answers fits, 256 tokens more does not
  (two plain plans of the same 2 devices say so)."""
  config = write_config(tmp_path / 'c.py', {
      **QUICK, 'model.architecture': {'vocab_size': 32768, 'hidden_size': 64,
                                      'intermediate_size': 128, 'num_layers': 1,
                                      'num_heads': 4, 'num_kv_heads': 2},
      'batch_size': 2, 'mesh.shape': (1, -1, 1)})
  budget = '0.5'  # about 1,000 tokens: the whole logits dominate, memory about linear
  common = ['--config', config, '--devices', '2', '--device-memory-gib', budget]
  searched, = plans(tmp_path, [*common, '--find-max-seq-len'])
  assert searched.startswith('planned for 2 devices'), searched
  length = int(re.search(r'longest data.max_seq_len .*: (\d+)', searched).group(1))
  assert 256 < length < 8192 and length % 256 == 0, searched
  assert f'verdict: fits in {budget} GiB' in searched, searched
  fits, too_long = plans(tmp_path, [*common, f'--config.data.max_seq_len={length}'],
                         [*common, f'--config.data.max_seq_len={length + 256}'])
  assert f'verdict: fits in {budget} GiB' in fits, fits
  assert f'verdict: does NOT fit in {budget} GiB' in too_long, too_long


@pytest.mark.parametrize('value, message', [('0', 'must be >= 1, got 0'),
                                            ('2.5', "must be an integer >= 1, got '2.5'")])
def test_a_device_count_that_is_not_a_positive_integer_is_one_line(tmp_path, value, message):
  result = run(['plan', '--config', 'c.py', '--devices', value], tmp_path, check_rc=2,
               timeout=120)
  assert 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if 'error:' in line]
  assert errors == [f'jaxsft plan: error: argument --devices: {message}'], result.stderr


def test_a_process_whose_backend_runs_keeps_its_devices(tmp_path, capsys):
  """`jaxsft.cli.main` in a process whose JAX backend runs (8 devices here, conftest.py):
  another count is one line, exit 2, before the config loads."""
  import jax

  from jaxsft import cli
  count = jax.device_count()
  code = cli.main(['plan', '--config', str(tmp_path / 'missing.py'), '--devices',
                   str(count + 1)])
  assert code == 2
  assert capsys.readouterr().err.splitlines() == [
      f'jaxsft: error: jaxsft plan --devices {count + 1}: JAX already runs in this process '
      f'with {count} cpu devices; run `jaxsft plan` in a new process.']


class FakeSettings:
  """The one thing `max_seq_len` asks of run settings: the same with another row length."""

  def __init__(self, max_seq_len: int = 2048):
    self.max_seq_len = max_seq_len

  def with_max_seq_len(self, length: int) -> 'FakeSettings':
    return FakeSettings(length)


def fake_plans(monkeypatch, total_bytes):
  """`plan.plan` replaced by one whose total is `total_bytes(length)`; the lengths it planned."""
  calls = []

  def fake(settings, devices=None):
    del devices
    calls.append(settings.max_seq_len)
    return plan_lib.MemoryPlan(frozen_bytes=0, trained_bytes=0, optimizer_bytes=0,
                               temporary_bytes=int(total_bytes(settings.max_seq_len)),
                               frozen_parameters=0, quantized_bits_per_parameter=None)

  monkeypatch.setattr(plan_lib, 'plan', fake)
  return calls


def test_search_finds_the_exact_boundary_past_2m_tokens_in_four_plans(monkeypatch):
  """Linear memory (weights + bytes per token): the line through the first two plans hits the
  answer, one plan 256 tokens longer confirms it."""
  answer = 2_345_472  # a multiple of 256
  weights, per_token = 12 * plan_lib.GIB, 24_000
  budget_bytes = weights + per_token * (answer + 100)  # between answer and answer + 256
  calls = fake_plans(monkeypatch, lambda length: weights + per_token * length)
  length, memory = plan_lib.max_seq_len(FakeSettings(), budget_bytes / plan_lib.GIB)
  assert length == answer and memory.total_bytes == weights + per_token * answer
  assert len(calls) <= 4, calls


@pytest.mark.parametrize('answer', [3_000_064, 700_160, 9_984])
def test_search_of_a_bent_curve_is_within_its_resolution_in_few_plans(monkeypatch, answer):
  """Memory with a quadratic term (dense attention) and a step of 5 % (a compile that changes
  strategy with the length): the length found fits, one resolution (1 %, at least 256) longer
  does not, within 10 plans (the search before it, bisecting to 256 tokens: 12 to 17)."""
  def curve(length):
    return 8 * plan_lib.GIB + 4000 * length + 0.004 * length ** 2

  def total(length):
    return curve(length) + (0.05 * curve(answer) if length > 0.6 * answer else 0)

  budget_bytes = total(answer + 100)
  calls = fake_plans(monkeypatch, total)
  length, memory = plan_lib.max_seq_len(FakeSettings(), budget_bytes / plan_lib.GIB)
  resolution = plan_lib.search_resolution(length)
  assert length % 256 == 0 and memory.total_bytes <= budget_bytes
  assert total(length + resolution) > budget_bytes and answer - resolution <= length <= answer
  assert len(calls) <= 10, calls
  assert len(set(calls)) == len(calls)  # each length planned once


def test_search_stops_at_its_limit_and_below_one_multiple(monkeypatch):
  """The default limit reaches 4M tokens; a budget below one row of `multiple` finds nothing."""
  calls = fake_plans(monkeypatch, lambda length: plan_lib.GIB + length)
  assert plan_lib.SEARCH_LIMIT >= 4 * 2 ** 20
  length, _ = plan_lib.max_seq_len(FakeSettings(), 80.0)
  assert length == plan_lib.SEARCH_LIMIT and len(calls) <= 3, calls
  assert plan_lib.max_seq_len(FakeSettings(), 0.5) == (0, None)
  assert plan_lib.max_seq_len(FakeSettings(), 2.0, multiple=32, limit=1000)[0] == 992


def test_search_resolution():
  assert [plan_lib.search_resolution(n) for n in (256, 25_599, 25_600, 2_097_152)] == [
      256, 256, 256, 20_736]
  assert plan_lib.search_resolution(1000, multiple=32) == 32
  assert math.isclose(plan_lib.search_resolution(4 * 2 ** 20) / 2 ** 22, 0.01, rel_tol=0.02)
