"""The `jaxsft` command line.

  jaxsft train --config FILE --workdir DIR [--config.a.b=value ...]   fine-tune
  jaxsft data inspect --config FILE [--config.a.b=value ...] [--dump FILE.jsonl]  rendered
        examples with supervised text highlighted, length distribution, drop and per-turn loss
        counts, packing efficiency; --dump writes every example's input_ids and loss_mask
  jaxsft data clean --config FILE --out DIR [--against EVAL_FILE ...] [--against-tasks T,...]
        the training sources without exact / near duplicates, evaluation data (n-gram overlap)
        and empty or degenerate answers, in their own format; removed.jsonl says why
  jaxsft plan --config FILE [--device-memory-gib N] [--find-max-seq-len] [--platform P]
        [--devices N]   per-device memory from shapes alone; --devices plans for N devices
        (a slice) on N fake CPU host devices
  jaxsft export --workdir DIR --format merged|peft|gguf --out OUT [--dtype bfloat16]
                [--gguf-type f32|f16|bf16|q8_0]
  jaxsft eval --workdir DIR | --hf PATH [--data FILE] [--generate N]   NLL, perplexity, ...
  jaxsft generate --workdir DIR | --hf PATH --prompt "..."   (or --prompts file.jsonl, with
        MT-Bench questions too; --out answers.jsonl)
  jaxsft chat --workdir DIR | --hf PATH     interactive, multi-turn
  jaxsft benchmark --workdir DIR | --hf PATH --tasks mmlu,gsm8k,humaneval --out results.json
        lm-evaluation-harness tasks (--include-path DIR: local task YAMLs) and HumanEval pass@k
        (executed in a sandbox; --completions FILE scores given completions); needs the eval
        extra: pip install -e '.[eval]'
  jaxsft info PATH      an HF checkpoint's architecture and parameter count, its config.json
        checked against its safetensors headers

`--config` takes a Python file with `get_config()` (optionally `file.py:arg`);
`--config.a.b=value` overrides one setting (a Python literal: numbers, booleans, lists, tuples,
dicts; anything else is a string), and unknown keys are errors that name the closest key.

Every command takes `--verbose` (library INFO logs: JAX, Orbax, absl) and `--debug` (the
traceback of a user error). A user error (a config value, a path, a data record, a work
directory in use, a checkpoint the disk cannot take) prints one line `jaxsft: error: ...` and
exits with 2; training exits 3 when the loss or gradients become non-finite, 75 when preempted
(SIGTERM) and 130 on Ctrl-C (after saving the current step; a second Ctrl-C stops at once).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from jaxsft.cli import data_clean, evaluation, flags, training
from jaxsft.errors import EXIT_USER_ERROR, UserError
from jaxsft.train.preemption import EXIT_INTERRUPTED, SigtermFlag


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--config', required=True,
                      help='config file with get_config() (file.py or file.py:arg); override '
                      'settings with --config.a.b=value')


def main(argv: Sequence[str] | None = None) -> int:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--verbose', action='store_true',
                      help='also show library INFO logs (JAX, Orbax, absl)')
  common.add_argument('--debug', action='store_true',
                      help='show the traceback of a user error instead of one line')
  parser = argparse.ArgumentParser(prog='jaxsft', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  add_parser = lambda *a, **k: commands.add_parser(*a, parents=[common], **k)  # noqa: E731
  info = add_parser('info', help='describe an HF checkpoint folder (or hub id); a folder '
                    'whose config.json and weights disagree is an error (exit 2)')
  info.add_argument('path')
  info.set_defaults(run=training.info)
  train = add_parser('train', help='fine-tune a model (full or LoRA)')
  _add_config_arguments(train)
  train.add_argument('--workdir', required=True, help='metrics, config and outputs go here')
  train.set_defaults(run=training.train)
  plan = add_parser('plan', help='per-device memory of a run, from shapes alone')
  _add_config_arguments(plan)
  plan.add_argument('--device-memory-gib', type=flags.positive_float, default=None,
                    help='device memory to judge the plan against, e.g. 80 for an H100')
  plan.add_argument('--platform', choices=('tpu', 'cuda', 'rocm', 'cpu'), default=None,
                    help='lower the train step for this platform (jax.export, no device '
                    'needed) and report the attention kernel it gets, instead of compiling '
                    'it here for a memory plan')
  plan.add_argument('--find-max-seq-len', action='store_true',
                    help='search the longest data.max_seq_len (multiple of 256, up to 4M tokens; '
                         'rows past 51,200 to within 1 %%) that fits in --device-memory-gib')
  plan.add_argument('--devices', type=flags.positive_int, default=None, metavar='N',
                    help='plan for N devices (e.g. 8 for an 8-chip slice) on N fake CPU host '
                    'devices of this machine: the mesh, the shardings and the per-device bytes '
                    'of N devices, measured on the XLA:CPU compile')
  plan.set_defaults(run=training.plan)
  export = add_parser('export', help='a run as a merged HF folder, a PEFT adapter or a GGUF '
                      'file (llama.cpp)')
  export.add_argument('--workdir', required=True)
  export.add_argument('--format', choices=('merged', 'peft', 'gguf'), required=True)
  export.add_argument('--out', required=True, help='a folder (merged, peft) or a .gguf file')
  export.add_argument('--dtype', default=None, choices=('bfloat16', 'float16', 'float32'),
                      help='merged: the weights\' dtype (default bfloat16)')
  export.add_argument('--gguf-type', default=None, choices=('f32', 'f16', 'bf16', 'q8_0'),
                      help='gguf: the 2-D weights\' type (default f16; norms stay f32)')
  export.set_defaults(run=training.export)
  eval_parser = add_parser('eval', help='NLL / perplexity / accuracy (+ exact match, '
                                   'ROUGE-L) of a run or HF checkpoint on a data file')
  evaluation.add_model_arguments(eval_parser)
  eval_parser.add_argument('--data', default='', help='json/jsonl/parquet records; default: '
                          "the run's eval data")
  eval_parser.add_argument('--batch-size', type=flags.positive_int, default=8)
  eval_parser.add_argument('--generate', type=flags.non_negative_int, default=0,
                          help='also answer the first N records greedily and score them')
  eval_parser.add_argument('--max-new-tokens', type=flags.positive_int, default=256)
  eval_parser.add_argument('--out', default='', help='write the JSON report here too')
  eval_parser.set_defaults(run=evaluation.evaluate)
  gen = add_parser('generate', help='answer prompts with a run or HF checkpoint')
  evaluation.add_model_arguments(gen)
  gen.add_argument('--prompt', action='append', default=[])
  gen.add_argument('--prompts', default='', help='a .jsonl file of {"prompt": ...} or '
                   'MT-Bench {"question_id", "turns": [...]} lines')
  gen.add_argument('--out', default='', help='also write the answers here (JSONL; FastChat\'s '
                   'answer format for MT-Bench questions)')
  gen.add_argument('--model-id', default='', help='model_id in MT-Bench answers (default: '
                   'the folder name)')
  evaluation.add_sampling_arguments(gen)
  gen.set_defaults(run=evaluation.generate)
  chat = add_parser('chat', help='talk to a run or HF checkpoint (multi-turn)')
  evaluation.add_model_arguments(chat)
  chat.add_argument('--system', default='')
  evaluation.add_sampling_arguments(chat)
  chat.set_defaults(run=evaluation.chat)
  bench = add_parser('benchmark', help='lm-evaluation-harness tasks and HumanEval pass@k of a '
                     'run or HF checkpoint')
  evaluation.add_benchmark_arguments(bench)
  bench.set_defaults(run=evaluation.benchmark)
  data = commands.add_parser('data', help='data tools').add_subparsers(dest='data_command',
                                                                      required=True)
  inspect = data.add_parser('inspect', parents=[common],
                            help='show what the model will be trained on')
  _add_config_arguments(inspect)
  inspect.add_argument('--examples', type=flags.non_negative_int, default=3,
                       help='rendered examples to show')
  inspect.add_argument('--color', choices=('auto', 'always', 'never'), default='auto')
  inspect.add_argument('--dump', default='', metavar='FILE.jsonl',
                       help='also write every example\'s input_ids and loss_mask (before '
                       'packing, in record order, with its source and record index) here')
  inspect.set_defaults(run=training.data_inspect)
  clean = data.add_parser('clean', parents=[common],
                          help='remove duplicates, near duplicates, evaluation data and empty '
                          'or degenerate records')
  _add_config_arguments(clean)
  data_clean.add_arguments(clean)
  clean.set_defaults(run=data_clean.clean)
  args, overrides = parser.parse_known_args(argv)
  if overrides and args.command in ('info', 'export', 'eval', 'generate', 'chat', 'benchmark'):
    parser.error(f'unrecognized arguments: {overrides}')
  _quiet_libraries(args.verbose)
  # Before JAX loads: a SIGTERM while a run starts up stops it with exit code 75, not mid-write;
  # Ctrl-C stops a start-up at once and a running run after saving (130), never by raising
  # KeyboardInterrupt under Orbax's save threads (`jaxsft.train.preemption`).
  preemption = (SigtermFlag(hard_exit=True) if args.command == 'train'
                else contextlib.nullcontext())
  try:
    with preemption:
      return args.run(args, overrides)
  except UserError as error:
    if args.debug:
      raise
    print(f'jaxsft: error: {error}', file=sys.stderr)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:
    print('jaxsft: interrupted', file=sys.stderr)
    return EXIT_INTERRUPTED


def _quiet_libraries(verbose: bool) -> None:
  """jaxsft's own INFO lines (one per log step) always; the INFO chatter of JAX (the TPU
  backend probe), Orbax and absl, and the progress bars of `datasets`, only with --verbose.
  XLA's C++ INFO logs read TF_CPP_MIN_LOG_LEVEL when the backend starts, which is after this."""
  if not verbose:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
    # `datasets` reads this when imported: no "Generating train split" / map bars.
    os.environ.setdefault('HF_DATASETS_DISABLE_PROGRESS_BARS', '1')
    # ... nor its own error lines about a file it cannot parse: jaxsft names the file (and the
    # line) in its one error line instead.
    os.environ.setdefault('DATASETS_VERBOSITY', 'critical')
    # transformers, imported later, advises at import that torch is missing (jaxsft needs none).
    os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
  logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                      format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('jaxsft').setLevel(logging.INFO)
  for name in ('absl', 'jax', 'orbax'):
    logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
  if not verbose:
    # Orbax logs through absl, which would otherwise pass INFO records on.
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    absl_logging.set_verbosity(absl_logging.WARNING)

