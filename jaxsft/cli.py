"""The `jaxsft` command line.

  jaxsft info PATH                         an HF checkpoint's architecture and parameter count
  jaxsft data inspect --config FILE [...]  rendered examples with supervised text highlighted,
                                           length distribution, drop counts, packing efficiency

`--config` takes a Python file with `get_config()` (optionally `file.py:arg`); `--set key=value`
overrides one setting (repeatable).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def _info(args: argparse.Namespace) -> int:
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


def _data_inspect(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  from jaxsft.config import load_config
  from jaxsft.data.inspect import inspect_data
  from jaxsft.data.pipeline import load_tokenizer
  config = load_config(args.config, args.set)
  tokenizer = load_tokenizer(config.data.tokenizer or config.model.path)
  color = sys.stdout.isatty() if args.color == 'auto' else args.color == 'always'
  print(inspect_data(config.data, tokenizer, batch_size=config.batch_size,
                     num_examples=args.examples, color=color))
  return 0


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--config', required=True, help='config file with get_config()')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='override a config setting, e.g. --set data.max_seq_len=1024')


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='jaxsft', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  info = commands.add_parser('info', help='describe an HF checkpoint folder (or hub id)')
  info.add_argument('path')
  info.set_defaults(run=_info)
  data = commands.add_parser('data', help='data tools').add_subparsers(dest='data_command',
                                                                      required=True)
  inspect = data.add_parser('inspect', help='show what the model will be trained on')
  _add_config_arguments(inspect)
  inspect.add_argument('--examples', type=int, default=3, help='rendered examples to show')
  inspect.add_argument('--color', choices=('auto', 'always', 'never'), default='auto')
  inspect.set_defaults(run=_data_inspect)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  return args.run(args)


if __name__ == '__main__':
  sys.exit(main())
