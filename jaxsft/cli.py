"""The `jaxsft` command line.

  jaxsft train --config FILE --workdir DIR [--config.a.b=value ...]   fine-tune
  jaxsft data inspect --config FILE [--config.a.b=value ...]  rendered examples with supervised
        text highlighted, length distribution, drop counts, packing efficiency
  jaxsft plan --config FILE [--device-memory-gib N]   per-device memory from shapes alone
  jaxsft export --workdir DIR --format merged|peft --out OUT [--dtype bfloat16]
  jaxsft info PATH      an HF checkpoint's architecture and parameter count

`--config` takes a Python file with `get_config()` (optionally `file.py:arg`), as ml-collections
`config_flags` does; `--config.a.b=value` overrides one setting, and unknown keys are errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def _info(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  del overrides
  from jaxsft import hf  # pylint: disable=import-outside-toplevel
  folder = hf.resolve_checkpoint_dir(args.path)
  config = hf.config_from_hf(hf.read_hf_config(folder))
  reader = hf.SafetensorsReader(folder)
  files = sorted(set(reader.weight_map.values()))
  summary = {
      'folder': folder, 'model_type': config.model_type,
      'parameters': config.num_params(), 'safetensors_files': len(files),
      'vocab_size': config.vocab_size, 'hidden_size': config.hidden_size,
      'intermediate_size': config.intermediate_size, 'num_layers': config.num_layers,
      'num_heads': config.num_heads, 'num_kv_heads': config.num_kv_heads,
      'head_dim': config.head_dim, 'rope_theta': config.rope_theta,
      'rope_scaling': config.rope_scaling, 'sliding_window': config.sliding_window,
      'tie_word_embeddings': config.tie_word_embeddings,
  }
  print(json.dumps(summary, indent=2))
  return 0


def _data_inspect(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  # pylint: disable=import-outside-toplevel
  from jaxsft.data.inspect import inspect_data
  from jaxsft.data.pipeline import load_tokenizer
  config = _load_config(args.config, overrides)
  tokenizer = load_tokenizer(config.data.tokenizer or config.model.path)
  color = sys.stdout.isatty() if args.color == 'auto' else args.color == 'always'
  print(inspect_data(config.data, tokenizer, batch_size=config.batch_size,
                     num_examples=args.examples, color=color))
  return 0


def _load_config(config_path: str, overrides: Sequence[str]):
  """ml-collections `config_flags` semantics: `--config file.py[:arg]` plus
  `--config.a.b=value` overrides, type-checked against the locked config."""
  # pylint: disable=import-outside-toplevel
  from absl import flags
  from ml_collections import config_flags
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'run config', flag_values=flag_values,
                                  lock_config=True)
  bad = [o for o in overrides if not o.startswith('--config.')]
  if bad:
    raise SystemExit(f'unknown arguments {bad}; config overrides look like --config.a.b=value.')
  flag_values(['jaxsft', f'--config={config_path}', *overrides])
  return flag_values.config


def _train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  # pylint: disable=import-outside-toplevel
  from jaxsft import distributed, train
  config = _load_config(args.config, overrides)
  distributed.initialize(config.distributed)  # before anything touches a JAX backend
  try:
    result = train.train(config, args.workdir)
  except train.NonFiniteLoss as error:
    logging.getLogger('jaxsft').error('%s', error)
    return train.EXIT_NON_FINITE
  except train.Preempted as preempted:
    logging.getLogger('jaxsft').warning('%s', preempted)
    return train.EXIT_PREEMPTED
  train.write_summary(args.workdir, result)
  return 0


def _plan(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from jaxsft import plan  # pylint: disable=import-outside-toplevel
  config = _load_config(args.config, overrides)
  print(plan.report(plan.plan(config), args.device_memory_gib))
  return 0


def _export(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  del overrides
  from jaxsft import export  # pylint: disable=import-outside-toplevel
  export.export_run(args.workdir, args.format, args.out, args.dtype)
  print(f'wrote {args.format} export of {args.workdir} to {args.out}')
  return 0


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--config', required=True,
                      help='config file with get_config() (file.py or file.py:arg); override '
                      'settings with --config.a.b=value')


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='jaxsft', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  info = commands.add_parser('info', help='describe an HF checkpoint folder (or hub id)')
  info.add_argument('path')
  info.set_defaults(run=_info)
  train = commands.add_parser('train', help='fine-tune a model (full or LoRA)')
  _add_config_arguments(train)
  train.add_argument('--workdir', required=True, help='metrics, config and outputs go here')
  train.set_defaults(run=_train)
  plan = commands.add_parser('plan', help='per-device memory of a run, from shapes alone')
  _add_config_arguments(plan)
  plan.add_argument('--device-memory-gib', type=float, default=None,
                    help='device memory to judge the plan against, e.g. 80 for an H100')
  plan.set_defaults(run=_plan)
  export = commands.add_parser('export', help='a run as a merged HF folder or a PEFT adapter')
  export.add_argument('--workdir', required=True)
  export.add_argument('--format', choices=('merged', 'peft'), required=True)
  export.add_argument('--out', required=True)
  export.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float16', 'float32'))
  export.set_defaults(run=_export)
  data = commands.add_parser('data', help='data tools').add_subparsers(dest='data_command',
                                                                      required=True)
  inspect = data.add_parser('inspect', help='show what the model will be trained on')
  _add_config_arguments(inspect)
  inspect.add_argument('--examples', type=int, default=3, help='rendered examples to show')
  inspect.add_argument('--color', choices=('auto', 'always', 'never'), default='auto')
  inspect.set_defaults(run=_data_inspect)
  args, overrides = parser.parse_known_args(argv)
  if overrides and args.command in ('info', 'export'):
    parser.error(f'unrecognized arguments: {overrides}')
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  return args.run(args, overrides)


if __name__ == '__main__':
  sys.exit(main())
