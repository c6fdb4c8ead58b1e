"""The TPU path on the CPU: whole training runs with Pallas splash attention (interpret mode)
equal the `xla` path's, through init, jitted steps, checkpoints and resume, and an HF
checkpoint loads with splash requested."""

import json
import logging

import jax
import numpy as np
import pytest
from test_checkpoint import run_config, sigterm_at

from jaxsft.interop import hf
from jaxsft.models import Llama
from jaxsft.train.loop import Preempted
from jaxsft.train.metrics import MetricWriter
from jaxsft.train.run import train

from hf_reference import random_tokens, save_model, torch_logits


def splash_config(tmp_path, attention, lora, scan_layers, steps=4):
  config = run_config(tmp_path, lora=lora, steps=steps)
  config.model.attention_implementation = attention
  config.model.scan_layers = scan_layers
  config.lora.dropout = 0.0
  config.train.neftune_alpha = 0.0
  config.checkpoint.save_every = 2
  return config


def losses(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return [r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r]


def leaves(result):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(
      result['state'].params))]


@pytest.mark.parametrize('lora,scan_layers', [(False, True), (True, False)])
def test_splash_training_equals_xla_and_resumes(tmp_path, monkeypatch, caplog, lora,
                                                scan_layers):
  """Full fine-tuning and LoRA, scanned and unrolled layers: the same losses and weights as
  `xla` after several steps (splash computes the same function; float32 sums in another order),
  and a run stopped by SIGTERM resumes to the uninterrupted one bit for bit."""
  with caplog.at_level(logging.WARNING):
    splash = train(splash_config(tmp_path, 'splash', lora, scan_layers),
                   str(tmp_path / 'splash'))
  assert 'falling back' not in caplog.text  # splash itself served every call
  xla = train(splash_config(tmp_path, 'xla', lora, scan_layers), str(tmp_path / 'xla'))
  assert splash['steps'] == xla['steps'] == 4
  np.testing.assert_allclose(losses(tmp_path / 'splash'), losses(tmp_path / 'xla'), rtol=2e-5)
  for ours, reference in zip(leaves(splash), leaves(xla)):
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=1e-3)
  original = sigterm_at(monkeypatch, 2)
  with pytest.raises(Preempted):
    train(splash_config(tmp_path, 'splash', lora, scan_layers), str(tmp_path / 'resumed'))
  monkeypatch.setattr(MetricWriter, 'write', original)
  resumed = train(splash_config(tmp_path, 'splash', lora, scan_layers), str(tmp_path / 'resumed'))
  assert resumed['steps'] == 4
  for ours, straight in zip(leaves(resumed), leaves(splash)):
    np.testing.assert_array_equal(ours, straight)


def test_hf_checkpoint_loads_and_runs_with_splash(tmp_path, caplog):
  """Loading builds the model on a one-token input, which splash cannot serve: that must
  neither crash nor warn, and the loaded model's logits equal transformers'."""
  torch_model = save_model('qwen3', tmp_path / 'model')
  with caplog.at_level(logging.WARNING):
    config, params = hf.load_checkpoint(tmp_path / 'model', config_overrides={
        'attention_implementation': 'splash'})
    tokens = random_tokens(1, 128, seed=4)
    logits = jax.jit(lambda p, t: Llama(config).apply({'params': p}, t))(params, tokens)
  assert 'falling back' not in caplog.text
  np.testing.assert_allclose(np.asarray(logits), torch_logits(torch_model, tokens), atol=1e-4)
