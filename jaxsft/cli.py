"""The `jaxsft` command line.

  jaxsft info PATH     architecture, parameter count and tensor layout of an HF checkpoint

Training, evaluation, generation and export commands join this entry point as they land.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='jaxsft', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  info = commands.add_parser('info', help='describe an HF checkpoint folder (or hub id)')
  info.add_argument('path')
  info.set_defaults(run=_info)
  args = parser.parse_args(argv)
  return args.run(args)


if __name__ == '__main__':
  sys.exit(main())
