"""The longest LLaMA-2-7B row that fits one device, for full / LoRA / QLoRA fine-tuning, from
`jaxsft plan` (shapes only: nothing is allocated, so this runs on a CPU).

  python scripts/bench_memory.py                    # 24, 40 and 80 GiB; batch 1; full remat
  python scripts/bench_memory.py --sizes 80 --methods lora --remat save_dots

Full fine-tuning keeps bf16 weights and bf16 Adam moments here (`model.param_dtype=bfloat16`):
float32 master weights and moments are 16 bytes per parameter, 100 GiB for 6.7B, which no
single device below holds. LoRA's frozen base is bf16; QLoRA's is NF4 with double quantization.
"""

from __future__ import annotations

import argparse
import json

from jaxsft.config import load_config
from jaxsft.train import plan
from jaxsft.train.run import run_settings

METHODS = {
    'full': ['lora.enabled=False', 'quant.kind=none', 'model.param_dtype=bfloat16'],
    'lora': ['quant.kind=none', 'model.param_dtype=bfloat16'],
    'qlora': [],
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', default='24,40,80', help='device memory, GiB')
  parser.add_argument('--methods', default='full,lora,qlora')
  parser.add_argument('--remat', default='full')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--multiple', type=int, default=256)
  args = parser.parse_args()
  print('| method | ' + ' | '.join(f'{s} GiB' for s in args.sizes.split(',')) + ' |')
  print('| --- |' + ' ---: |' * len(args.sizes.split(',')))
  for method in args.methods.split(','):
    overrides = ['model.path=', f'model.remat_policy={args.remat}', f'batch_size={args.batch}',
                 *METHODS[method]]
    settings = run_settings(load_config('configs/llama2_7b_qlora.py', overrides))
    cache: dict = {}
    cells = []
    for size in args.sizes.split(','):
      length, memory = plan.max_seq_len(settings, float(size), multiple=args.multiple,
                                        cache=cache)
      cells.append(f'{length:,}' if length else 'does not fit')
      print(json.dumps({'method': method, 'device_memory_gib': float(size), 'max_seq_len': length,
                        'plan_gib': memory.total_bytes / plan.GIB if memory else None,
                        'frozen_gib': memory.frozen_bytes / plan.GIB if memory else None,
                        'temporary_gib': memory.temporary_bytes / plan.GIB if memory else None}),
            flush=True)
    print(f'| {method} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
