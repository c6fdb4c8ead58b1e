"""What the checkpoint checksums cost: the on-device pass of `jaxsft.train.checksums.checksums` vs
the Orbax save it guards, on a state of realistic leaf sizes, extrapolated to a 7B
full-fine-tuning state.

  python scripts/bench_checksum.py                  # 1.5 GiB state: float32 and bfloat16
  python scripts/bench_checksum.py --gib 1 --cpu-devices 2 --repeats 5

Timed, after a warm-up that compiles:
  checksum        `checksums(state)`: one jitted pass over every leaf, 8 bytes per leaf back;
  save            `Checkpointer.save` (checksums included) until the async write has finished,
                  and the part of it the train loop waits for (until `save` returns);
  verify          the checksum pass again inside `restore_latest`, and the restore around it;
  file re-read    the rejected alternative: reading the saved files back and CRC32-ing them
                  (page cache warm, so a lower bound; a cold 7B read is disk- or bucket-bound).
The state's arrays are random (incompressible), as trained weights and Adam moments are.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
import zlib


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--gib', type=float, default=1.5, help='state size, GiB')
  parser.add_argument('--bf16-share', type=float, default=0.25,
                      help='share of the bytes in bfloat16 leaves (the rest float32)')
  parser.add_argument('--cpu-devices', type=int, default=1,
                      help='shard every leaf over this many CPU devices (one per core)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--workdir', default=None, help='where to save (default: a temp dir)')
  parser.add_argument('--target-gb', type=float, default=84.0,
                      help='state to extrapolate to, GB: 7B params + 2 Adam moments in fp32')
  return parser.parse_args()


def main() -> None:
  args = parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from jaxsft.train import checkpoint
  from jaxsft.train import checksums as checksums_lib
  from jaxsft.train.state import TrainState

  mesh = Mesh(np.array(jax.devices()[:args.cpu_devices]), ('fsdp',))
  rows = NamedSharding(mesh, PartitionSpec('fsdp', None))
  # LLaMA-7B-like leaves: q/k/v/o kernels 4096 x 4096 (float32: 64 MiB), MLP kernels
  # 4096 x 11008 (bfloat16: 86 MiB).
  shapes = {'float32': (4096, 4096), 'bfloat16': (4096, 11008)}
  budget = {'float32': args.gib * 2**30 * (1 - args.bf16_share),
            'bfloat16': args.gib * 2**30 * args.bf16_share}
  key = jax.random.key(0)
  params = {}
  for dtype, shape in shapes.items():
    count = int(budget[dtype] // (np.prod(shape) * jnp.dtype(dtype).itemsize))
    for i in range(count):
      key, sub = jax.random.split(key)
      params[f'{dtype}_{i}'] = jax.jit(
          lambda k, s=shape, d=dtype: jax.random.normal(k, s, d), out_shardings=rows)(sub)
  state = TrainState(step=jnp.int32(1), params=params, frozen=None, opt_state=None,
                     rng=jax.random.key(1))
  jax.block_until_ready(state)
  leaves = jax.tree_util.tree_leaves(state)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  gb = nbytes / 1e9

  compiled = checksums_lib._checksums_jit.lower(leaves).compile()  # pylint: disable=protected-access
  temp = compiled.memory_analysis().temp_size_in_bytes
  checksums_lib.checksums(state)  # warm-up
  checksum_s = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    checksums_lib.checksums(state)
    checksum_s.append(time.perf_counter() - start)
  checksum = statistics.median(checksum_s)

  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='bench_checksum_'))
  shutil.rmtree(workdir, ignore_errors=True)
  saver = checkpoint.Checkpointer(str(workdir), keep=args.repeats + 1, async_save=True)
  save_s, blocking_s = [], []
  for step in range(1, args.repeats + 1):
    start = time.perf_counter()
    saver.save(step, state, {'row': step}, {})
    blocking_s.append(time.perf_counter() - start)  # what the train loop waits for
    saver.wait()
    save_s.append(time.perf_counter() - start)
  save, blocking = statistics.median(save_s), statistics.median(blocking_s)

  start = time.perf_counter()
  restored = saver.restore_latest(state)
  restore = time.perf_counter() - start
  assert restored is not None and restored[0] == args.repeats
  start = time.perf_counter()
  checksums_lib.checksums(restored[1])
  verify = time.perf_counter() - start
  saver.close()

  start = time.perf_counter()
  for path in sorted((workdir / 'checkpoints' / str(args.repeats)).rglob('*')):
    if path.is_file():
      crc = 0
      with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
          crc = zlib.crc32(chunk, crc)
  reread = time.perf_counter() - start
  shutil.rmtree(workdir, ignore_errors=True)

  rate = gb / checksum
  result = {
      'state_gb': round(gb, 3), 'leaves': len(leaves), 'cpu_devices': args.cpu_devices,
      'cpu_cores': os.cpu_count(), 'checksum_s': round(checksum, 3),
      'checksum_gb_per_s': round(rate, 2), 'checksum_temp_bytes': int(temp),
      'save_s': round(save, 3), 'save_gb_per_s': round(gb / save, 2),
      'save_blocking_s': round(blocking, 3),
      'checksum_share_of_save': round(checksum / save, 3),
      'restore_latest_s': round(restore, 3), 'verify_s': round(verify, 3),
      'file_reread_crc32_s': round(reread, 3),
      f'{args.target_gb:g}gb_checksum_s_here': round(args.target_gb / rate, 1),
      f'{args.target_gb:g}gb_save_s_here': round(args.target_gb / (gb / save), 1),
      'jax': jax.__version__, 'python': sys.version.split()[0]}
  print(json.dumps(result, indent=1))
  print(f'\nchecksum {checksum:.3f} s ({rate:.2f} GB/s) vs save {save:.3f} s '
        f'({gb / save:.2f} GB/s) for {gb:.2f} GB: {100 * checksum / save:.1f} % of the save')
  print(f'the train loop waits {blocking:.3f} s in save (the checksum included); the rest of the '
        'write runs in the background')
  print(f'{args.target_gb:g} GB state, one read per byte:')
  print(f'  this CPU: {args.target_gb / rate:.0f} s of checksum vs '
        f'{args.target_gb / (gb / save):.0f} s of save')
  # Device figures are bandwidth arithmetic, not measurements: an FSDP state is spread evenly,
  # and each device reads its shard once from memory at its peak bandwidth.
  for name, devices, bandwidth in (('8 x H100 (3.35 TB/s)', 8, 3350),
                                   ('8 x TPU v5e (0.82 TB/s)', 8, 819),
                                   ('1 x H200 (4.8 TB/s)', 1, 4800)):
    seconds = args.target_gb / devices / bandwidth
    print(f'  {name}: {args.target_gb / devices:.1f} GB per device, {1e3 * seconds:.0f} ms at '
          'peak bandwidth')


if __name__ == '__main__':
  main()
