"""Mixture-of-experts models (issue 27): Qwen3-MoE and Mixtral against transformers (logits,
the load-balancing loss), HF folders in and out bitwise, and the grouped matmul against a dense
one-hot reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from user_path import tiny_moe_model

from jaxsft.interop import hf
from jaxsft.models import grouped as grouping
from jaxsft.models import moe
from jaxsft.models.llama import Llama

# (model type, transformers config overrides): experts, top-k, renormalization, and a dense
# layer among sparse ones (unscanned layers) all vary.
CASES = {
    'qwen3_moe-8x3-unnormalized': ('qwen3_moe', dict(num_experts=8, num_experts_per_tok=3,
                                                     norm_topk_prob=False)),
    'qwen3_moe-dense-layer-1': ('qwen3_moe', dict(num_hidden_layers=3, mlp_only_layers=[1])),
    'mixtral-4x2': ('mixtral', {}),
}


@functools.lru_cache(maxsize=None)
def _folder(case, tmp_root):
  model_type, overrides = CASES[case]
  folder = tmp_root / case
  folder.mkdir()
  return tiny_moe_model(folder, model_type, **overrides)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp('moe')
  return lambda case: _folder(case, root)


def _hf_model(folder):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize('case', sorted(CASES))
def test_packed_logits_and_aux_loss_equal_transformers(models, case):
  """A packed row of three examples and a row with padding: each example's logits equal
  transformers' on that example alone within 1e-4, and the load-balancing loss over the
  non-padding tokens equals transformers' `output_router_logits=True` value with the
  attention mask within 1e-5."""
  folder = models(case)
  config, params = hf.load_checkpoint(folder, config_overrides={'dtype': 'float32'})
  assert config.num_experts == (8 if '8x3' in case else 4)
  assert config.scanned == ('dense-layer' not in case)
  model = _hf_model(folder)
  rng = np.random.default_rng(1)
  lengths = [(7, 12, 5), (15,)]  # row 1: 15 tokens, then 9 of padding
  tokens = rng.integers(3, config.vocab_size, (2, 24)).astype(np.int32)
  segments, positions = np.zeros((2, 24), np.int32), np.zeros((2, 24), np.int32)
  for row, row_lengths in enumerate(lengths):
    start = 0
    for segment, length in enumerate(row_lengths, 1):
      segments[row, start:start + length] = segment
      positions[row, start:start + length] = np.arange(length)
      start += length
  logits, state = Llama(config).apply({'params': params}, tokens, positions, segments,
                                      mutable=['intermediates'])
  logits = np.asarray(logits)
  with torch.no_grad():
    for row, row_lengths in enumerate(lengths):
      start = 0
      for length in row_lengths:
        expected = model(torch.tensor(tokens[row:row + 1, start:start + length],
                                      dtype=torch.long)).logits[0].numpy()
        np.testing.assert_allclose(logits[row, start:start + length], expected, atol=1e-4)
        start += length
    # transformers' loss over a padded batch: the same tokens, rows laid out unpacked.
    reference = model(torch.tensor(tokens, dtype=torch.long),
                      attention_mask=torch.tensor(segments > 0, dtype=torch.long),
                      output_router_logits=True)
  # Packed row 0 attends within examples, transformers' row 0 across them: the routers see
  # other hidden states, so the aux loss is compared on a batch laid out as transformers has it.
  unpacked_positions = np.where(segments > 0, np.arange(24)[None], 0).astype(np.int32)
  _, state = Llama(config).apply({'params': params}, tokens, unpacked_positions,
                                 (segments > 0).astype(np.int32), mutable=['intermediates'])
  aux = moe.load_balancing_loss(moe.router_stats(state['intermediates']), config.num_experts)
  np.testing.assert_allclose(float(aux), float(reference.aux_loss), rtol=1e-5)


@pytest.mark.parametrize('case', sorted(CASES))
def test_hf_folder_round_trip_is_bitwise(models, case, tmp_path):
  """Load then save: the same tensor names and bytes as transformers wrote, a config.json
  transformers reads back as the same architecture."""
  folder = models(case)
  config, params = hf.load_checkpoint(folder)
  hf.save_checkpoint(tmp_path, config, params)
  original, saved = load_file(folder / 'model.safetensors'), load_file(
      tmp_path / 'model.safetensors')
  assert sorted(original) == sorted(saved)
  for name in original:
    assert original[name].dtype == saved[name].dtype and np.array_equal(original[name],
                                                                         saved[name]), name
  import transformers
  before = transformers.AutoConfig.from_pretrained(folder).to_dict()
  after = transformers.AutoConfig.from_pretrained(tmp_path).to_dict()
  for key in ('num_local_experts', 'num_experts_per_tok', 'norm_topk_prob', 'mlp_only_layers',
              'decoder_sparse_step', 'moe_intermediate_size', 'router_aux_loss_coef'):
    assert before.get(key) == after.get(key), key


@pytest.mark.parametrize('tokens', [20, 3])
def test_grouped_matmul_and_routing_equal_a_dense_one_hot_reference(tokens):
  """The dropless grouped path (assignments grouped by expert in tiles, one grouped matmul per
  projection, back to token order, weighted) against every expert applied to every token and
  masked with the routing weights: values and gradients of the input and the kernels, float32;
  the tile scan (CPU, GPU) and `ragged_dot` over the same layout (TPU) alike."""
  rng = np.random.default_rng(0)
  t, d, f, e, k = tokens, 8, 6, 5, 2
  x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  w_in = jnp.asarray(rng.standard_normal((e, d, f)), jnp.float32)
  w_out = jnp.asarray(rng.standard_normal((e, f, d)), jnp.float32)
  logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
  weights, experts, _ = moe.route(logits, k, True)
  layout = grouping.group_by_expert(experts, e)
  assert layout.length % layout.tile == 0 and int(jnp.sum(layout.group_sizes)) <= layout.length

  def grouped(x, w_in, w_out, matmul=grouping.grouped_matmul):
    x_n = grouping.scatter_rows(jnp.repeat(x, k, axis=0), layout)
    y_n = matmul(jnp.tanh(matmul(x_n, w_in, layout)), w_out, layout)
    y_tkd = jnp.take(y_n, layout.rows, axis=0).reshape(t, k, d)
    return jnp.einsum('tkd,tk->td', y_tkd, weights)

  def ragged(x, kernel, layout):
    return jax.lax.ragged_dot(x, kernel, layout.group_sizes)

  def dense(x, w_in, w_out):  # every expert on every token
    every_etd = jnp.einsum('etf,efd->etd', jnp.tanh(jnp.einsum('td,edf->etf', x, w_in)), w_out)
    gate_te = jnp.sum(jax.nn.one_hot(experts, e) * weights[..., None], axis=1)
    return jnp.einsum('etd,te->td', every_etd, gate_te)

  probe = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  expected = jax.value_and_grad(lambda *w: jnp.sum(dense(*w) * probe), (0, 1, 2))(x, w_in,
                                                                                   w_out)
  for path in (grouped, functools.partial(grouped, matmul=ragged)):
    got = jax.value_and_grad(lambda *w: jnp.sum(path(*w) * probe), (0, 1, 2))(x, w_in, w_out)
    for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-5)
  # Experts split over two devices ('tokens' exchange): each device's layout keeps only its
  # experts (the others' assignments get no row), and the two partial outputs sum to the whole.
  def shard(first, count):
    local = grouping.group_by_expert(experts - first, count, grouping.tile_rows(t * k, e),
                                     t * min(k, count))
    x_n = grouping.scatter_rows(jnp.repeat(x, k, axis=0), local)
    hidden = jnp.tanh(grouping.grouped_matmul(x_n, w_in[first:first + count], local))
    y_n = grouping.grouped_matmul(hidden, w_out[first:first + count], local)
    return jnp.einsum('tkd,tk->td', grouping.gather_rows(y_n, local).reshape(t, k, d), weights)
  np.testing.assert_allclose(np.asarray(shard(0, 3) + shard(3, 2)),
                             np.asarray(dense(x, w_in, w_out)), rtol=1e-5, atol=1e-5)
  # Routing: the top-k of the softmax, renormalized; transformers' torch.topk picks the same.
  probs = torch.softmax(torch.tensor(np.asarray(logits)), -1)
  top, index = torch.topk(probs, k, dim=-1)
  np.testing.assert_array_equal(np.asarray(experts), index.numpy())
  np.testing.assert_allclose(np.asarray(weights), (top / top.sum(-1, keepdim=True)).numpy(),
                             rtol=1e-6)


@pytest.mark.parametrize('case', ['qwen3_moe-8x3-unnormalized', 'mixtral-4x2'])
def test_lora_on_experts_and_router_equals_peft(models, case, tmp_path):
  """Random adapters on q_proj, the router and both expert projections, saved by jaxsft as a
  PEFT adapter (`target_parameters` for the experts and the router) and loaded by
  `PeftModel`: the same logits (1e-4) and the same gradients of every adapter (tolerances of
  tests/test_lora.py), compared by PEFT's tensor names."""
  import peft

  from jaxsft.adapters import lora
  from jaxsft.interop import peft as peft_io
  folder = models(case)
  config, params = hf.load_checkpoint(folder, config_overrides={'dtype': 'float32'})
  settings = lora.LoraSettings(rank=4, alpha=8.0, dropout=0.0,
                               targets=('q_proj', 'gate', 'gate_up_proj', 'down_proj'))
  abstract = lora.abstract_lora(hf.abstract_params(config), settings)
  rng = np.random.default_rng(3)
  adapters = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32),
                                    flax_unbox(abstract))
  peft_io.save_peft_adapter(str(tmp_path / 'adapter'), adapters, config.num_layers, settings)
  peft_model = peft.PeftModel.from_pretrained(_hf_model(folder), tmp_path / 'adapter',
                                                 is_trainable=True)
  adapter_config = peft_model.peft_config['default']
  assert sorted(adapter_config.target_parameters) == [
      'mlp.experts.down_proj', 'mlp.experts.gate_up_proj', 'mlp.gate.weight']
  tokens = np.random.default_rng(4).integers(3, config.vocab_size, (2, 10))
  logits = peft_model(torch.as_tensor(tokens, dtype=torch.long)).logits
  torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                    torch.as_tensor(tokens[:, 1:].reshape(-1))).backward()
  adapted = Llama(config.with_lora(settings))

  def loss(adapters):
    out = adapted.apply({'params': params, 'lora': adapters}, tokens)
    log_probs = jax.nn.log_softmax(out[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1))

  np.testing.assert_allclose(
      np.asarray(adapted.apply({'params': params, 'lora': adapters}, tokens)),
      logits.detach().numpy(), atol=1e-4)
  grads = peft_io.peft_tensors(jax.grad(loss)(adapters), config.num_layers)
  peft_grads = {name.replace('.default', ''): p.grad.numpy()
                for name, p in peft_model.named_parameters() if p.grad is not None}
  assert sorted(grads) == sorted(peft_grads)
  for name, grad in grads.items():
    np.testing.assert_allclose(grad, peft_grads[name], atol=2e-6, rtol=1e-4, err_msg=name)


def flax_unbox(tree):
  import flax
  return flax.core.unfreeze(flax.linen.unbox(tree))


def test_lora_run_through_the_executable_exports_for_peft_and_transformers(tmp_path):
  """`jaxsft train` of a tiny Qwen3-MoE folder with LoRA on attention and experts logs the
  load-balancing loss next to the loss; `jaxsft export` writes a PEFT adapter (experts under
  `target_parameters`) and a merged folder whose logits in `PeftModel` and
  `AutoModelForCausalLM` agree (1e-4), and differ from the base model's (the adapters
  trained)."""
  import json

  import peft
  import transformers
  from user_path import ALPACA, REPO, run, write_config, write_json
  model = tiny_moe_model(tmp_path / 'model')
  data = write_json(tmp_path / 'alpaca.json', ALPACA * 2)
  config = write_config(tmp_path / 'run.py', {
      'model.path': str(model), 'model.dtype': 'float32', 'lora.enabled': True,
      'lora.rank': 4, 'lora.dropout': 0.0, 'lora.targets': ['q_proj', 'v_proj', 'gate_up_proj',
                                                            'down_proj'],
      'data.datasets': [{'path': str(data)}], 'data.template': 'chatml',
      'data.max_seq_len': 128, 'data.cache_dir': str(tmp_path / 'cache'), 'batch_size': 2,
      'optim.learning_rate': 0.05, 'optim.warmup_steps': 0, 'train.num_steps': 4,
      'train.log_every': 1})
  trained = run(['train', '--config', config, '--workdir', str(tmp_path / 'run')], REPO)
  assert ' | aux ' in trained.stderr
  records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text()
             .splitlines()]
  aux = [r['train/router_aux_loss'] for r in records if 'train/router_aux_loss' in r]
  assert len(aux) == 4 and all(np.isfinite(aux))
  for fmt in ('peft', 'merged'):
    run(['export', '--workdir', str(tmp_path / 'run'), '--format', fmt, '--out',
         str(tmp_path / fmt), '--dtype', 'float32'], REPO)
  adapter_config = json.loads((tmp_path / 'peft' / 'adapter_config.json').read_text())
  assert adapter_config['target_parameters'] == ['mlp.experts.down_proj',
                                                 'mlp.experts.gate_up_proj']
  assert adapter_config['target_modules'] == ['q_proj', 'v_proj']
  tokens = torch.as_tensor(np.random.default_rng(5).integers(3, 90, (2, 12)))
  with torch.no_grad():
    base = _hf_model(model)
    base_logits = base(tokens).logits.numpy()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / 'peft').eval()
    adapted_logits = adapted(tokens).logits.numpy()
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / 'merged', dtype=torch.float32).eval()
    merged_logits = merged(tokens).logits.numpy()
  np.testing.assert_allclose(adapted_logits, merged_logits, atol=1e-4)
  assert np.abs(adapted_logits - base_logits).max() > 1e-3
  # `jaxsft eval` of the run (adapters on experts applied) and of the merged folder agree.
  perplexity = {}
  for name, source in (('run', ['--workdir', str(tmp_path / 'run')]),
                       ('merged', ['--hf', str(tmp_path / 'merged'), '--template', 'chatml',
                                   '--max-seq-len', '128'])):
    run(['eval', *source, '--data', str(data), '--out', str(tmp_path / f'{name}.json')], REPO)
    perplexity[name] = json.loads((tmp_path / f'{name}.json').read_text())['perplexity']
  np.testing.assert_allclose(perplexity['run'], perplexity['merged'], rtol=1e-4)


def test_peft_adapter_on_experts_imports_with_peft_logits(models, tmp_path):
  """An adapter PEFT made (`target_parameters` on both expert projections and the router,
  random A and B) loads into jaxsft's LoRA tree with PEFT's logits; KV-cache greedy decoding
  with it equals PEFT's `generate`."""
  import importlib

  import peft

  from jaxsft.adapters import lora
  from jaxsft.interop import peft as peft_io
  generate = importlib.import_module('jaxsft.eval.generate')
  folder = models('qwen3_moe-8x3-unnormalized')
  config, params = hf.load_checkpoint(folder, config_overrides={'dtype': 'float32'})
  torch.manual_seed(0)
  peft_model = peft.get_peft_model(_hf_model(folder), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=['q_proj'], lora_dropout=0.0, init_lora_weights=False,
      target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj',
                         'mlp.gate.weight'])).eval()
  peft_model.save_pretrained(tmp_path / 'adapter')
  settings = lora.LoraSettings(rank=4, alpha=8.0, dropout=0.0,
                               targets=('q_proj', 'gate', 'gate_up_proj', 'down_proj'))
  abstract = lora.abstract_lora(hf.abstract_params(config), settings)
  adapters, _ = peft_io.load_peft_adapter(str(tmp_path / 'adapter'), abstract,
                                          config.num_layers)
  config = config.with_lora(settings)
  tokens = np.random.default_rng(6).integers(3, config.vocab_size, (2, 9))
  ours = Llama(config).apply({'params': params, 'lora': adapters}, tokens)
  with torch.no_grad():
    expected = peft_model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)
  prompts = [tokens[0].tolist(), tokens[1, :4].tolist()]
  greedy = generate.generate(config, {'params': params, 'lora': adapters}, prompts,
                             generate.SamplingConfig(max_new_tokens=10))
  for prompt, got in zip(prompts, greedy):
    with torch.no_grad():
      out = peft_model.generate(torch.as_tensor([prompt]), max_new_tokens=10, do_sample=False,
                                eos_token_id=None, pad_token_id=0,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert got == out[0, len(prompt):].tolist()


def test_lora_targets_that_match_no_kernel_name_the_experts(models):
  """Axolotl #3515's trap: dense MLP names on an MoE model would adapt attention only; jaxsft
  refuses, naming the model's projections. Dropout on expert adapters is refused (PEFT could
  not load the adapter)."""
  from jaxsft.adapters import lora
  from jaxsft.errors import UserError
  config, _ = hf.load_checkpoint(models('mixtral-4x2'))
  abstract = hf.abstract_params(config)
  with pytest.raises(UserError, match=r"lora.targets \['gate_proj', 'up_proj'\] match no "
                     r"kernel of this model.*'gate_up_proj'"):
    lora.abstract_lora(abstract, lora.LoraSettings(
        targets=('q_proj', 'gate_proj', 'up_proj', 'down_proj'), dropout=0.0))
  with pytest.raises(UserError, match='lora.dropout=0.05 with adapters on experts'):
    lora.abstract_lora(abstract, lora.LoraSettings(targets=('all-linear',), dropout=0.05))
  adapted = lora.abstract_lora(abstract, lora.LoraSettings(targets=('all-linear',),
                                                           dropout=0.0))
  assert set(adapted['layers']['mlp']) == {'experts'}  # all-linear: experts, not the router
