"""Mixture-of-experts models on 8 fake CPU devices (issue 27): experts split over the fsdp
devices give the one-device step (full, LoRA, QLoRA with NF4 experts), and a run resumes after
SIGTERM bitwise."""

import functools
import re

import jax
import numpy as np
import pytest

from jaxsft.train.loop import Preempted
from jaxsft.train.metrics import MetricWriter
from jaxsft.train.run import train

from test_checkpoint import run_config, sigterm_at
from test_train import assert_trees_close, packed_batch, run_steps, tiny_config

MOE = {'num_experts': 8, 'num_experts_per_tok': 2, 'moe_intermediate_size': 64,
       'model_type': 'qwen3_moe', 'qk_norm': True, 'router_aux_loss_coef': 0.01}


def moe_config(method, exchange='weights'):
  config = tiny_config(lora=method != 'full')
  config.model.architecture = {**config.model.architecture, **MOE}
  config.model.moe_exchange = exchange
  config.lora.targets = ['q_proj', 'gate', 'gate_up_proj', 'down_proj']
  config.quant.kind = 'nf4' if method == 'qlora' else 'none'
  # The experts only: dense kernels quantized on 8 devices may differ from one device's in one
  # code (the double quantization's float32 mean, tests/test_context_parallel.py); experts split
  # over the devices are quantized expert by expert, the same everywhere.
  config.quant.targets = ['gate_up_proj', 'down_proj']
  return config


@functools.lru_cache(maxsize=None)
def one_device_run(method):
  batches = [packed_batch(rows=8, length=32, seed=seed) for seed in (0, 1)]
  return run_steps(moe_config(method), (1, 1, 1, 1), batches, jax.devices()[:1]), batches


@pytest.mark.parametrize('method,mesh_shape,exchange', [
    ('full', (1, 8, 1, 1), 'weights'), ('lora', (2, 2, 2, 1), 'weights'),
    ('qlora', (1, 4, 1, 2), 'weights'), ('full', (2, 4, 1, 1), 'tokens'),
    ('lora', (1, 2, 4, 1), 'tokens'), ('qlora', (1, 4, 1, 2), 'tokens')])
def test_expert_parallel_step_equals_one_device(method, mesh_shape, exchange):
  """Two train steps with each device of the fsdp axis holding its own experts, their weights
  gathered per layer or the tokens sent to them (`model.moe_exchange`): losses, the
  load-balancing loss, gradient norms, updated weights and Adam state within 1e-5 of one
  device (float32)."""
  (reference, reference_metrics), batches = one_device_run(method)
  split, metrics, hlo = run_steps(moe_config(method, exchange), mesh_shape, batches,
                                  jax.devices()[:8], with_hlo=True)
  # What crosses the devices: an all-gather whose result is a layer's expert kernels
  # (`[E, D, 2F]` or `[E, F, D]`, unit dims aside) happens with 'weights', never with 'tokens'.
  e, d, f = MOE['num_experts'], 64, MOE['moe_intermediate_size']
  gathered = {tuple(int(n) for n in dims.split(',') if n not in ('', '1'))
              for dims in re.findall(r'= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(', hlo)}
  assert bool(gathered & {(e, d, 2 * f), (e, f, d)}) == (exchange == 'weights'), gathered
  for m, n in zip(metrics, reference_metrics):
    for key in ('loss', 'router_aux_loss', 'grad_norm'):
      np.testing.assert_allclose(m[key], n[key], rtol=1e-5, err_msg=key)
  assert_trees_close(split.params, reference.params, 1e-5)
  assert_trees_close(split.opt_state, reference.opt_state, 1e-5)
  if method == 'qlora':
    codes = [leaf for leaf in jax.tree_util.tree_leaves(split.frozen) if leaf.dtype == np.uint8]
    assert codes, 'no 4-bit kernel in the frozen base'


def test_moe_lora_run_resumes_after_sigterm_bitwise(tmp_path, monkeypatch):
  """A LoRA run of an MoE model with experts split over 8 devices (the tokens sent to them),
  SIGTERM after step 3 and resumed, ends with the adapters of the run that went straight
  through, bit for bit."""
  def config():
    c = run_config(tmp_path, lora=True, mesh=(1, 8, 1, 1), steps=6)
    c.model.architecture = {**c.model.architecture, **MOE}
    c.model.moe_exchange = 'tokens'
    c.lora.targets = ['q_proj', 'gate_up_proj', 'down_proj']
    c.lora.dropout = 0.0  # PEFT has no dropout on experts (lora.abstract_lora refuses it)
    c.checkpoint.save_every = 3
    return c

  straight = train(config(), str(tmp_path / 'straight'))
  original = sigterm_at(monkeypatch, 3)
  with pytest.raises(Preempted):
    train(config(), str(tmp_path / 'interrupted'))
  monkeypatch.setattr(MetricWriter, 'write', original)
  resumed = train(config(), str(tmp_path / 'interrupted'))
  assert resumed['steps'] == 6
  for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(resumed['state'].params)),
                  jax.tree_util.tree_leaves(jax.device_get(straight['state'].params))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
