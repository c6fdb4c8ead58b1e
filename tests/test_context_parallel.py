"""Context parallelism (issue 26): rows split over the `context` mesh axis give the step of one
device, for full, LoRA and QLoRA, on packed rows whose examples cross shard boundaries; every
attention path serves a split row; no example sees another's tokens across a boundary."""

import functools
import json
import logging
import signal
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from user_path import ALPACA, JAXSFT, REPO, env, run, tiny_model, write_config, write_json

from jaxsft.models import attention as attn
from jaxsft.models.config import LlamaConfig
from jaxsft.models.llama import Llama
from jaxsft.parallel import context as ctx
from jaxsft.parallel import mesh as mesh_lib

from test_train import assert_trees_close, packed_batch, run_steps, tiny_config

LENGTH = 64  # 2 x 8 chunks of 4 tokens at context=8: every example crosses shard boundaries


def method_config(method):
  config = tiny_config(lora=method != 'full')
  config.model.attention_implementation = 'blocked'  # the indexed kernel under context
  config.quant.kind = 'nf4' if method == 'qlora' else 'none'
  return config


@functools.lru_cache(maxsize=None)
def context_one_run(method, mesh_shape):
  batches = [packed_batch(rows=4, length=LENGTH, seed=seed) for seed in (0, 1)]
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  return run_steps(method_config(method), mesh_shape, batches, devices), batches


@pytest.mark.parametrize('method,mesh_shape', [
    ('full', (1, 1, 2, 1)), ('full', (1, 1, 4, 1)), ('full', (1, 1, 8, 1)),
    ('full', (2, 1, 2, 2)), ('lora', (1, 1, 2, 1)), ('lora', (1, 1, 8, 1)),
    ('lora', (1, 2, 4, 1)), ('qlora', (1, 1, 4, 1)), ('qlora', (1, 2, 2, 2))])
def test_context_parallel_step_equals_one_device(method, mesh_shape):
  """Two train steps: losses and the updated trained weights and optimizer state within 1e-5
  relative of context=1 (float32): one device for full and LoRA; for QLoRA the same devices
  with the context folded into fsdp, since 4-bit weights quantized on N devices may differ
  from one device's in one 8-bit absmax code (the double quantization's float32 mean is
  reduced in another order: one ulp), which moves the gradient norm by ~1e-5."""
  data, fsdp, context, tensor = mesh_shape
  reference_shape = (data, fsdp * context, 1, tensor) if method == 'qlora' else (1, 1, 1, 1)
  (reference, reference_metrics), batches = context_one_run(method, reference_shape)
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  split, metrics = run_steps(method_config(method), mesh_shape, batches, devices)
  for m, n in zip(metrics, reference_metrics):
    np.testing.assert_allclose(m['loss'], n['loss'], rtol=1e-5)
    np.testing.assert_allclose(m['grad_norm'], n['grad_norm'], rtol=1e-5)
    assert m['supervised_tokens'] == n['supervised_tokens']
  assert_trees_close(split.params, reference.params, 1e-5)
  assert_trees_close(split.opt_state, reference.opt_state, 1e-5)


def test_zigzag_order_balances_causal_work_and_round_trips():
  order = ctx.zigzag_order(16, 4)
  np.testing.assert_array_equal(order, [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9])
  # Causal work of a shard = sum over its queries of (position + 1): equal on every device.
  work = (order.reshape(4, 4) + 1).sum(axis=1)
  assert len(set(work.tolist())) == 1, work
  mesh = mesh_lib.make_mesh((1, 1, 4, 1), jax.devices()[:4])
  x = jnp.arange(2 * 16 * 3).reshape(2, 16, 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
    layout = ctx.context_layout(16)
    zigzag = jax.jit(lambda x: ctx.to_zigzag(x, layout))(x)
    back = jax.jit(lambda x: ctx.from_zigzag(x, layout))(zigzag)
  np.testing.assert_array_equal(np.asarray(zigzag), np.asarray(x)[:, order])
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


TINY_MODEL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2)


def hidden_states(config, params, tokens, segment_ids, mesh_shape):
  mesh = mesh_lib.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  positions = np.zeros_like(segment_ids)
  for row in range(segment_ids.shape[0]):
    for segment in np.unique(segment_ids[row]):
      where = segment_ids[row] == segment
      positions[row, where] = np.arange(where.sum())
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
    apply = jax.jit(lambda p, t: Llama(config).apply(p, t, positions, segment_ids,
                                                     return_hidden=True))
    return np.asarray(apply(params, tokens))


def test_no_example_sees_another_across_a_shard_boundary():
  """Example 1 fills shards 0-1 and example 2 starts at shard 2's first token (context=4, row of
  64: shards hold natural chunks (0, 7), (1, 6), (2, 5), (3, 4)). Changing example 1's tokens
  must leave example 2's hidden states bitwise alone, and the reverse (causality); the same
  check on a row that is one example shows the change does cross when the mask allows it."""
  config = LlamaConfig(**TINY_MODEL, attention_implementation='blocked')
  params = mesh_lib.unboxed(Llama(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 128, (1, 64)).astype(np.int32)
  packed = np.where(np.arange(64) < 16, 1, 2)[None].astype(np.int32)
  changed_first, changed_second = tokens.copy(), tokens.copy()
  changed_first[0, 3] = (tokens[0, 3] + 1) % 128
  changed_second[0, 40] = (tokens[0, 40] + 1) % 128
  run = functools.partial(hidden_states, config, params, mesh_shape=(1, 1, 4, 1))
  base = run(tokens, packed)
  first = run(changed_first, packed)
  second = run(changed_second, packed)
  np.testing.assert_array_equal(first[0, 16:], base[0, 16:])   # example 2 never sees example 1
  np.testing.assert_array_equal(second[0, :40], base[0, :40])  # nor the future
  assert np.abs(first[0, 3:16] - base[0, 3:16]).max() > 1e-3
  one_example = np.ones_like(packed)
  leaked = run(changed_first, one_example) - run(tokens, one_example)
  assert np.abs(leaked[0, 16:]).max() > 1e-3  # without the segment boundary it does cross


@pytest.mark.parametrize('implementation,window', [('xla', None), ('blocked', 24),
                                                   ('splash', None), ('cudnn', None)])
def test_every_attention_path_serves_a_split_row(implementation, window, caplog):
  """Each kernel under context=2 against one device's reference attention, values and
  gradients; splash interpreted (rows of 512: chunks of 128, its block), cuDNN (CPU: none)
  falls back with its reason to the indexed kernel."""
  length = 512 if implementation == 'splash' else 64
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(2, length, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 16)), jnp.float32) for _ in range(2))
  cuts = np.sort(rng.choice(np.arange(1, length), 5, replace=False))
  segment_ids = jnp.asarray(np.stack([np.searchsorted(cuts, np.arange(length), 'right') + 1,
                                      np.where(np.arange(length) < length - 9, 1, 0)]), jnp.int32)

  order = ctx.zigzag_order(length, 2)  # a split row comes in zig-zag order

  def loss(q, k, v, implementation):
    out = attn.attention(q, k, v, q_segment_ids=segment_ids[:, order],
                         kv_segment_ids=segment_ids[:, order],
                         implementation=implementation, sliding_window=window,
                         context=ctx.context_layout(length))
    return jnp.sum(jnp.sin(out))

  mask = attn.attention_mask(segment_ids, segment_ids, sliding_window=window)
  reference = jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(attn.xla_attention(
      q, k, v, mask))), argnums=(0, 1, 2))(q, k, v)
  attn._warn_once.cache_clear()
  mesh = mesh_lib.make_mesh((1, 1, 2, 1), jax.devices()[:2])
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES), \
       caplog.at_level(logging.WARNING):
    assert ctx.context_layout(length) == ctx.ContextLayout('context', 2)
    value, grads = jax.jit(jax.value_and_grad(functools.partial(
        loss, implementation=implementation), argnums=(0, 1, 2)))(
            q[:, order], k[:, order], v[:, order])
  np.testing.assert_allclose(value, reference[0], rtol=1e-5)
  for got, want in zip(grads, reference[1]):
    np.testing.assert_allclose(got, want[:, order], atol=2e-5 * np.abs(want).max())
  if implementation == 'cudnn':
    assert "'cudnn' cannot serve this call on cpu" in caplog.text
    assert 'falling back to blocked' in caplog.text
  else:
    assert 'cannot serve' not in caplog.text


# ------------------------------------------------------------------ through the executable

def context_run_settings(model, data, cache):
  return {'model.path': str(model), 'model.dtype': 'float32', 'model.remat_policy': 'full',
          'lora.enabled': True, 'lora.rank': 4,
          'lora.dropout': 0.0,  # dropout masks follow the token layout; nothing else does
          'data.datasets': [{'path': str(data)}], 'data.template': 'chatml',
          'data.max_seq_len': 128, 'data.cache_dir': str(cache), 'batch_size': 2,
          'optim.learning_rate': 0.1, 'optim.warmup_steps': 0, 'train.num_steps': 8,
          # Adam's eps = 1 (as in test_train): its update is then proportional to the gradient,
          # not lr * sign(g) for gradients at float-noise level, which would compare noise.
          'optim.eps': 1.0,
          'train.log_every': 1, 'checkpoint.save_every': 2}


def devices_env(count):
  return {'XLA_FLAGS': f'--xla_force_host_platform_device_count={count}',
          'JAX_PLATFORMS': 'cpu'}


def logged_losses(workdir):
  records = map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
  return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


def test_context_run_through_the_executable_resumes_on_another_layout(tmp_path):
  """`jaxsft train` of a tiny HF model's LoRA run on 4 fake devices with
  mesh.shape=(1,1,4,1) logs the losses of the (1,1,1,1) run; SIGTERM after step 3, resumed with
  context=2 on 2 devices, it finishes with the one-device run's adapter (within 1e-5)."""
  model = tiny_model(tmp_path / 'model')
  data = write_json(tmp_path / 'alpaca.json', ALPACA * 2)
  config = write_config(tmp_path / 'run.py',
                        context_run_settings(model, data, tmp_path / 'cache'))
  one = tmp_path / 'one'
  run(['train', '--config', config, '--workdir', str(one), '--config.mesh.shape=(1,1,1,1)'],
      REPO, extra_env=devices_env(1))
  split = tmp_path / 'split'
  environment = env()
  environment.update(devices_env(4))
  process = subprocess.Popen(
      [JAXSFT, 'train', '--config', config, '--workdir', str(split),
       '--config.mesh.shape=(1,1,4,1)'], cwd=REPO, env=environment, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (split / 'metrics.jsonl').exists() or len(logged_losses(split)) < 3:
    assert process.poll() is None and time.time() < deadline, process.communicate()
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 75, stderr
  assert "on mesh {'data': 1, 'fsdp': 1, 'context': 4, 'tensor': 1}" in stderr
  resumed = run(['train', '--config', config, '--workdir', str(split),
                 '--config.mesh.shape=(1,1,2,1)'], REPO, extra_env=devices_env(2))
  assert 'resuming from the checkpoint at step' in resumed.stderr
  expected, got = logged_losses(one), logged_losses(split)
  assert sorted(got) == list(range(1, 9)) == sorted(expected)
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)],
                             rtol=1e-5)
  adapters = {}
  for name in ('one', 'split'):
    run(['export', '--workdir', str(tmp_path / name), '--format', 'peft', '--out',
         str(tmp_path / f'{name}-adapter')], REPO, extra_env=devices_env(1))
    adapters[name] = load_file(str(tmp_path / f'{name}-adapter' / 'adapter_model.safetensors'))
  assert adapters['one'].keys() == adapters['split'].keys()
  for key, value in adapters['one'].items():
    np.testing.assert_allclose(adapters['split'][key], value, rtol=1e-5,
                               atol=1e-5 * np.abs(value).max())


def test_plan_lowers_a_context_parallel_step_with_splash_for_tpu():
  """`jaxsft plan --platform tpu` of a run with context=4: each device's splash kernels (two per
  device index: one per chunk) are in the program."""
  from jaxsft.train import plan
  from jaxsft.train.run import run_settings
  config = tiny_config(lora=True)
  config.model.attention_implementation = 'splash'
  config.data.max_seq_len = 1024  # chunks of 128 tokens: splash's block
  config.batch_size = 2
  config.mesh.shape = (1, 1, 4, 1)
  lowering = plan.lower_for_platform(run_settings(config), 'tpu', jax.devices()[:4])
  assert (lowering.attention, lowering.fallback_reason) == ('splash', None)
  assert lowering.context_devices == 4 and lowering.kernel_calls > 0
  assert 'context parallel: each row split over 4 devices' in plan.platform_report(lowering,
                                                                                     'splash')


def test_chunked_mlp_equals_the_whole_row():
  """`model.mlp_chunk_size` (6 tokens: chunks that do not divide a device's 16 or 32, so the
  last is padded) gives the whole row's loss and gradients, on one device and split over 4."""
  config = LlamaConfig(**TINY_MODEL, attention_implementation='blocked', remat_policy='full')
  params = mesh_lib.unboxed(Llama(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  tokens = np.random.default_rng(0).integers(0, 128, (2, 64)).astype(np.int32)

  def loss_and_grads(config, mesh_shape):
    mesh = mesh_lib.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
      return jax.jit(jax.value_and_grad(
          lambda p: jnp.sum(jnp.sin(Llama(config).apply(p, tokens)))))(params)

  reference = loss_and_grads(config, (1, 1, 1, 1))
  for mesh_shape in ((1, 1, 1, 1), (1, 1, 4, 1)):
    chunked = loss_and_grads(config.replace(mlp_chunk_size=6), mesh_shape)
    assert_trees_close(chunked, reference, 1e-5)


def test_a_row_that_does_not_split_into_two_chunks_per_device_is_refused():
  from jaxsft.errors import UserError
  from jaxsft.train.validate import check_batch_layout
  mesh = mesh_lib.make_mesh((1, 1, 4, 1), jax.devices()[:4])
  check_batch_layout(2, 1, mesh, 128)
  with pytest.raises(UserError, match=r'set --config.data.max_seq_len=120 \(a multiple of 8\)'):
    check_batch_layout(2, 1, mesh, 126)


def test_long_single_device_rows_take_the_indexed_kernel(monkeypatch):
  """`blocked` on rows of `INDEXED_FROM` tokens or more is the indexed kernel (lowered to 128
  here): the reference's values and gradients, and no `blocked` switch in the program."""
  monkeypatch.setattr(attn, 'INDEXED_FROM', 128)
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(1, 128, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, 128, 2, 16)), jnp.float32) for _ in range(2))
  segment_ids = jnp.asarray(np.where(np.arange(128) < 50, 1, 2)[None], jnp.int32)

  def loss(q, k, v, implementation):
    return jnp.sum(jnp.sin(attn.attention(q, k, v, q_segment_ids=segment_ids,
                                          kv_segment_ids=segment_ids,
                                          implementation=implementation)))

  blocked = jax.jit(jax.value_and_grad(functools.partial(loss, implementation='blocked'),
                                       argnums=(0, 1, 2)))
  assert 'switch' not in str(jax.make_jaxpr(blocked)(q, k, v))
  got, want = blocked(q, k, v), jax.value_and_grad(
      functools.partial(loss, implementation='xla'), argnums=(0, 1, 2))(q, k, v)
  assert_trees_close(got, want, 1e-5)
