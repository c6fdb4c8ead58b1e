"""The longest row that fits a device, for full / LoRA / QLoRA fine-tuning, from `jaxsft plan`
(shapes only: nothing is allocated, so this runs on a CPU).

  python scripts/bench_memory.py                    # LLaMA-2-7B on one device: 24, 40, 80 GiB
  python scripts/bench_memory.py --sizes 80 --methods lora --remat save_dots
  python scripts/bench_memory.py --config configs/llama3_8b_long_context.py --devices 1,2,4,8
      # LLaMA-3.1-8B with each row split over N devices (mesh (1, 1, N, 1), fake CPU devices)

Full fine-tuning keeps bf16 weights and bf16 Adam moments here (`model.param_dtype=bfloat16`):
float32 master weights and moments are 16 bytes per parameter, 100 GiB for 6.7B, which no
single device below holds. LoRA's frozen base is bf16; QLoRA's is NF4 with double quantization.
"""

from __future__ import annotations

import argparse
import json
import os

METHODS = {
    'full': ['lora.enabled=False', 'quant.kind=none', 'model.param_dtype=bfloat16'],
    'lora': ['lora.enabled=True', 'quant.kind=none', 'model.param_dtype=bfloat16'],
    'qlora': ['lora.enabled=True', 'quant.kind=nf4'],
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', default='24,40,80', help='device memory, GiB')
  parser.add_argument('--methods', default='full,lora,qlora')
  parser.add_argument('--remat', default='full')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--multiple', type=int, default=256)
  parser.add_argument('--config', default='configs/llama2_7b_qlora.py')
  parser.add_argument('--devices', default='',
                      help='device counts N to plan with rows split over N (context '
                      'parallelism, fake CPU devices); default: the config\'s mesh on one')
  args = parser.parse_args()
  counts = [int(n) for n in args.devices.split(',')] if args.devices else [0]
  if args.devices:  # before JAX starts
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={max(counts)}')
  # pylint: disable=import-outside-toplevel
  import jax

  from jaxsft.config import load_config
  from jaxsft.train import plan
  from jaxsft.train.run import run_settings
  plan.use_memory_schedule()  # as `jaxsft plan` does
  print(plan.schedule_note())
  print('| method | devices | ' + ' | '.join(f'{s} GiB' for s in args.sizes.split(',')) + ' |')
  print('| --- | ---: |' + ' ---: |' * len(args.sizes.split(',')))
  for method in args.methods.split(','):
    for count in counts:
      overrides = ['model.path=', f'model.remat_policy={args.remat}',
                   f'batch_size={args.batch}', *METHODS[method]]
      if count:
        overrides.append(f'mesh.shape=(1,1,{count},1)')
      settings = run_settings(load_config(args.config, overrides))
      devices = jax.devices()[:count] if count else jax.devices()[:1]
      cache: dict = {}
      cells = []
      for size in args.sizes.split(','):
        length, memory = plan.max_seq_len(settings, float(size), multiple=args.multiple,
                                          devices=devices, cache=cache)
        cells.append(f'{length:,}' if length else 'does not fit')
        print(json.dumps({
            'method': method, 'devices': len(devices), 'device_memory_gib': float(size),
            'max_seq_len': length, 'plan_gib': memory.total_bytes / plan.GIB if memory else None,
            'frozen_gib': memory.frozen_bytes / plan.GIB if memory else None,
            'temporary_gib': memory.temporary_bytes / plan.GIB if memory else None}),
              flush=True)
      print(f'| {method} | {len(devices)} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
