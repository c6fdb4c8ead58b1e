"""The `jaxsft` console script."""

import json
import pathlib
import subprocess
import sys

from hf_reference import save_model


def test_info_describes_a_checkpoint(tmp_path):
  model = save_model('qwen2_bias', tmp_path)
  result = subprocess.run([sys.executable, '-m', 'jaxsft.cli', 'info', str(tmp_path)],
                          capture_output=True, text=True, check=True)
  summary = json.loads(result.stdout)
  assert summary['model_type'] == 'qwen2' and summary['num_kv_heads'] == 2
  assert summary['parameters'] == sum(p.numel() for p in model.parameters())


def test_data_inspect_highlights_supervised_text_and_reports(tmp_path):
  from conftest import llama2_tokenizer, shared_data
  data = shared_data('instructions/alpaca_tiny.json')
  tokenizer = llama2_tokenizer()
  result = subprocess.run(
      [sys.executable, '-m', 'jaxsft.cli', 'data', 'inspect', '--config',
       f'configs/alpaca_llama2_data.py:{data}', f'--config.data.tokenizer={tokenizer}',
       '--config.data.max_seq_len=256', f'--config.data.cache_dir={tmp_path}', '--examples', '2',
       '--color', 'never'], capture_output=True, text=True, check=True,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  out = result.stdout
  assert out.count('--- record') == 2
  # Record 0's response, highlighted with its end-of-turn token and nothing of the prompt.
  assert '[/INST] ⟦1.Eat a balanced diet' in out and '</s>⟧' in out
  assert 'truncated' in out and 'training example lengths' in out
  assert 'packing (bfd) of one epoch' in out and 'efficiency 0.9' in out
