"""The `jaxsft` command line.

  jaxsft train --config FILE --workdir DIR [--config.a.b=value ...]   fine-tune
  jaxsft data inspect --config FILE [--config.a.b=value ...]  rendered examples with supervised
        text highlighted, length distribution, drop counts, packing efficiency
  jaxsft plan --config FILE [--device-memory-gib N] [--find-max-seq-len]
                                                   per-device memory from shapes alone
  jaxsft export --workdir DIR --format merged|peft --out OUT [--dtype bfloat16]
  jaxsft eval --workdir DIR | --hf PATH [--data FILE] [--generate N]   NLL, perplexity, ...
  jaxsft generate --workdir DIR | --hf PATH --prompt "..."   (or --prompts file.jsonl)
  jaxsft chat --workdir DIR | --hf PATH     interactive, multi-turn
  jaxsft info PATH      an HF checkpoint's architecture and parameter count

`--config` takes a Python file with `get_config()` (optionally `file.py:arg`);
`--config.a.b=value` overrides one setting (a Python literal: numbers, booleans, lists, tuples,
dicts; anything else is a string), and unknown keys are errors that name the closest key.

Every command takes `--verbose` (library INFO logs: JAX, Orbax, absl) and `--debug` (the
traceback of a user error). A user error (a config value, a path, a data record, a work
directory in use) prints one line `jaxsft: error: ...` and exits with 2; training exits 3 when
the loss or gradients become non-finite and 75 when preempted (SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence

from jaxsft.errors import EXIT_USER_ERROR, UserError
from jaxsft.train.preemption import SigtermFlag


def _info(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  del overrides
  # pylint: disable=import-outside-toplevel
  from jaxsft.interop import hf, hf_config
  folder = hf_config.resolve_checkpoint_dir(args.path)
  config = hf_config.config_from_hf(hf_config.read_hf_config(folder))
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
  from jaxsft.data.tokenizer import load_tokenizer
  config = _load_config(args.config, overrides)
  tokenizer = load_tokenizer(config.data.tokenizer or config.model.path)
  color = sys.stdout.isatty() if args.color == 'auto' else args.color == 'always'
  print(inspect_data(config.data, tokenizer, batch_size=config.batch_size,
                     num_examples=args.examples, color=color))
  return 0


def _load_config(config_path: str, overrides: Sequence[str]):
  """`--config file.py[:arg]` (`jaxsft.config.load_config`, locked) with every
  `--config.a.b=value` applied by `jaxsft.config.apply_override`, then the values checked
  (`jaxsft.train.validate.check_config`) before anything is built."""
  # pylint: disable=import-outside-toplevel
  from jaxsft.config import load_config
  from jaxsft.train.validate import check_config
  bad = [o for o in overrides if not o.startswith('--config.') or '=' not in o]
  if bad:
    raise UserError(f'unknown arguments {bad}; config overrides look like --config.a.b=value.')
  config = load_config(config_path, [o[len('--config.'):] for o in overrides])
  check_config(config)
  return config


def _train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  # pylint: disable=import-outside-toplevel
  from jaxsft.demo import DemoCallback
  from jaxsft.eval.sampling import SampleCallback
  from jaxsft.parallel import distributed
  from jaxsft.train import loop, run
  config = _load_config(args.config, overrides)
  distributed.initialize(config.distributed)  # before anything touches a JAX backend
  callbacks = []
  if config.train.sample_every and config.train.sample_prompts:
    callbacks.append(SampleCallback())
  if config.demo.enabled:
    callbacks.append(DemoCallback())
  try:
    result = run.train(config, args.workdir, callbacks)
  except loop.NonFiniteLoss as error:
    logging.getLogger('jaxsft').error('%s', error)
    return loop.EXIT_NON_FINITE
  except loop.Preempted as preempted:
    logging.getLogger('jaxsft').warning('%s', preempted)
    return loop.EXIT_PREEMPTED
  except run.RunFinished as finished:
    print(finished)
    return 0
  run.write_summary(args.workdir, result)
  return 0


def _plan(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  from jaxsft.train import plan  # pylint: disable=import-outside-toplevel
  config = _load_config(args.config, overrides)
  if args.find_max_seq_len:
    if not args.device_memory_gib:
      raise UserError('jaxsft plan --find-max-seq-len needs --device-memory-gib, e.g. 80.')
    length, memory = plan.max_seq_len(config, args.device_memory_gib)
    if memory is None:
      print(f'not even 256 tokens per row fit in {args.device_memory_gib:g} GiB per device '
            f'with batch_size={config.batch_size}.')
      return 1
    print(f'longest data.max_seq_len that fits in {args.device_memory_gib:g} GiB per device '
          f'(batch_size={config.batch_size}): {length}')
    print(plan.report(memory, args.device_memory_gib))
    return 0
  print(plan.report(plan.plan(config), args.device_memory_gib))
  return 0


def _export(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  del overrides
  from jaxsft.train import export  # pylint: disable=import-outside-toplevel
  export.export_run(args.workdir, args.format, args.out, args.dtype)
  print(f'wrote {args.format} export of {args.workdir} to {args.out}')
  return 0


def _model(args: argparse.Namespace):
  # pylint: disable=import-outside-toplevel
  from jaxsft.config import default_config
  from jaxsft.eval import model
  if bool(args.workdir) == bool(args.hf):
    raise UserError('give exactly one of --workdir (a jaxsft run) or --hf (an HF checkpoint).')
  if args.workdir:
    return model.from_workdir(args.workdir)
  config = default_config()
  config.model.path = args.hf
  config.data.template = args.template
  config.data.max_seq_len = args.max_seq_len
  return model.from_hf(config)


def _eval(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  del overrides
  from jaxsft.eval import metrics  # pylint: disable=import-outside-toplevel
  model = _model(args)
  data = args.data or (model.config.data.eval_datasets[0]['path']
                       if model.config.data.eval_datasets else '')
  if not data:
    raise UserError('no eval data: pass --data FILE (json/jsonl/parquet).')
  report = {'data': data, **metrics.likelihood(model, data, args.batch_size)}
  if args.generate:
    report.update(metrics.generation_metrics(model, data, args.generate, args.max_new_tokens))
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  return 0


def _generate(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  del overrides
  # pylint: disable=import-outside-toplevel
  from jaxsft.eval.generate import SamplingConfig
  from jaxsft.eval.model import answer
  prompts = list(args.prompt)
  if args.prompts:
    prompts += _read_prompts(args.prompts)
  if not prompts:
    raise UserError('give --prompt TEXT (repeatable) or --prompts FILE.jsonl ({"prompt": ...}).')
  model = _model(args)
  sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k,
                                     args.top_p)
  answers = answer(model, [[{'role': 'user', 'content': p}] for p in prompts],
                            sampling, args.seed)
  for prompt, text in zip(prompts, answers):
    print(json.dumps({'prompt': prompt, 'answer': text}, ensure_ascii=False))
  return 0


def _read_prompts(path: str) -> list[str]:
  """The `prompt` of each line of a JSONL file; a bad line is a `UserError` naming it."""
  if not os.path.isfile(path):
    raise UserError(f'--prompts {path}: no such file; give a .jsonl file with one '
                    '{"prompt": "..."} per line.')
  prompts = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        prompts.append(str(record['prompt']))
      except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f'--prompts {path}, line {number}: expected {{"prompt": "..."}} '
                        f'({type(error).__name__}: {error}).') from None
  return prompts


def _chat(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  del overrides
  # pylint: disable=import-outside-toplevel
  from jaxsft.eval.generate import SamplingConfig
  from jaxsft.eval.model import answer
  model = _model(args)
  sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k,
                                     args.top_p)
  history = [{'role': 'system', 'content': args.system}] if args.system else []
  print('chat: an empty line or Ctrl-D ends; /reset forgets the conversation.')
  while True:
    try:
      line = input('you> ').strip()
    except EOFError:
      return 0
    if not line:
      return 0
    if line == '/reset':
      history = history[:1] if args.system else []
      continue
    history.append({'role': 'user', 'content': line})
    reply = answer(model, [history], sampling, args.seed)[0]
    history.append({'role': 'assistant', 'content': reply})
    print(f'model> {reply}')


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--workdir', default='', help='a jaxsft train work directory')
  parser.add_argument('--hf', default='', help='or a plain HF checkpoint folder')
  parser.add_argument('--template', default='jinja',
                      help='with --hf: chat template (jinja = the tokenizer\'s own)')
  parser.add_argument('--max-seq-len', type=int, default=2048)


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--max-new-tokens', type=int, default=256)
  parser.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
  parser.add_argument('--top-k', type=int, default=0)
  parser.add_argument('--top-p', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0)


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
  info = add_parser('info', help='describe an HF checkpoint folder (or hub id)')
  info.add_argument('path')
  info.set_defaults(run=_info)
  train = add_parser('train', help='fine-tune a model (full or LoRA)')
  _add_config_arguments(train)
  train.add_argument('--workdir', required=True, help='metrics, config and outputs go here')
  train.set_defaults(run=_train)
  plan = add_parser('plan', help='per-device memory of a run, from shapes alone')
  _add_config_arguments(plan)
  plan.add_argument('--device-memory-gib', type=float, default=None,
                    help='device memory to judge the plan against, e.g. 80 for an H100')
  plan.add_argument('--find-max-seq-len', action='store_true',
                    help='search the longest data.max_seq_len (multiple of 256) that fits in '
                         '--device-memory-gib')
  plan.set_defaults(run=_plan)
  export = add_parser('export', help='a run as a merged HF folder or a PEFT adapter')
  export.add_argument('--workdir', required=True)
  export.add_argument('--format', choices=('merged', 'peft'), required=True)
  export.add_argument('--out', required=True)
  export.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float16', 'float32'))
  export.set_defaults(run=_export)
  evaluation = add_parser('eval', help='NLL / perplexity / accuracy (+ exact match, '
                                   'ROUGE-L) of a run or HF checkpoint on a data file')
  _add_model_arguments(evaluation)
  evaluation.add_argument('--data', default='', help='json/jsonl/parquet records; default: '
                          "the run's eval data")
  evaluation.add_argument('--batch-size', type=int, default=8)
  evaluation.add_argument('--generate', type=int, default=0,
                          help='also answer the first N records greedily and score them')
  evaluation.add_argument('--max-new-tokens', type=int, default=256)
  evaluation.add_argument('--out', default='', help='write the JSON report here too')
  evaluation.set_defaults(run=_eval)
  gen = add_parser('generate', help='answer prompts with a run or HF checkpoint')
  _add_model_arguments(gen)
  gen.add_argument('--prompt', action='append', default=[])
  gen.add_argument('--prompts', default='', help='a .jsonl file of {"prompt": ...}')
  _add_sampling_arguments(gen)
  gen.set_defaults(run=_generate)
  chat = add_parser('chat', help='talk to a run or HF checkpoint (multi-turn)')
  _add_model_arguments(chat)
  chat.add_argument('--system', default='')
  _add_sampling_arguments(chat)
  chat.set_defaults(run=_chat)
  data = commands.add_parser('data', help='data tools').add_subparsers(dest='data_command',
                                                                      required=True)
  inspect = data.add_parser('inspect', parents=[common],
                            help='show what the model will be trained on')
  _add_config_arguments(inspect)
  inspect.add_argument('--examples', type=int, default=3, help='rendered examples to show')
  inspect.add_argument('--color', choices=('auto', 'always', 'never'), default='auto')
  inspect.set_defaults(run=_data_inspect)
  args, overrides = parser.parse_known_args(argv)
  if overrides and args.command in ('info', 'export', 'eval', 'generate', 'chat'):
    parser.error(f'unrecognized arguments: {overrides}')
  _quiet_libraries(args.verbose)
  # Before JAX loads: a SIGTERM while a run starts up stops it with exit code 75, not mid-write.
  preemption = SigtermFlag() if args.command == 'train' else contextlib.nullcontext()
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
    return 130


def _quiet_libraries(verbose: bool) -> None:
  """jaxsft's own INFO lines (one per log step) always; the INFO chatter of JAX (the TPU
  backend probe), Orbax and absl, and the progress bars of `datasets`, only with --verbose.
  XLA's C++ INFO logs read TF_CPP_MIN_LOG_LEVEL when the backend starts, which is after this."""
  if not verbose:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
    # `datasets` reads this when imported: no "Generating train split" / map bars.
    os.environ.setdefault('HF_DATASETS_DISABLE_PROGRESS_BARS', '1')
  logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                      format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('jaxsft').setLevel(logging.INFO)
  for name in ('absl', 'jax', 'orbax'):
    logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
  if not verbose:
    # Orbax logs through absl, which would otherwise pass INFO records on.
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    absl_logging.set_verbosity(absl_logging.WARNING)


if __name__ == '__main__':
  sys.exit(main())
