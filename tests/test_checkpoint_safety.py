"""Checkpoint integrity and work directory locking: checksums recorded at save catch a flipped
bit that zstd restores silently; a corrupt or truncated newest checkpoint falls back to the
previous one (moved aside, never deleted); a diverged step can be set aside; a second run on
a work directory is refused while the first lives, and not after it was killed with -9."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsft.errors import UserError
from jaxsft.train import checkpoint
from jaxsft.train import checksums as checksums_lib
from jaxsft.train.state import TrainState
from jaxsft.train.workdir_lock import WorkdirLock


def small_state(seed: int) -> TrainState:
  """A TrainState with random (incompressible) float32 and bfloat16 leaves, an Adam state and a
  typed key: different values for each seed."""
  rng = np.random.default_rng(seed)
  params = {'layers': {'kernel': jnp.asarray(rng.normal(size=(128, 96)), jnp.float32)},
            'norm': jnp.asarray(rng.normal(size=(96,)), jnp.bfloat16)}
  opt_state = optax.adam(1e-3).init(params)
  opt_state = jax.tree_util.tree_map(lambda x: x + seed, opt_state)
  return TrainState(step=jnp.int32(seed), params=params, frozen=None, opt_state=opt_state,
                    rng=jax.random.key(seed))


def like(state: TrainState) -> TrainState:
  """A freshly initialised state of the same shapes (what a resuming run has)."""
  return jax.tree_util.tree_map(
      lambda x: jax.random.key(0) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      else jnp.zeros_like(x), state)


def host(state: TrainState) -> list[np.ndarray]:
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x) for x in jax.tree_util.tree_leaves(state)]


def assert_same(a: TrainState, b: TrainState) -> None:
  for x, y in zip(host(a), host(b), strict=True):
    np.testing.assert_array_equal(x, y)


def saved_run(workdir, steps=(2, 4), keep=5) -> checkpoint.Checkpointer:
  saver = checkpoint.Checkpointer(str(workdir), keep=keep)
  for step in steps:
    saver.save(step, small_state(step), {'row': step}, {'config': {'seed': step}})
  saver.close()
  return checkpoint.Checkpointer(str(workdir), keep=keep)


def largest_data_file(workdir, step):
  """The biggest array data file of a step: with OCDBT, under state/ocdbt.process_0/d/."""
  files = [p for p in (workdir / 'checkpoints' / str(step) / 'state').rglob('*') if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  assert '/d/' in str(biggest), biggest
  return biggest


def flip_bit(x: np.ndarray, index: int, bit: int) -> np.ndarray:
  words = x.copy().view(np.uint16 if x.dtype.itemsize == 2 else np.uint32).reshape(-1)
  words[index] ^= words.dtype.type(1 << bit)
  return words.view(x.dtype).reshape(x.shape)


def reference_sums(x: np.ndarray) -> list[int]:
  """The checksum's definition, in NumPy: the file format depends on it not changing."""
  words = x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32).reshape(-1)
  words = words.astype(np.uint64)
  index = np.arange(1, words.size + 1, dtype=np.uint64)
  return [int(words.sum() % 2**32), int((words * index % 2**32).sum() % 2**32)]


# Checksums.

@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_checksums_equal_for_equal_arrays_and_differ_for_any_flipped_bit(dtype):
  x = np.asarray(np.random.default_rng(0).normal(size=(33, 17)), dtype)
  sums = checksums_lib.checksums({'w': jnp.asarray(x)})['w']
  assert sums == checksums_lib.checksums({'w': jnp.asarray(x.copy())})['w']
  assert sums['sums'] == reference_sums(x)
  assert sums['dtype'] == np.dtype(dtype).name and sums['shape'] == [33, 17]
  for bit in range(8 * x.dtype.itemsize):  # every bit of one element, sign and exponent too
    flipped = checksums_lib.checksums({'w': jnp.asarray(flip_bit(x, 100, bit))})['w']
    assert flipped['sums'][0] != sums['sums'][0], bit
  # Two elements swapped keep s1 but not s2.
  swapped = x.copy().reshape(-1)
  swapped[[3, 4]] = swapped[[4, 3]]
  assert checksums_lib.checksums({'w': jnp.asarray(swapped.reshape(x.shape))})['w']['sums'][1] \
      != sums['sums'][1]


def test_checksums_do_not_depend_on_sharding():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 24)), jnp.float32)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('a', 'b'))
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec('a', 'b')))
  assert len(sharded.addressable_shards) == 8
  assert checksums_lib.checksums({'w': sharded}) == checksums_lib.checksums({'w': x})
  # Leaves committed to different devices (one jitted call per device set) in one tree.
  elsewhere = jax.device_put(x, jax.devices()[3])
  mixed = checksums_lib.checksums({'a': sharded, 'b': elsewhere, 'c': x})
  assert mixed['a'] == mixed['b'] == mixed['c'] == checksums_lib.checksums({'w': x})['w']


def test_checksum_pass_reads_each_leaf_once_without_temporaries():
  """Both sums fuse into one reduction: no uint32 copy of a leaf (the state's size again, on
  a device that holds a 7B state) is materialised."""
  leaves = [jnp.zeros((1024, 4096), jnp.float32), jnp.zeros((512, 4096), jnp.bfloat16)]
  compiled = checksums_lib._checksums_jit.lower(leaves).compile()  # pylint: disable=protected-access
  assert compiled.memory_analysis().temp_size_in_bytes < 2**20


def test_checksums_cover_keys_integers_and_wide_types():
  tree = {'key': jax.random.key(3), 'count': jnp.int32(7), 'mask': jnp.array([True, False]),
          'int4': jnp.array([1, -2, 3], jnp.int4)}
  sums = checksums_lib.checksums(tree)
  assert sums['key']['sums'] == reference_sums(np.asarray(jax.random.key_data(tree['key'])))
  assert sums['count']['sums'] == [7, 7] and sums['mask']['sums'] == [1, 1]
  assert sums['int4']['sums'] != checksums_lib.checksums(
      {'int4': jnp.array([1, -2, 2], jnp.int4)})['int4']['sums']
  with jax.enable_x64(True):  # 8-byte types read as two uint32 words each
    wide = np.arange(5, dtype=np.float64)
    assert checksums_lib.checksums({'d': jnp.asarray(wide)})['d']['sums'] == reference_sums(
        wide.view(np.uint32))


# Save and restore.

def test_save_records_checksums_and_restore_latest_verifies(tmp_path, caplog):
  saver = saved_run(tmp_path)
  meta = saver.read_meta(4)
  assert meta['config'] == {'seed': 4}
  assert meta['checksums']['algorithm'] == checksums_lib.CHECKSUM_ALGORITHM
  assert meta['checksums']['leaves']['params/layers/kernel']['shape'] == [128, 96]
  with caplog.at_level(logging.INFO, logger='jaxsft'):
    step, state, data_states, restored_meta = saver.restore_latest(like(small_state(0)))
  assert step == 4 and data_states == [{'row': 4}] and restored_meta['config'] == {'seed': 4}
  assert_same(state, small_state(4))
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert 'without verification' not in caplog.text


def test_restore_latest_without_checkpoints_is_none(tmp_path):
  assert checkpoint.Checkpointer(str(tmp_path)).restore_latest(small_state(0)) is None


def test_checkpoint_without_checksums_restores_unverified(tmp_path, caplog):
  """Checkpoints of earlier jaxsft versions carry no checksums: restored, logged at INFO."""
  saver = checkpoint.Checkpointer(str(tmp_path))
  saver.manager.save(3, args=checkpoint.ocp.args.Composite(
      state=checkpoint.ocp.args.StandardSave(checkpoint.saveable(small_state(3))),
      data=checkpoint.ocp.args.JsonSave({'processes': [{'row': 3}]}),
      meta=checkpoint.ocp.args.JsonSave({'config': {}})), force=True)
  saver.close()
  with caplog.at_level(logging.INFO, logger='jaxsft'):
    step, state, _, _ = checkpoint.Checkpointer(str(tmp_path)).restore_latest(
        like(small_state(0)))
  assert step == 3
  assert_same(state, small_state(3))
  assert 'records no checksums' in caplog.text
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def corrupt_flip(path):
  """Flips one bit in the middle of the file: inside the zstd-stored data of a random leaf,
  which zstd keeps as raw bytes, so Orbax restores a wrong value without any error."""
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x04
  path.write_bytes(bytes(data))


def corrupt_header(path):
  """Garbles the first bytes (the zstd frame's magic number): Orbax raises on reading."""
  data = bytearray(path.read_bytes())
  data[0] ^= 0xFF
  path.write_bytes(bytes(data))


def corrupt_truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 3])


@pytest.mark.parametrize('damage, reported', [
    (corrupt_flip, 'checksum mismatch in '),
    (corrupt_header, 'cannot be read'),
    (corrupt_truncate, 'cannot be read')])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage,
                                                              reported):
  saver = saved_run(tmp_path)
  damage(largest_data_file(tmp_path, 4))
  with caplog.at_level(logging.WARNING, logger='jaxsft'):
    step, state, data_states, meta = saver.restore_latest(like(small_state(0)))
  assert step == 2 and data_states == [{'row': 2}] and meta['config'] == {'seed': 2}
  assert_same(state, small_state(2))
  warning, = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warning.startswith(f'checkpoint step 4 in {tmp_path / "checkpoints"} is corrupt (')
  assert reported in warning and warning.endswith('falling back to step 2')
  # Moved aside, not deleted, and never listed again.
  assert not (tmp_path / 'checkpoints' / '4').exists()
  assert (tmp_path / 'checkpoints_bad' / '4' / 'state').is_dir()
  assert reported in (tmp_path / 'checkpoints_bad' / '4' / 'REASON.txt').read_text()
  assert saver.latest_step() == 2
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 2


def test_bit_flip_names_the_damaged_leaf(tmp_path):
  saver = saved_run(tmp_path, steps=(4,))
  corrupt_flip(largest_data_file(tmp_path, 4))
  with pytest.raises(checkpoint.CorruptCheckpoint, match='checksum mismatch in ') as error:
    saver.restore(4, like(small_state(0)))
  # The largest file holds the float32 kernel and its two Adam moments.
  assert 'layers/kernel' in error.value.reason
  state, _, _ = saver.restore(4, like(small_state(0)), verify=False)  # the silent damage
  assert any(not np.array_equal(x, y) for x, y in zip(host(state), host(small_state(4))))


def test_every_checkpoint_corrupt_is_a_user_error_and_nothing_moves(tmp_path, caplog):
  saver = saved_run(tmp_path)
  corrupt_flip(largest_data_file(tmp_path, 4))
  corrupt_truncate(largest_data_file(tmp_path, 2))
  with caplog.at_level(logging.WARNING, logger='jaxsft'), \
      pytest.raises(UserError, match='every checkpoint in .* is corrupt') as error:
    saver.restore_latest(like(small_state(0)))
  assert 'step 4: checksum mismatch' in str(error.value)
  assert 'step 2: it cannot be read' in str(error.value)
  assert 'step 4' in caplog.text and 'step 2' in caplog.text
  assert saver.latest_step() == 4 and not (tmp_path / 'checkpoints_bad').exists()


def test_another_runs_state_is_a_user_error_not_corruption(tmp_path):
  saver = saved_run(tmp_path)
  other = small_state(0).replace(params={'layers': {'kernel': jnp.zeros((128, 64))},
                                         'norm': jnp.zeros((96,), jnp.bfloat16)})
  other = other.replace(opt_state=optax.adam(1e-3).init(other.params))
  with pytest.raises(UserError, match='holds another state than this run builds'):
    saver.restore_latest(other)
  assert saver.latest_step() == 4 and not (tmp_path / 'checkpoints_bad').exists()


def test_set_aside_moves_a_diverged_step_after_its_save_finishes(tmp_path):
  saver = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=True)
  for step in (2, 4):
    saver.save(step, small_state(step), {'row': step}, {})
  moved = saver.set_aside(4, 'the loss became nan at step 5')  # the save may still be running
  assert moved == tmp_path / 'checkpoints_bad' / '4'
  assert (moved / 'REASON.txt').read_text().endswith(': the loss became nan at step 5\n')
  assert (moved / 'state').is_dir() and not (tmp_path / 'checkpoints' / '4').exists()
  assert saver.latest_step() == 2
  # The same step, saved and set aside again by a later run, does not overwrite the first.
  saver.save(4, small_state(4), {'row': 4}, {})
  assert saver.set_aside(4, 'again') == tmp_path / 'checkpoints_bad' / '4.1'
  assert saver.set_aside(8, 'never saved') is None
  saver.close()
  assert checkpoint.Checkpointer(str(tmp_path)).restore_latest(like(small_state(0)))[0] == 2


# The work directory lock.

HOLDER = textwrap.dedent('''
    import sys, time
    from jaxsft.train.workdir_lock import WorkdirLock
    lock = WorkdirLock(sys.argv[1], process_index=0).acquire()
    print('locked', flush=True)
    time.sleep(120)
''')


def test_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', HOLDER, str(tmp_path), 'train', '--x'],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    record = json.loads((tmp_path / '.jaxsft.lock').read_text())
    assert record['pid'] == holder.pid and record['command'].endswith('train --x')
    with pytest.raises(UserError, match=f'is in use by another jaxsft run \\(pid {holder.pid} '
                       'on host .* since .*\\); wait for it to finish, stop it, or choose '
                       'another --workdir'):
      WorkdirLock(tmp_path, process_index=0).acquire()
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
    holder.wait(timeout=30)
    with WorkdirLock(tmp_path, process_index=0) as lock:
      assert lock.held
      assert json.loads((tmp_path / '.jaxsft.lock').read_text())['pid'] == os.getpid()
      with pytest.raises(UserError, match=f'pid {os.getpid()}'):  # also within one process
        WorkdirLock(tmp_path, process_index=0).acquire()
    assert not lock.held
    WorkdirLock(tmp_path, process_index=0).acquire().release()  # released on exit
  finally:
    if holder.poll() is None:
      holder.kill()
      holder.wait()


def test_only_process_zero_locks(tmp_path):
  with WorkdirLock(tmp_path / 'run', process_index=1) as lock:
    assert not lock.held
  assert not (tmp_path / 'run').exists()
  with WorkdirLock(tmp_path / 'run') as lock:  # jax.process_index() == 0 here
    assert lock.held and (tmp_path / 'run' / '.jaxsft.lock').exists()


def test_bucket_work_directory_warns_and_touches_no_local_file(tmp_path, monkeypatch, caplog):
  monkeypatch.chdir(tmp_path)

  def no_local_files(*args, **kwargs):
    raise AssertionError(f'a local file was opened for gs://: {args}')

  monkeypatch.setattr(os, 'open', no_local_files)
  monkeypatch.setattr(os, 'makedirs', no_local_files)
  with caplog.at_level(logging.WARNING, logger='jaxsft'):
    with WorkdirLock('gs://bucket/x', process_index=0) as lock:
      assert not lock.held
  assert 'gs://bucket/x is in a bucket, which cannot be locked' in caplog.text
  assert 'only one jaxsft run' in caplog.text
  assert not list(tmp_path.iterdir())


def test_unwritable_work_directory_is_an_os_error(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(UserError, match='is not writable'):
    WorkdirLock(blocker / 'run', process_index=0).acquire()
