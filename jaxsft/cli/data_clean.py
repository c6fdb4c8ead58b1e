"""`jaxsft data clean`: a config's training sources without duplicates, evaluation data, empty or
degenerate answers, written to `--out` (`jaxsft.data.clean_io`).

Evaluation data comes from files (`--against FILE`, `data.clean.against`) and from jaxsft
benchmark tasks (`--against-tasks mmlu,humaneval`, `--include-path DIR`): their items are read
here, in the CLI, because the data layer never imports evaluation code; it gets their texts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from jaxsft.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--out', required=True,
                      help='folder for the kept records (each source in its own format), '
                      'removed.jsonl and clean_summary.json')
  parser.add_argument('--against', action='append', default=[], metavar='EVAL_FILE',
                      help='JSON / JSONL / parquet evaluation items whose text must not be '
                      'trained on (repeatable; added to data.clean.against)')
  parser.add_argument('--against-tasks', default='', metavar='TASKS',
                      help='comma-separated jaxsft benchmark tasks (lm-eval tasks, humaneval) '
                      'whose evaluation documents must not be trained on; needs the eval extra')
  parser.add_argument('--include-path', default='',
                      help='a folder of lm-eval task YAMLs for --against-tasks')
  parser.add_argument('--threshold', type=float, default=None,
                      help='near duplicates: Jaccard similarity (0, 1]; sets '
                      'data.clean.near_threshold')
  parser.add_argument('--num-proc', type=int, default=None,
                      help='worker processes for parsing and hashing (default: data.num_proc); '
                      'the result does not depend on it')


def benchmark_items(tasks: Sequence[str], include_path: str = '') -> list[Any]:
  """The evaluation documents of jaxsft benchmark tasks as `EvalItem`s (`benchmark:TASK`, the
  document's index, its texts: `jaxsft.eval.benchmark.task_texts`)."""
  if not tasks:
    return []
  # pylint: disable=import-outside-toplevel
  from jaxsft.data.contamination import EvalItem
  try:
    from jaxsft.eval import benchmark as bench
  except ImportError as error:  # the eval extra is not installed
    raise UserError(f'--against-tasks needs the eval extra ({error}); install it with '
                    "pip install -e '.[eval]'.") from None
  return [EvalItem(f'benchmark:{task}', index, tuple(texts))
          for task, index, texts in bench.task_texts(tasks, include_path or None)]


def clean(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  # pylint: disable=import-outside-toplevel
  from jaxsft.cli.training import load_config
  from jaxsft.data.clean import CleanSettings, summary_line
  from jaxsft.data.clean_io import REMOVED_FILE, SUMMARY_FILE, clean_files, eval_items_from
  from jaxsft.data.spec import dataset_spec
  if args.threshold is not None and not 0 < args.threshold <= 1:
    raise UserError(f'--threshold {args.threshold:g}: a near-duplicate threshold is a Jaccard '
                    'similarity in (0, 1], e.g. 0.7.')
  if args.num_proc is not None and args.num_proc < 1:
    raise UserError(f'--num-proc {args.num_proc}: give 1 or more worker processes.')
  for path in args.against:  # before anything is read or imported: a typo costs nothing
    if not os.path.isfile(path):
      raise UserError(f'--against {path}: no such file; give a JSON, JSONL or parquet file of '
                      'evaluation items.')
  config = load_config(args.config, overrides)
  if args.threshold is not None:
    config.data.clean.near_threshold = args.threshold
  settings = CleanSettings.from_config(config.data.clean)
  specs = [dataset_spec(entry, f'data.datasets[{i}]')
           for i, entry in enumerate(config.data.datasets)]
  if not specs:
    raise UserError('data.datasets is empty; add the {"path": ...} entries to clean.')
  items = eval_items_from(settings.against, 'data.clean.against:')
  items += eval_items_from(args.against, '--against')
  tasks = [t.strip() for t in args.against_tasks.split(',') if t.strip()]
  items += benchmark_items(tasks, args.include_path)
  summary = clean_files(specs, settings, args.out, eval_items=items,
                        num_proc=args.num_proc or config.data.num_proc,
                        on_bad_record=config.data.on_bad_record)
  print(f'{len(specs)} source{"s" if len(specs) > 1 else ""}: {summary_line(summary)}')
  if items:
    print(f'compared with {len(items)} evaluation items from {", ".join(summary["against"])} '
          f'({summary["eval_items"]["comparable"]} with a field of 8 or more words)')
  for spec, entry in zip(specs, summary['datasets']):
    counts = summary['sources'][spec['path']]
    print(f'  {spec["path"]}: {counts["records"]} records, {counts["kept"]} kept -> '
          f'{entry["path"]}')
  print(f'removed records: {os.path.join(args.out, REMOVED_FILE)} (the record or evaluation '
        f'item each one matched); summary: {os.path.join(args.out, SUMMARY_FILE)}')
  print(f'train on it: --config.data.datasets="{summary["datasets"]}"')
  return 0
