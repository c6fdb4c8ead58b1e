"""Helpers for tests that drive jaxsft as a user does: the installed `jaxsft` executable in a
subprocess, on tiny local stand-ins for a model, a tokenizer and data files."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# The console script pip installed next to this interpreter: what a user runs.
JAXSFT = shutil.which('jaxsft', path=str(pathlib.Path(sys.executable).parent)) or 'jaxsft'

ALPACA = [
    {'instruction': 'Give three tips for staying healthy.', 'input': '',
     'output': 'Eat well, sleep enough and move every day.'},
    {'instruction': 'Add 2 and 3.', 'input': '', 'output': '5'},
    {'instruction': 'Translate to French.', 'input': 'cat', 'output': 'chat'},
    {'instruction': 'Name a primary color.', 'input': '', 'output': 'Red.'},
    {'instruction': 'Reverse the word.', 'input': 'kite', 'output': 'etik'},
    {'instruction': 'What is the capital of France?', 'input': '', 'output': 'Paris.'},
    {'instruction': 'Say OK.', 'input': '', 'output': 'OK'},
    {'instruction': 'Count to three.', 'input': '', 'output': '1, 2, 3'},
]
SHAREGPT = [{'conversations': [{'from': 'human', 'value': r['instruction'] + ' ' + r['input']},
                               {'from': 'gpt', 'value': r['output']}]} for r in ALPACA]


def env() -> dict[str, str]:
  """The environment of a user's shell: offline, no test-only JAX settings (but the session's
  compilation cache, which changes speed only: see conftest.py)."""
  keep = ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')
  out = {k: v for k, v in os.environ.items()
         if k in keep or not k.startswith(('JAX_', 'XLA_FLAGS'))}
  out.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1')
  return out


def run(args, cwd, *, check_rc=0, timeout=900, stdin=None, extra_env=None):
  """Runs `jaxsft ARGS` (a list) or a shell command line (a str, with `jaxsft` on PATH) and
  returns the CompletedProcess; asserts the exit code when `check_rc` is not None."""
  environment = env()
  environment['PATH'] = f'{pathlib.Path(JAXSFT).parent}{os.pathsep}{environment.get("PATH", "")}'
  environment.update(extra_env or {})
  command = [JAXSFT, *args] if isinstance(args, list) else ['bash', '-c', args]
  result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=timeout, input=stdin)
  if check_rc is not None:
    assert result.returncode == check_rc, (
        f'{args} exited {result.returncode}, expected {check_rc}\n--- stdout\n'
        f'{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}')
  return result


def write_json(path: pathlib.Path, records, jsonl: bool = False) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if jsonl:
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  else:
    path.write_text(json.dumps(records))
  return path


def tiny_model(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A random 2-layer LLaMA (hidden 64) saved by transformers as safetensors, with a
  character-level fast tokenizer (ChatML specials) whose size is the model's vocabulary."""
  import torch
  import transformers

  from jaxsft import demo
  tokenizer = demo.build_tokenizer(str(folder))
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  torch.manual_seed(seed)
  transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
  return folder


def tiny_moe_model(folder: pathlib.Path, model_type: str = 'qwen3_moe', seed: int = 0,
                   **config) -> pathlib.Path:
  """A random 2-layer mixture-of-experts model (`qwen3_moe`: 4 experts of 32, top-2,
  renormalized; `mixtral`: 4 experts of 64, top-2; `config` overrides) saved by transformers,
  with the character-level tokenizer of `tiny_model`. Weights are drawn N(0, 0.2) so routers
  and experts differ visibly (transformers initializes the router to zero)."""
  import torch
  import transformers

  from jaxsft import demo
  tokenizer = demo.build_tokenizer(str(folder))
  common = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, num_experts_per_tok=2)
  if model_type == 'qwen3_moe':
    hf_config = transformers.Qwen3MoeConfig(**{
        **common, 'intermediate_size': 96, 'moe_intermediate_size': 32, 'head_dim': 16,
        'num_experts': 4, 'norm_topk_prob': True, **config})
    model = transformers.Qwen3MoeForCausalLM
  else:
    hf_config = transformers.MixtralConfig(**{**common, 'intermediate_size': 64,
                                              'num_local_experts': 4, **config})
    model = transformers.MixtralForCausalLM
  torch.manual_seed(seed)
  module = model(hf_config)
  with torch.no_grad():
    for parameter in module.parameters():
      parameter.normal_(0.0, 0.2)
  module.save_pretrained(folder, safe_serialization=True)
  return folder


def write_config(path: pathlib.Path, settings: dict) -> str:
  """A config file as a user writes one: `get_config()` starting from `default_config()` and
  setting each `'section.key': value` of `settings` (values written with `repr`)."""
  lines = ['from jaxsft.config import default_config', '', '',
           'def get_config(arg=None):', '  config = default_config()']
  lines += [f'  config.{key} = {value!r}' for key, value in settings.items()]
  path.write_text('\n'.join(lines + ['  return config', '']))
  return str(path)
