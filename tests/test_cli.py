"""The `jaxsft` console script."""

import json
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
