"""`examples/` as a researcher runs them: each script in a subprocess (`python examples/X.py
--model DIR --tokenizer DIR`) on tiny HF folders of two shapes (LLaMA with GQA, Qwen3 with its
per-head q/k norms), on 4 CPU devices. Each prints its own comparison with transformers; the
printed difference must be <= 1e-4, and the script must have used the public API only: neither
`jaxsft.config` nor `ml_collections` is imported by the end."""

import pathlib
import re
import subprocess
import sys

import pytest
import user_path

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / 'examples'
# Runs the example as `python examples/X.py ...` would, then reports what it imported.
WRAPPER = ('import runpy, sys; sys.argv = sys.argv[1:]; '
           'runpy.run_path(sys.argv[0], run_name="__main__"); '
           'print("imported:", sorted(m for m in ("jaxsft.config", "ml_collections") '
           'if m in sys.modules))')


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """`{'llama': ..., 'qwen3': ...}`: tiny random HF folders with a tokenizer of their size."""
  import torch
  import transformers

  from jaxsft import demo
  root = tmp_path_factory.mktemp('examples')
  llama = user_path.tiny_model(root / 'llama')
  tokenizer = demo.build_tokenizer(str(root / 'qwen3'))
  config = transformers.Qwen3Config(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
  torch.manual_seed(3)
  transformers.Qwen3ForCausalLM(config).save_pretrained(root / 'qwen3', safe_serialization=True)
  return {'llama': llama, 'qwen3': root / 'qwen3'}


@pytest.mark.parametrize('script,model,printed', [
    ('lora_qlora_loop.py', 'qwen3', 'max |logit diff| vs transformers'),
    ('custom_objective.py', 'llama', 'max |logprob diff| vs transformers'),
    ('score.py', 'llama', 'max |loglik diff| vs transformers'),
    ('score.py', 'qwen3', 'max |loglik diff| vs transformers'),
])
def test_example_matches_transformers(folders, tmp_path, script, model, printed):
  environment = user_path.env()
  environment['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  folder = str(folders[model])
  result = subprocess.run(
      [sys.executable, '-c', WRAPPER, str(EXAMPLES / script), '--model', folder,
       '--tokenizer', folder], cwd=tmp_path, env=environment, capture_output=True, text=True,
      timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  found = re.search(re.escape(printed) + r': (\S+)', result.stdout)
  assert found, result.stdout
  assert float(found.group(1)) <= 1e-4, result.stdout
  assert 'imported: []' in result.stdout, result.stdout
  if script == 'custom_objective.py':  # the preference loss falls from log 2
    before, after = map(float, re.search(
        r'DPO loss before: (\S+), after \d+ steps: (\S+)', result.stdout).groups())
    assert abs(before - 0.6931) < 1e-3 and after < before - 0.05, result.stdout
  if script == 'lora_qlora_loop.py':
    losses = [float(x) for x in re.findall(r'step \d+: loss (\S+)', result.stdout)]
    assert len(losses) == 5 and losses[-1] < losses[0], result.stdout
