"""`scripts/device_check.sh --dry-run`: the script a session lent a GPU runs first (issue 18)
runs end to end here on tiny shapes, every step passes, and its Markdown block has every
section, so it is known to work before a device comes."""

import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = ['environment', 'gpu-parity', 'bench-train', 'plan-native', 'plan-cpu', 'plan-tpu',
         'bench-generate', 'context-parallel']
SECTIONS = ['#### Environment', '#### 1. Attention parity', '#### 2. Training speed',
            '#### 3. Memory plan', '#### 4. Decoding', '#### 5. Context parallelism']


def test_dry_run_passes_every_step_and_writes_the_report(tmp_path):
  # The device tool's OUT, or flags meant for another run, must not steer this one.
  env = {k: v for k, v in os.environ.items()
         if k not in ('OUT', 'XLA_FLAGS', 'JAX_PLATFORMS') and not k.startswith('JAXSFT_')}
  env['PYTHON'] = sys.executable
  markdown = tmp_path / 'report.md'
  done = subprocess.run(['bash', str(REPO / 'scripts' / 'device_check.sh'), '--dry-run',
                         '--out', str(markdown)], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
  text = markdown.read_text()
  statuses = dict(re.findall(r'^\| ([a-z-]+) \| ([^|]+?) \| [\d.]+ \|$', text, re.M))
  assert list(statuses) == STEPS, text
  for step, status in statuses.items():
    # `jaxsft plan --platform` may not exist yet; the script says so and goes on.
    assert status == 'ok' or (step == 'plan-tpu' and status.startswith(
        'skipped (jaxsft plan has no --platform')), (step, status)
  for section in SECTIONS:
    assert section in text
  assert text.strip() in done.stdout  # printed too, for the device tool's output tail
  assert 'bash scripts/device_check.sh --dry-run --out ' in text  # the exact command
  # The figures of each step made it into the block.
  assert re.search(r'^logits blocked vs xla: relative L2 error', text, re.M)
  assert re.search(r'^qlora blocked vs xla: loss', text, re.M)
  for method in ('full', 'lora', 'qlora'):
    assert re.search(rf'^\| {method} \| jaxsft \| [\d,]+ \|', text, re.M), method
  assert re.search(r'^\| total \| [\d.]+ \| [\d.]+ \|', text, re.M)
  assert 'KV cache' in text
  assert re.search(r'^context parallel: ok', text, re.M)
  assert re.search(r'^planned for 4 devices', text, re.M)
  assert (tmp_path / 'report.log').stat().st_size > 0
