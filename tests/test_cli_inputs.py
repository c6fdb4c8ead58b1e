"""What a user types that the commands must refuse or survive (issue 24, points 4 and 5):
numeric flags out of range stop in argparse with one error line and exit 2, before any model
loads; non-UTF-8 bytes on `jaxsft chat`'s stdin are replaced (one warning) and the chat goes
on; a prompt longer than the model's positions is refused in one line (a chat turn: the
conversation goes on) and an answer that would overrun them is shortened with a warning; a
streaming run's data report names its sources and does not claim 0 records.

Flag errors run `jaxsft.cli.main` in-process (argparse stops before JAX or a model loads) and two
through the installed executable; the chat runs once through the executable, on a tiny model
whose config.json has 96 positions (written without torch: jaxsft's own HF writer).
"""

import json
import logging
import pathlib
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from user_path import ALPACA, JAXSFT, env, run, write_json

from jaxsft import cli, demo
from jaxsft.config import default_config
from jaxsft.data.inspect import inspect_data
from jaxsft.data.pipeline import Pipeline
from jaxsft.data.tokenizer import load_tokenizer
from jaxsft.eval.generate import PromptTooLong, generate
from jaxsft.interop import hf
from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama

POSITIONS = 96  # max_position_embeddings of the tiny model


@pytest.fixture(scope='module')
def tiny_hf(tmp_path_factory):
  """A random 2-layer LLaMA with a character tokenizer (one token per character) and
  max_position_embeddings 96, saved as an HF folder; weights drawn with numpy (no init compile,
  no torch)."""
  folder = tmp_path_factory.mktemp('inputs') / 'model'
  tokenizer = demo.build_tokenizer(str(folder))
  config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2,
                       max_position_embeddings=POSITIONS, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  shapes = nn.unbox(jax.eval_shape(lambda: Llama(config).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))['params'])
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (rng.standard_normal(s.shape) * 0.05).astype(np.float32), shapes)
  hf.save_checkpoint(folder, config, params)
  return folder


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if 'error' in line]


# (command line before the flag, flag, value, argparse's message after "argument FLAG: ").
MODEL = ['--hf', 'no/such/model']
BENCH = ['benchmark', *MODEL, '--tasks', 'humaneval', '--out', 'out.json']
BAD_FLAGS = [
    (BENCH, '--limit', '0', 'must be >= 1, got 0'),
    (BENCH, '--num-fewshot', '-1', 'must be >= 0, got -1'),
    (BENCH, '--batch-size', '0', 'must be >= 1, got 0'),
    (BENCH, '--max-length', '-5', 'must be >= 0, got -5'),
    (BENCH, '--samples-per-problem', '0', 'must be >= 1, got 0'),
    (BENCH, '--k', '1,0', "each value must be >= 1, got 0 in '1,0'"),
    (BENCH, '--max-gen-toks', '0', 'must be >= 1, got 0'),
    (BENCH, '--humaneval-timeout', '0', 'must be > 0, got 0'),
    (BENCH, '--humaneval-temperature', '-1', 'must be >= 0, got -1'),
    (['generate', *MODEL, '--prompt', 'hi'], '--max-new-tokens', '0', 'must be >= 1, got 0'),
    (['generate', *MODEL, '--prompt', 'hi'], '--temperature', '-0.5', 'must be >= 0, got -0.5'),
    (['generate', *MODEL, '--prompt', 'hi'], '--temperature', 'nan',
     "must be a finite number >= 0, got 'nan'"),
    (['chat', *MODEL], '--top-k', '-1', 'must be >= 0, got -1'),
    (['chat', *MODEL], '--top-p', '0', 'must be in (0, 1], got 0'),
    (['chat', *MODEL], '--top-p', '1.5', 'must be in (0, 1], got 1.5'),
    (['chat', *MODEL], '--seed', '-1', 'must be in [0, 4294967295], got -1'),
    (['chat', *MODEL], '--max-seq-len', '0', 'must be >= 1, got 0'),
    (['eval', *MODEL], '--generate', '-1', 'must be >= 0, got -1'),
    (['eval', *MODEL], '--batch-size', '0', 'must be >= 1, got 0'),
    (['eval', *MODEL], '--max-new-tokens', 'ten', "must be an integer >= 1, got 'ten'"),
    (['plan', '--config', 'c.py'], '--device-memory-gib', '0', 'must be > 0, got 0'),
    (['data', 'inspect', '--config', 'c.py'], '--examples', '-1', 'must be >= 0, got -1'),
]


@pytest.mark.parametrize('command, flag, value, message', BAD_FLAGS,
                         ids=[f'{c[0]} {f} {v}' for c, f, v, _ in BAD_FLAGS])
def test_a_numeric_flag_out_of_range_stops_in_argparse(capsys, command, flag, value, message):
  """argparse's usage, then one line naming the flag, exit 2; nothing else runs."""
  with pytest.raises(SystemExit) as stopped:
    cli.main([*command, flag, value])
  assert stopped.value.code == 2
  stderr = capsys.readouterr().err
  prog = ' '.join(['jaxsft', *command[:2 if command[0] == 'data' else 1]])
  assert error_lines(stderr) == [f'{prog}: error: argument {flag}: {message}'], stderr
  assert stderr.rstrip().splitlines()[-1] == error_lines(stderr)[0]


@pytest.mark.parametrize('flag, value, message', [
    ('--limit', '0', 'argument --limit: must be >= 1, got 0'),
    ('--num-fewshot', '-1', 'argument --num-fewshot: must be >= 0, got -1')])
def test_benchmark_flag_errors_through_the_executable(tmp_path, flag, value, message):
  result = run(['benchmark', *MODEL, '--tasks', 'mmlu', '--out', 'out.json', flag, value],
               tmp_path, check_rc=2, timeout=120)
  assert 'Traceback' not in result.stderr
  assert error_lines(result.stderr) == [f'jaxsft benchmark: error: {message}'], result.stderr
  assert not (tmp_path / 'out.json').exists()


def test_pass_at_k_above_the_samples_per_problem_is_one_line(capsys):
  """--k 1,10 with one sample per problem: refused before lm-eval or a model loads."""
  code = cli.main([*BENCH, '--k', '1,10'])
  stderr = capsys.readouterr().err
  assert code == 2 and stderr.splitlines() == [
      'jaxsft: error: --k 1,10: pass@10 needs at least 10 completions per problem, but '
      '--samples-per-problem is 1; raise it to 10 or drop the larger k.'], stderr


def test_chat_survives_undecodable_bytes_and_a_turn_too_long(tiny_hf, tmp_path):
  """Through the executable, one conversation: a turn with Latin-1 bytes is answered (one
  warning line); its answer is shortened to the positions left (a warning); a 200-character turn
  (over 96 positions with the conversation) is not sent (one line); after /reset a turn is
  answered again; exit 0, no traceback."""
  stdin = b'caf\xe9 au lait \xff\n' + b'x' * 200 + b'\n/reset\nhello\n\n'
  environment = env()
  environment['PYTHONIOENCODING'] = 'utf-8'  # whatever the test machine's locale
  result = subprocess.run(
      [JAXSFT, 'chat', '--hf', str(tiny_hf), '--template', 'chatml', '--max-new-tokens', '80'],
      cwd=tmp_path, env=environment, input=stdin, capture_output=True, timeout=300)
  stdout, stderr = result.stdout.decode(), result.stderr.decode()
  assert result.returncode == 0 and 'Traceback' not in stderr, stderr
  assert stdout.count('model> ') == 2, stdout
  lines = [line for line in stderr.splitlines() if line.strip()]
  undecodable = [line for line in lines if 'not valid utf-8' in line]
  assert undecodable == ['jaxsft: warning: the input had bytes that are not valid utf-8; each '
                         'was replaced with U+FFFD (\ufffd) and sent as that.'], stderr
  too_long = [line for line in lines if 'not sent' in line]
  assert len(too_long) == 1 and too_long[0].startswith(
      'jaxsft: this turn was not sent: with the conversation so far the prompt has ') and \
      f'must fit in {POSITIONS} (the model\'s positions: max_position_embeddings' in too_long[0], \
      stderr
  shortened = [line for line in lines if 'new tokens (not max_new_tokens 80)' in line]
  assert shortened and f'must fit in {POSITIONS}' in shortened[0], stderr


def test_generate_refuses_a_prompt_longer_than_the_positions(tiny_hf, capsys):
  """`jaxsft generate`: one line naming the prompt, its length and the limit, exit 2."""
  code = cli.main(['generate', '--hf', str(tiny_hf), '--template', 'chatml',
                   '--prompt', 'short', '--prompt', 'y' * 100])
  stderr = capsys.readouterr().err
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1, stderr
  assert lines[0].startswith('jaxsft: error: --prompt number 2 has ') and (
      f'must fit in {POSITIONS} tokens (the model\'s positions: max_position_embeddings in its '
      'config.json); shorten it.') in lines[0], stderr


def test_generate_replaces_undecodable_bytes_of_a_prompt_argument(tiny_hf, capsys):
  """A `--prompt` whose bytes are not UTF-8 (Python keeps them as lone surrogates, which the
  tokenizer and the JSON output refuse) is answered with U+FFFD in their place and one
  warning."""
  code = cli.main(['generate', '--hf', str(tiny_hf), '--template', 'chatml', '--prompt',
                   'caf\udce9 ok', '--max-new-tokens', '2'])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert json.loads(captured.out)['prompt'] == 'caf\ufffd ok'
  warnings = [line for line in captured.err.splitlines() if 'not valid UTF-8' in line]
  assert warnings == ['jaxsft: warning: --prompt had bytes that are not valid UTF-8; each was '
                      'replaced with U+FFFD.'], captured.err


def test_max_seq_len_caps_the_prompt_too():
  """A prompt within the positions but over the caller's limit (`--max-seq-len`) is refused,
  naming that limit; both before anything is computed."""
  config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                       num_heads=1, num_kv_heads=1, max_position_embeddings=64)
  with pytest.raises(PromptTooLong, match=r'prompt 1 has 70 tokens.*must fit in 64 tokens'):
    generate(config, None, [[1] * 70])
  with pytest.raises(PromptTooLong, match=r'must fit in 32 tokens \(--max-seq-len\)'):
    generate(config, None, [[1] * 40], max_length=32)
  # Dynamic NTK scaling exists to stretch past max_position_embeddings: its factor counts.
  dynamic = config.replace(rope_scaling={'rope_type': 'dynamic', 'factor': 2.0})
  with pytest.raises(PromptTooLong, match=r'must fit in 128 tokens'):
    generate(dynamic, None, [[1] * 130])


def _streaming_data_config(tmp_path: pathlib.Path):
  config = default_config().data
  config.datasets = [{'path': str(write_json(tmp_path / 'alpaca.json', ALPACA))}]
  config.template, config.max_seq_len, config.streaming = 'chatml', 128, True
  config.cache_dir = str(tmp_path / 'cache')
  return config


def test_a_streaming_run_reports_no_zero_counts(tiny_hf, tmp_path, caplog):
  """`jaxsft train` with data.streaming=True logs each source's line when the pipeline is
  built, before a record is read: it names the source and says counts come as read."""
  config = _streaming_data_config(tmp_path)
  caplog.set_level(logging.INFO, logger='jaxsft.data.pipeline')
  pipeline = Pipeline(config, load_tokenizer(str(tiny_hf)), batch_size=2, process_index=0,
                      process_count=1)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('data ')]
  source = config.datasets[0]['path']
  assert lines == [f'data datasets[0] {source}: streamed (data.streaming=True): records and '
                   'tokens are not known in advance; they are counted as the stream is read'], \
      lines
  next(iter(pipeline.train_batches()))  # read some: the counts are what was read so far
  label = f'datasets[0] {source}'
  summary = pipeline.stats[label].summary(streamed=pipeline.is_streamed(label))
  assert summary.startswith('streamed, counted as read so far: ') and ' 0 records' not in \
      summary, summary


def test_data_inspect_of_a_streaming_config_says_how_it_counted(tiny_hf, tmp_path):
  report = inspect_data(_streaming_data_config(tmp_path), load_tokenizer(str(tiny_hf)),
                        batch_size=2, num_examples=0)
  assert ('records (data.streaming=True: counted here by reading every source once; a training '
          'run reads its streams as it trains):') in report, report
  assert f'alpaca.json: {len(ALPACA)} records' in report and ' 0 records' not in report, report

