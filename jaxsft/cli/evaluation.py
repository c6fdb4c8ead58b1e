"""The commands that use a trained model: `eval`, `generate`, `chat` and `benchmark`.

Each imports what it needs when it runs, so `jaxsft --help` loads none of it.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from jaxsft.cli import flags
from jaxsft.errors import UserError

# With --hf, eval packs records into rows of this many tokens unless --max-seq-len says.
HF_EVAL_SEQ_LEN = 2048


def load_model(args: argparse.Namespace):
  """The `--workdir` run or the `--hf` checkpoint of a command."""
  # pylint: disable=import-outside-toplevel
  from jaxsft.config import default_config
  from jaxsft.eval import model
  if bool(args.workdir) == bool(args.hf):
    raise UserError('give exactly one of --workdir (a jaxsft run) or --hf (an HF checkpoint).')
  if args.workdir:
    loaded = model.from_workdir(args.workdir)
  else:
    config = default_config()
    config.model.path = args.hf
    config.data.template = args.template
    config.data.max_seq_len = args.max_seq_len or HF_EVAL_SEQ_LEN
    loaded = model.from_hf(args.hf, config.data)
  loaded.max_context = args.max_seq_len  # None: the model's own positions
  return loaded


def evaluate(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  del overrides
  from jaxsft.eval import metrics  # pylint: disable=import-outside-toplevel
  model = load_model(args)
  data = args.data or (model.data.eval_datasets[0]['path']
                       if model.data.eval_datasets else '')
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


def generate(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  """Answers to `--prompt`s and to `--prompts FILE.jsonl`: lines of `{"prompt": ...}`, or
  MT-Bench questions (`{"question_id", "turns": [...]}`, FastChat's format), whose turns are
  answered one after another with the conversation so far. `--out` writes the answers as JSONL:
  FastChat's answer records for questions, `{"prompt", "answer"}` otherwise."""
  del overrides
  # pylint: disable=import-outside-toplevel
  from jaxsft.eval.generate import PromptTooLong, SamplingConfig
  from jaxsft.eval.model import answer
  items: list[Any] = [_decoded_argument(prompt, '--prompt') for prompt in args.prompt]
  if args.prompts:
    items += read_prompts(args.prompts)
  if not items:
    raise UserError('give --prompt TEXT (repeatable) or --prompts FILE.jsonl ({"prompt": ...} '
                    'or MT-Bench {"question_id", "turns": [...]} lines).')
  model = load_model(args)
  sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
  conversations = [[] for _ in items]
  turns = [[item] if isinstance(item, str) else list(item['turns']) for item in items]
  replies: list[list[str]] = [[] for _ in items]
  for turn in range(max(len(t) for t in turns)):
    active = [i for i, t in enumerate(turns) if turn < len(t)]
    for i in active:
      conversations[i].append({'role': 'user', 'content': turns[i][turn]})
    try:
      texts = answer(model, [conversations[i] for i in active], sampling, args.seed)
    except PromptTooLong as error:
      raise UserError(_too_long(args, active[error.index], turn, error)) from None
    for i, text in zip(active, texts):
      conversations[i].append({'role': 'assistant', 'content': text})
      replies[i].append(text)
  model_id = args.model_id or os.path.basename(os.path.normpath(args.workdir or args.hf))
  lines = []
  for item, reply in zip(items, replies):
    if isinstance(item, str):
      lines.append({'prompt': item, 'answer': reply[0]})
    else:
      lines.append({'question_id': item['question_id'], 'answer_id': uuid.uuid4().hex,
                    'model_id': model_id, 'choices': [{'index': 0, 'turns': reply}],
                    'tstamp': time.time()})
  text = ''.join(json.dumps(line, ensure_ascii=False) + '\n' for line in lines)
  print(text, end='')
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      f.write(text)
  return 0


def _too_long(args: argparse.Namespace, item: int, turn: int, error: Any) -> str:
  """The one line for a `generate` prompt with no room for an answer: which prompt, its length,
  the limit and what sets it."""
  where = (f'--prompt number {item + 1}' if item < len(args.prompt) else
           f'{args.prompts}: prompt {item - len(args.prompt) + 1}')
  if turn:
    where += f', turn {turn + 1} (with the turns before it)'
  fix = ' or raise --max-seq-len' if error.limit_source == '--max-seq-len' else ''
  return (f'{where} has {error.tokens:,} tokens with the chat template, but a prompt and its '
          f'answer must fit in {error.limit:,} tokens ({error.limit_source}); shorten it{fix}.')


def _decoded_argument(text: str, flag: str) -> str:
  """A command-line argument whose bytes were not valid in the locale's encoding (Python keeps
  them as lone surrogates, which no tokenizer or JSON writer takes): those bytes replaced with
  U+FFFD, and a warning saying so."""
  if not any('\udc80' <= char <= '\udcff' for char in text):
    return text
  print(f'jaxsft: warning: {flag} had bytes that are not valid UTF-8; each was replaced with '
        'U+FFFD.', file=sys.stderr)
  return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')


def read_prompts(path: str) -> list[Any]:
  """Each line of a JSONL file: its `prompt` (a string), or an MT-Bench question (a dict with
  `question_id` and a non-empty list of string `turns`); a bad line is a `UserError` naming it."""
  from jaxsft.eval.jsonl import read_jsonl  # pylint: disable=import-outside-toplevel

  def parse(record: Any) -> Any:
    if 'turns' not in record:
      return str(record['prompt'])
    turns = record['turns']
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
      raise TypeError('"turns" must be a non-empty list of strings')
    return {'question_id': record['question_id'], 'turns': turns}

  return read_jsonl(path, '--prompts', '{"prompt": "..."} or {"question_id": ..., '
                    '"turns": [...]}', parse)


class _ReplaceUndecodable:
  """A codec error handler: each undecodable input byte sequence becomes U+FFFD, and `seen`
  records that one did, so that chat can say so (once) instead of dying in `input()`."""

  NAME = 'jaxsft.chat-replace'

  def __init__(self):
    self.seen = False

  def __call__(self, error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
      raise error
    self.seen = True
    return '\ufffd', error.end


def _lenient_stdin() -> _ReplaceUndecodable:
  """Makes `input()` replace bytes that are not in stdin's encoding (a pasted Latin-1 line
  under UTF-8) instead of raising `UnicodeDecodeError`; returns the handler that notices."""
  handler = _ReplaceUndecodable()
  codecs.register_error(handler.NAME, handler)
  if hasattr(sys.stdin, 'reconfigure'):  # a TextIOWrapper; input() on a tty reads its errors
    sys.stdin.reconfigure(errors=handler.NAME)
  return handler


def chat(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  """A conversation on stdin. Undecodable input bytes are replaced (one warning line); a turn
  that leaves no room for an answer in the model's context is not sent (one line), and the
  conversation goes on."""
  del overrides
  # pylint: disable=import-outside-toplevel
  from jaxsft.eval.generate import PromptTooLong, SamplingConfig
  from jaxsft.eval.model import answer
  model = load_model(args)
  sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
  history = [{'role': 'system', 'content': args.system}] if args.system else []
  undecodable, warned = _lenient_stdin(), False
  print('chat: an empty line or Ctrl-D ends; /reset forgets the conversation.')
  while True:
    try:
      line = input('you> ').strip()
    except EOFError:
      return 0
    if undecodable.seen and not warned:
      warned = True
      print(f'jaxsft: warning: the input had bytes that are not valid '
            f'{sys.stdin.encoding or "text"}; each was replaced with U+FFFD (\ufffd) and sent '
            'as that.', file=sys.stderr)
    if not line:
      return 0
    if line == '/reset':
      history = history[:1] if args.system else []
      continue
    history.append({'role': 'user', 'content': line})
    try:
      reply = answer(model, [history], sampling, args.seed)[0]
    except PromptTooLong as error:
      history.pop()
      print(f'jaxsft: this turn was not sent: with the conversation so far the prompt has '
            f'{error.tokens:,} tokens, but a prompt and its answer must fit in {error.limit:,} '
            f'({error.limit_source}); send a shorter turn, or /reset to start over.',
            file=sys.stderr)
      continue
    history.append({'role': 'assistant', 'content': reply})
    print(f'model> {reply}')


def benchmark(args: argparse.Namespace, overrides: Sequence[str]) -> int:
  del overrides
  tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
  ks = args.k  # flags.positive_int_list
  # With --completions the samples per problem are the file's; otherwise pass@k needs k of them.
  if not args.completions and max(ks) > args.samples_per_problem:
    raise UserError(f'--k {",".join(map(str, ks))}: pass@{max(ks)} needs at least {max(ks)} '
                    f'completions per problem, but --samples-per-problem is '
                    f'{args.samples_per_problem}; raise it to {max(ks)} or drop the larger k.')
  try:
    from jaxsft.eval import benchmark as bench  # pylint: disable=import-outside-toplevel
  except ImportError as error:  # the eval extra is not installed
    raise UserError(f'jaxsft benchmark needs the eval extra ({error}); install it with '
                    "pip install -e '.[eval]'.") from None
  only_completions = tasks == ['humaneval'] and args.completions
  model = None if only_completions and not (args.workdir or args.hf) else load_model(args)
  results = bench.run(model, tasks, include_path=args.include_path or None,
                      num_fewshot=args.num_fewshot, limit=args.limit,
                      batch_size=args.batch_size, apply_chat_template=args.apply_chat_template,
                      log_samples=args.log_samples, samples_per_problem=args.samples_per_problem,
                      ks=ks, completions=args.completions or None,
                      temperature=args.humaneval_temperature,
                      max_gen_toks=args.max_gen_toks,
                      humaneval_timeout=args.humaneval_timeout,
                      max_length=args.max_length or None)
  print(bench.table(results))
  for path in bench.write(results, args.out, args.workdir or None):
    print(f'wrote {path}')
  return 0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--workdir', default='', help='a jaxsft train work directory')
  parser.add_argument('--hf', default='', help='or a plain HF checkpoint folder')
  parser.add_argument('--template', default='jinja',
                      help='with --hf: chat template (jinja = the tokenizer\'s own)')
  parser.add_argument('--max-seq-len', type=flags.positive_int, default=None,
                      help='tokens of prompt + answer at most when generating (default: the '
                      'model\'s max_position_embeddings); with --hf also the rows eval packs '
                      f'records into (default {HF_EVAL_SEQ_LEN})')


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--max-new-tokens', type=flags.positive_int, default=256,
                      help='new tokens per answer at most (fewer when the prompt leaves less '
                      'room in the model\'s positions: a warning says so)')
  parser.add_argument('--temperature', type=flags.non_negative_float, default=0.0,
                      help='0 = greedy')
  parser.add_argument('--top-k', type=flags.non_negative_int, default=0, help='0 = off')
  parser.add_argument('--top-p', type=flags.probability, default=1.0, help='in (0, 1]; 1 = off')
  parser.add_argument('--seed', type=flags.seed, default=0)


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
  add_model_arguments(parser)
  parser.add_argument('--tasks', required=True,
                      help='comma-separated lm-eval tasks (mmlu,gsm8k,...) and/or humaneval')
  parser.add_argument('--include-path', default='',
                      help='a folder of lm-eval task YAMLs (local data: runs offline)')
  parser.add_argument('--num-fewshot', type=flags.non_negative_int, default=None)
  parser.add_argument('--limit', type=flags.positive_int, default=None,
                      help='the first N documents per task')
  parser.add_argument('--batch-size', type=flags.positive_int, default=8,
                      help='rows per compiled call')
  parser.add_argument('--max-length', type=flags.non_negative_int, default=0,
                      help='context tokens per request (default: the model\'s)')
  parser.add_argument('--apply-chat-template', action='store_true')
  parser.add_argument('--log-samples', action='store_true',
                      help='keep every request and response (log-likelihoods) in the JSON')
  parser.add_argument('--samples-per-problem', type=flags.positive_int, default=1,
                      help='humaneval: completions per problem (greedy when 1)')
  parser.add_argument('--k', type=flags.positive_int_list, default='1',
                      help='humaneval: pass@k for these k, e.g. 1,10 (each <= '
                      '--samples-per-problem)')
  parser.add_argument('--humaneval-temperature', type=flags.non_negative_float, default=0.8,
                      help='humaneval: sampling temperature when --samples-per-problem > 1')
  parser.add_argument('--max-gen-toks', type=flags.positive_int, default=512,
                      help='humaneval: new tokens per completion at most')
  parser.add_argument('--humaneval-timeout', type=flags.positive_float, default=10.0,
                      help='humaneval: wall-clock seconds per program (CPU seconds too)')
  parser.add_argument('--completions', default='',
                      help='humaneval: score these {"task_id", "completion"} JSONL lines')
  parser.add_argument('--out', required=True, help='the results JSON')
