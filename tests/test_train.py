"""The train step: accumulation equals one big batch, meshes equal one device, LoRA saves the
weight-gradient FLOPs, NEFTune, the optimizer, and end-to-end runs on real data."""

import json
import pathlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.config import default_config
from jaxsft.eval.sampling import SampleCallback
from jaxsft.models.llama import neftune_noise
from jaxsft.parallel import mesh as mesh_lib
from jaxsft.parallel.batch import batch_sharding, global_batch
from jaxsft.train import optim
from jaxsft.train.loop import NonFiniteLoss
from jaxsft.train.model_source import model_config_from
from jaxsft.train.run import run_settings, train
from jaxsft.train.state import abstract_train_state, init_train_state, state_shardings
from jaxsft.train.step import make_train_step

from conftest import llama2_tokenizer, shared_data
from hf_reference import make_model

TINY = {'vocab_size': 256, 'hidden_size': 64, 'intermediate_size': 128, 'num_layers': 2,
        'num_heads': 4, 'num_kv_heads': 2, 'max_position_embeddings': 256}


def tiny_config(lora=False, **train_overrides):
  config = default_config()
  config.model.architecture = TINY
  config.model.dtype = 'float32'
  config.model.attention_implementation = 'xla'
  config.lora.enabled = lora
  config.lora.rank = 4
  config.lora.dropout = 0.0
  config.optim.learning_rate = 1e-2
  config.optim.warmup_steps = 0
  config.optim.weight_decay = 0.1
  # Adam's first step is lr * g / (|g| + eps): with the usual eps a gradient at float-noise
  # level still moves its weight by lr, so comparing updates would compare noise. eps = 1
  # makes the update proportional to the gradient, which is what these tests compare.
  config.optim.eps = 1.0
  for key, value in train_overrides.items():
    setattr(config.train, key, value)
  return config


def abstract_run_state(config):
  """A run's abstract train state as `jaxsft plan` builds it: its model (`shapes_only`: a
  preset stands in for a model.path that is not on disk), adapters and 4-bit base."""
  settings = run_settings(config)
  model_config, _ = model_config_from(settings.model, settings.lora, shapes_only=True)
  optimizer, _ = optim.make_optimizer(settings.optim, 1000)
  return abstract_train_state(model_config, optimizer, lora=settings.lora, quant=settings.quant)


def packed_batch(rows=8, length=32, seed=0):
  """Rows of 2-3 packed segments with padding and a partial loss mask."""
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros((rows, length), np.int32) for k in
           ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')}
  for r in range(rows):
    start = 0
    for segment, n in enumerate(rng.integers(6, 12, 3), start=1):
      end = min(start + n, length - 2)
      batch['segment_ids'][r, start:end] = segment
      batch['positions'][r, start:end] = np.arange(end - start)
      batch['loss_mask'][r, start:end] = rng.random(end - start) < 0.6
      start = end
  batch['inputs'] = rng.integers(0, 256, (rows, length), dtype=np.int32)
  batch['targets'] = rng.integers(0, 256, (rows, length), dtype=np.int32)
  batch['loss_mask'] *= batch['segment_ids'] > 0
  return batch


def run_steps(config, mesh_shape, batches, devices=None, with_hlo=False):
  """Initialises on a mesh and runs the jitted step; returns (state on host, metrics list),
  and the compiled step's HLO text third when `with_hlo`."""
  settings = run_settings(config)
  model_config, _ = model_config_from(settings.model, settings.lora)
  mesh = mesh_lib.make_mesh(mesh_shape, devices)
  rules = mesh_lib.DEFAULT_RULES
  optimizer, schedule = optim.make_optimizer(settings.optim, 10)
  parts = {'lora': settings.lora, 'quant': settings.quant}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = init_train_state(model_config, optimizer, mesh, rules, seed=settings.seed, **parts)
    shardings = state_shardings(model_config, optimizer, mesh, rules, **parts)
    rows = batch_sharding(mesh)
    step = jax.jit(make_train_step(model_config, optimizer, settings.step, schedule),
                   in_shardings=(shardings, {k: rows for k in batches[0]}),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    step = step.lower(state, global_batch(batches[0], rows)).compile()
    metrics = []
    for batch in batches:
      state, m = step(state, global_batch(batch, rows))
      metrics.append(jax.device_get(m))
  if with_hlo:
    return jax.device_get(state), metrics, step.as_text()
  return jax.device_get(state), metrics


def assert_trees_close(a, b, rtol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.abs(y).max(), 1e-12)
    assert np.abs(x - y).max() <= rtol * scale, (np.abs(x - y).max(), scale)


@pytest.mark.parametrize('lora', [False, True])
def test_gradient_accumulation_equals_one_big_batch(lora):
  batches = [packed_batch(seed=0), packed_batch(seed=1)]
  one = jax.devices()[:1]
  whole, whole_metrics = run_steps(tiny_config(lora), (1, 1, 1), batches, one)
  accumulated, accum_metrics = run_steps(tiny_config(lora, grad_accum_steps=4), (1, 1, 1),
                                         batches, one)
  for m, n in zip(whole_metrics, accum_metrics):
    np.testing.assert_allclose(m['loss'], n['loss'], rtol=1e-6)
    np.testing.assert_allclose(m['grad_norm'], n['grad_norm'], rtol=1e-5)
    assert m['supervised_tokens'] == n['supervised_tokens']
  assert_trees_close(accumulated.params, whole.params, 1e-5)


# Full fine-tuning on each mesh; LoRA (its adapters shard like their kernels) on the mesh that
# uses every axis.
@pytest.mark.parametrize('lora,mesh_shape', [(False, (8, 1, 1)), (False, (2, 4, 1)),
                                             (False, (2, 2, 2)), (True, (2, 2, 2))])
def test_meshes_match_one_device(lora, mesh_shape):
  batches = [packed_batch(seed=0), packed_batch(seed=1)]
  reference, reference_metrics = run_steps(tiny_config(lora), (1, 1, 1), batches,
                                           jax.devices()[:1])
  sharded, metrics = run_steps(tiny_config(lora), mesh_shape, batches)
  for m, n in zip(metrics, reference_metrics):
    np.testing.assert_allclose(m['loss'], n['loss'], rtol=1e-5)
  assert_trees_close(sharded.params, reference.params, 1e-5)
  assert_trees_close(sharded.opt_state, reference.opt_state, 1e-5)


@pytest.mark.parametrize('lora,tied', [(False, False), (True, False), (False, True)])
def test_fused_chunked_loss_trains_like_full_logits(lora, tied):
  """`train.loss_chunk_size` changes how the head and loss are computed (supervised chunks
  only, no [B, T, V] logits), not the step: same metrics, same updated weights."""
  batches = [packed_batch(seed=0), packed_batch(seed=1)]
  runs = {}
  for chunk in (0, 8):
    config = tiny_config(lora, loss_chunk_size=chunk)
    config.model.architecture = {**TINY, 'tie_word_embeddings': tied}
    runs[chunk] = run_steps(config, (1, 1, 1), batches, jax.devices()[:1])
  (reference, reference_metrics), (fused, metrics) = runs[0], runs[8]
  for m, n in zip(metrics, reference_metrics):
    np.testing.assert_allclose(m['loss'], n['loss'], rtol=1e-5)
    np.testing.assert_allclose(m['grad_norm'], n['grad_norm'], rtol=1e-4)
    assert m['accuracy'] == n['accuracy']
  assert_trees_close(fused.params, reference.params, 1e-5)


def test_lora_step_costs_at_most_070_of_full_step_flops():
  """XLA's cost analysis of one step, hidden 2048, 4 layers, 1024 tokens, no remat."""
  flops = {}
  for lora in (False, True):
    config = tiny_config(lora)
    config.model.architecture = {'vocab_size': 32000, 'hidden_size': 2048,
                                 'intermediate_size': 5504, 'num_layers': 4, 'num_heads': 16,
                                 'num_kv_heads': 16}
    config.lora.rank = 16
    settings = run_settings(config)
    model_config, _ = model_config_from(settings.model, settings.lora)
    optimizer, schedule = optim.make_optimizer(settings.optim, 10)
    state = abstract_run_state(config)
    batch = {k: jax.ShapeDtypeStruct((1, 1024), jnp.int32) for k in
             ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')}
    lowered = jax.jit(make_train_step(model_config, optimizer, schedule=schedule)).lower(
        state, batch)
    flops[lora] = lowered.cost_analysis()['flops']
  ratio = flops[True] / flops[False]
  assert ratio <= 0.70, ratio


def test_neftune_noise_is_segment_aware():
  segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 0, 0]])
  noise = np.asarray(neftune_noise(jax.random.key(0), segment_ids, 16, alpha=5.0))
  assert not noise[0, 6:].any()  # padding
  bound_1, bound_2 = 5.0 / np.sqrt(4 * 16), 5.0 / np.sqrt(2 * 16)
  assert np.abs(noise[0, :4]).max() <= bound_1 and np.abs(noise[0, :4]).max() > 0.8 * bound_1
  assert np.abs(noise[0, 4:6]).max() <= bound_2 and np.abs(noise[0, 4:6]).max() > 0.8 * bound_2


def test_neftune_changes_training_only():
  batches = [packed_batch(seed=0)]
  one = jax.devices()[:1]
  plain, plain_metrics = run_steps(tiny_config(), (1, 1, 1), batches, one)
  noisy, noisy_metrics = run_steps(tiny_config(neftune_alpha=5.0), (1, 1, 1), batches, one)
  assert plain_metrics[0]['loss'] != noisy_metrics[0]['loss']


def test_weight_decay_mask_and_schedules():
  params = {'layers': {'input_layernorm': {'scale': 1}, 'q_proj': {'kernel': 1, 'bias': 1}},
            'embed_tokens': {'embedding': 1}, 'lora': {'a': 1, 'b': 1}}
  mask = flax.traverse_util.flatten_dict(optim.decay_mask(params), sep='/')
  assert mask == {'layers/input_layernorm/scale': False, 'layers/q_proj/kernel': True,
                  'layers/q_proj/bias': False, 'embed_tokens/embedding': True,
                  'lora/a': True, 'lora/b': True}
  config = default_config().optim
  config.learning_rate, config.warmup_steps, config.min_lr_ratio = 1.0, 10, 0.1
  cosine = optim.learning_rate_schedule(optim.OptimizerSettings(**config.to_dict()), 110)
  assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
  assert float(cosine(10)) == pytest.approx(1.0) and float(cosine(60)) == pytest.approx(0.55)
  assert float(cosine(110)) == pytest.approx(0.1)
  config.schedule, config.warmup_steps, config.warmup_ratio = 'linear', -1, 0.1
  linear = optim.learning_rate_schedule(optim.OptimizerSettings(**config.to_dict()), 100)
  assert float(linear(10)) == pytest.approx(1.0) and float(linear(55)) == pytest.approx(0.55)


def e2e_config(tmp_path, model_dir, lora):
  config = default_config()
  config.model.path = str(model_dir)
  config.model.dtype = 'float32'
  config.model.attention_implementation = 'xla'
  config.lora.enabled = lora
  config.lora.rank = 8
  config.data.datasets = [{'path': str(shared_data('instructions/alpaca_tiny.json'))}]
  config.data.tokenizer = str(llama2_tokenizer())
  config.data.max_seq_len = 256
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.eval_size = 10
  config.batch_size = 8
  config.optim.learning_rate = 1e-2 if lora else 1e-3
  config.optim.warmup_steps = 0
  config.train.num_steps = 12
  config.train.log_every = 1
  config.train.progress_bar = False
  return config


@pytest.mark.parametrize('lora', [False, True])
def test_end_to_end_on_real_data(tmp_path, lora):
  model_dir = tmp_path / 'model'
  make_model('llama2_mha', vocab_size=32000).save_pretrained(model_dir)
  config = e2e_config(tmp_path, model_dir, lora)
  config.train.sample_prompts = ['Name a fruit.']
  config.train.sample_every = 6
  config.train.sample_max_new_tokens = 4
  from jaxsft.interop import hf
  _, base = hf.load_checkpoint(model_dir)
  base = jax.device_get(base)
  sampling = SampleCallback(tuple(config.train.sample_prompts), config.train.sample_every,
                            config.train.sample_max_new_tokens)
  result = train(config, str(tmp_path / 'run'), [sampling])
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    losses = [r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r]
  assert len(losses) == 12
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
  assert result['eval']['loss'] < 20
  samples = [json.loads(line) for line in (tmp_path / 'run' / 'samples.jsonl').open()]
  assert [s['step'] for s in samples] == [6, 12] and samples[0]['prompt'] == 'Name a fruit.'
  state = jax.device_get(result['state'])
  if lora:  # the base weights are bitwise the ones loaded
    for x, y in zip(jax.tree_util.tree_leaves(state.frozen), jax.tree_util.tree_leaves(base)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  else:
    assert state.frozen is None


def test_nan_loss_stops_the_run(tmp_path):
  model_dir = tmp_path / 'model'
  make_model('llama2_mha', vocab_size=32000).save_pretrained(model_dir)
  config = e2e_config(tmp_path, model_dir, False)
  config.optim.learning_rate = 1e12
  config.optim.max_grad_norm = 0.0
  with pytest.raises(NonFiniteLoss, match='the loss became'):
    train(config, str(tmp_path / 'run'))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
  model_dir = tmp_path / 'model'
  make_model('llama2_mha').save_pretrained(model_dir)  # vocabulary 256 < the tokenizer's 32000
  with pytest.raises(ValueError, match='32000 tokens but the model'):
    train(e2e_config(tmp_path, model_dir, False), str(tmp_path / 'run'))


@pytest.mark.parametrize('name', sorted(path.stem for path in (
    pathlib.Path(__file__).parent.parent / 'configs').glob('*.py')))
def test_every_config_resolves_and_builds_its_abstract_state(name):
  from jaxsft.config import load_config
  config = load_config(f'configs/{name}.py')
  config.model.path = ''  # the weights are not here; the preset gives the same shapes
  if name in ('alpaca_llama2_data',):
    config.model.preset = 'llama2-7b'
  state = abstract_run_state(config)
  leaves = jax.tree_util.tree_leaves(state)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  trained = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  if config.lora.enabled:
    assert state.frozen is not None and trained < 0.05 * sum(
        int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.frozen))
