"""DoRA (`LoraSettings(dora=True)`, PEFT's `use_dora`) against PEFT: the init, the forward pass
and the gradients over float32, bf16 and NF4 (bitsandbytes) bases, dropout, the adapter files
both ways and the merged export."""

import json

import bitsandbytes as bnb
import flax
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from jaxsft.adapters import lora, quant
from jaxsft.errors import UserError
from jaxsft.interop import hf
from jaxsft.interop import peft as peft_io
from jaxsft.models import Llama, LlamaConfig
from jaxsft.models.layers import Projection

from hf_reference import make_model, random_tokens, torch_logits
from test_lora import MLP_PROJECTIONS, peft_with_random_adapters

# Attention and MLP, square and not (v_proj 64 -> 32, down_proj 128 -> 64).
TARGETS = ['q_proj', 'v_proj', 'o_proj', 'down_proj']
RANK, ALPHA = 4, 8.0
SETTINGS = lora.LoraSettings(rank=RANK, alpha=ALPHA, targets=tuple(TARGETS), dropout=0.0,
                             dora=True)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  folder = tmp_path_factory.mktemp('llama')
  make_model('llama3_gqa').save_pretrained(folder)
  return folder


def torch_base(base: str) -> torch.nn.Module:
  """The reference model: float32; its weights rounded to bf16; or the targeted projections as
  bitsandbytes NF4 `Linear4bit` (no double quantization: then jaxsft's codes are bnb's)."""
  model = make_model('llama3_gqa')
  if base == 'bfloat16':
    with torch.no_grad():
      for param in model.parameters():
        param.copy_(param.to(torch.bfloat16).float())
  if base == 'nf4':
    for name, module in list(model.named_modules()):
      if name.rsplit('.', 1)[-1] in TARGETS:
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                  compute_dtype=torch.float32, compress_statistics=False,
                                  quant_type='nf4')
        layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False,
                                         compress_statistics=False, quant_type='nf4')
        parent, child = name.rsplit('.', 1)
        setattr(model.get_submodule(parent), child, layer.to('cpu'))  # .to quantizes
    model.is_loaded_in_4bit = True  # PEFT then wraps them with its bnb LoRA layer
  return model


def jaxsft_base(folder, base: str):
  config, params = hf.load_checkpoint(folder, config_overrides={'scan_layers': False})
  if base == 'bfloat16':  # bf16 frozen weights, float32 compute
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  if base == 'nf4':
    params = quant.quantize(params, quant.QuantSettings(kind='nf4', double_quant=False,
                                                        targets=tuple(TARGETS)))
  return config, params


def peft_module(modules, layer, name):
  group = 'mlp' if name in MLP_PROJECTIONS else 'self_attn'
  return modules[f'base_model.model.model.layers.{layer}.{group}.{name}'], group


def cross_entropy(logits, tokens):
  log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1))


@pytest.mark.parametrize('base', ['float32', 'bfloat16', 'nf4'])
def test_dora_init_forward_and_gradients_match_peft(saved, base):
  """The magnitudes start at PEFT's (`||W||` of each output feature, a 4-bit W dequantized);
  with random adapters and magnitudes the logits and d loss / d (A, B, magnitude) equal PEFT's
  under torch autograd (the weight norm detached in both); an NF4 base merges into the
  float32 kernels that give the same logits."""
  model = torch_base(base)
  config, params = jaxsft_base(saved, base)
  initial = peft.get_peft_model(model, peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, use_dora=True))
  fresh = lora.init_lora(jax.random.key(0), lora.abstract_lora(hf.abstract_params(config),
                                                               SETTINGS), params)
  modules = dict(initial.named_modules())
  for layer in range(2):
    for name in TARGETS:
      module, group = peft_module(modules, layer, name)
      np.testing.assert_allclose(fresh[f'layers_{layer}'][group][name]['magnitude'],
                                 module.lora_magnitude_vector['default'].weight.detach().numpy(),
                                 rtol=1e-6)
  model = initial.unload()

  adapters, peft_model, modules = peft_with_random_adapters(model, config, TARGETS, RANK, ALPHA,
                                                           seed=3, dora=True)
  tokens = random_tokens(2, 12)
  peft_model.zero_grad()
  logits = peft_model(torch.as_tensor(tokens, dtype=torch.long)).logits
  torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), torch.as_tensor(
      tokens[:, 1:].reshape(-1), dtype=torch.long)).backward()
  expected = logits.detach().numpy()

  adapted = Llama(config.with_lora(SETTINGS))

  def loss(adapters):
    logits = adapted.apply({'params': params, 'lora': adapters}, tokens)
    return cross_entropy(logits, tokens), logits

  (_, ours), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)
  for layer in range(2):
    for name in TARGETS:
      module, group = peft_module(modules, layer, name)
      grad = grads[f'layers_{layer}'][group][name]
      for ours_grad, theirs in ((grad['a'].T, module.lora_A['default'].weight),
                                (grad['b'].T, module.lora_B['default'].weight),
                                (grad['magnitude'],
                                 module.lora_magnitude_vector['default'].weight)):
        np.testing.assert_allclose(np.asarray(ours_grad), theirs.grad.numpy(), atol=2e-6,
                                   rtol=1e-4)
  if base == 'nf4':  # PEFT's own merge would quantize the merged weight again
    merged = lora.dense_params(params, adapters, SETTINGS.scale)
    np.testing.assert_allclose(np.asarray(Llama(config).apply({'params': merged}, tokens)),
                               expected, atol=1e-5)
  peft_model.unload()


def test_dora_in_bf16_is_as_close_as_peft_in_bf16(saved):
  """bf16 weights and compute against PEFT's model cast to bf16, each compared with the float32
  logits (the two round differently; test_model_parity's rule). Measured (2 x 64 tokens): RMS
  error 0.0088 (jaxsft) vs 0.0096 (PEFT), max 0.045 vs 0.045."""
  config, params = jaxsft_base(saved, 'float32')
  adapters, peft_model, _ = peft_with_random_adapters(make_model('llama3_gqa'), config, TARGETS,
                                                     RANK, ALPHA, seed=3, dora=True)
  tokens = random_tokens(2, 64, seed=4)
  reference = torch_logits(peft_model, tokens).astype(np.float64)
  theirs = torch_logits(peft_model.to(torch.bfloat16), tokens) - reference
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  ours = Llama(config.replace(dtype=jnp.bfloat16).with_lora(SETTINGS)).apply(
      {'params': params, 'lora': adapters}, tokens)
  ours = np.asarray(ours, np.float64) - reference
  rms = lambda error: np.sqrt(np.mean(error ** 2))  # noqa: E731
  assert rms(ours) <= 1.3 * rms(theirs), (rms(ours), rms(theirs))
  assert np.abs(ours).max() <= 2 * np.abs(theirs).max()


def test_dora_dropout_reaches_the_base_as_in_peft():
  """With dropout PEFT feeds the dropped input to the adapter and to the `(g - 1) x @ W` term,
  the plain `x @ W` (and the bias) keeping the whole input: the same mask in both (PEFT's
  dropout replaced by jaxsft's dropped input) gives the same outputs and gradients."""
  rng = np.random.default_rng(5)
  d_in, d_out, scale = 16, 8, 2.0
  w = rng.normal(0, 0.2, (d_out, d_in)).astype(np.float32)
  bias = rng.normal(0, 0.2, d_out).astype(np.float32)
  adapters = {'a': rng.normal(0, 0.3, (d_in, RANK)).astype(np.float32),
              'b': rng.normal(0, 0.3, (RANK, d_out)).astype(np.float32),
              'magnitude': rng.uniform(0.5, 1.0, d_out).astype(np.float32)}
  x = rng.normal(size=(2, 3, d_in)).astype(np.float32)
  weights = rng.normal(size=(2, 3, d_out)).astype(np.float32)
  layer = Projection(d_out, ('embed', 'mlp'), use_bias=True, lora_scale=scale,
                     lora_dropout=0.5, deterministic=False)

  def loss(adapters):
    y, state = layer.apply({'params': {'kernel': w.T, 'bias': bias}, 'lora': adapters}, x,
                           rngs={'dropout': jax.random.key(1)}, capture_intermediates=True,
                           mutable=['intermediates'])
    return jnp.sum(y * weights), (y, state['intermediates']['Dropout_0']['__call__'][0])

  (_, (y, dropped)), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
  assert 0 < np.mean(np.asarray(dropped) == 0) < 1

  class SameMask(torch.nn.Module):
    def forward(self, x):
      return torch.from_numpy(np.array(dropped))

  linear = torch.nn.Linear(d_in, d_out)
  with torch.no_grad():
    linear.weight.copy_(torch.from_numpy(w))
    linear.bias.copy_(torch.from_numpy(bias))
  wrapped = peft.get_peft_model(torch.nn.Sequential(linear), peft.LoraConfig(
      r=RANK, lora_alpha=scale * RANK, target_modules=['0'], lora_dropout=0.5, use_dora=True))
  module = wrapped.base_model.model[0]
  module.lora_dropout['default'] = SameMask()
  with torch.no_grad():
    module.lora_A['default'].weight.copy_(torch.from_numpy(adapters['a'].T.copy()))
    module.lora_B['default'].weight.copy_(torch.from_numpy(adapters['b'].T.copy()))
    module.lora_magnitude_vector['default'].weight.copy_(torch.from_numpy(adapters['magnitude']))
  wrapped.train()
  expected = wrapped(torch.from_numpy(x))
  (expected * torch.from_numpy(weights)).sum().backward()
  np.testing.assert_allclose(np.asarray(y), expected.detach().numpy(), atol=1e-6)
  for ours, theirs in ((grads['a'].T, module.lora_A['default'].weight),
                       (grads['b'].T, module.lora_B['default'].weight),
                       (grads['magnitude'], module.lora_magnitude_vector['default'].weight)):
    np.testing.assert_allclose(np.asarray(ours), theirs.grad.numpy(), atol=2e-6, rtol=1e-4)


def test_dora_adapter_and_merged_export_load_in_peft_and_transformers(saved, tmp_path):
  """A scanned DoRA tree saved as a PEFT adapter (`use_dora`, `lora_magnitude_vector`) loads in
  `PeftModel` with jaxsft's logits; PEFT's own save of it reads back into the same tree (and a
  tree without magnitudes refuses it); the merged HF folder `export` writes has the logits of
  PEFT's `merge_and_unload()`."""
  config, params = hf.load_checkpoint(saved)
  abstract = lora.abstract_lora(hf.abstract_params(config), SETTINGS)
  rng = np.random.default_rng(7)
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract), sep=None)
  adapters = flax.traverse_util.unflatten_dict({
      path: (rng.uniform(0.4, 0.9, x.shape) if path[-1] == 'magnitude'
             else rng.normal(0, 0.1, x.shape)).astype(np.float32) for path, x in flat.items()})
  assert adapters['layers']['self_attn']['v_proj']['magnitude'].shape == (2, 32)
  tokens = random_tokens(2, 12)
  ours = Llama(config.with_lora(SETTINGS)).apply({'params': params, 'lora': adapters}, tokens)

  peft_io.save_peft_adapter(str(tmp_path / 'ours'), adapters, config.num_layers, SETTINGS)
  assert json.loads((tmp_path / 'ours' / 'adapter_config.json').read_text())['use_dora'] is True
  peft_model = peft.PeftModel.from_pretrained(make_model('llama3_gqa'), tmp_path / 'ours')
  np.testing.assert_allclose(np.asarray(ours), torch_logits(peft_model, tokens), atol=1e-5)

  peft_model.save_pretrained(tmp_path / 'theirs')
  back, adapter_config = peft_io.load_peft_adapter(str(tmp_path / 'theirs'), abstract,
                                                   config.num_layers)
  assert adapter_config['use_dora'] is True
  for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(adapters)):
    np.testing.assert_array_equal(np.asarray(x), y)
  plain = lora.abstract_lora(hf.abstract_params(config), lora.LoraSettings(
      rank=RANK, alpha=ALPHA, targets=tuple(TARGETS), dropout=0.0))
  with pytest.raises(UserError, match='use_dora=True but lora.dora=False'):
    peft_io.load_peft_adapter(str(tmp_path / 'theirs'), plain, config.num_layers)

  # What `jaxsft export --format merged` writes: dense_params, then an HF folder.
  hf.save_checkpoint(tmp_path / 'merged', config,
                     lora.dense_params(params, adapters, SETTINGS.scale), dtype='float32')
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'merged', dtype=torch.float32, attn_implementation='eager').eval()
  np.testing.assert_allclose(torch_logits(merged, tokens),
                             torch_logits(peft_model.merge_and_unload(), tokens), atol=1e-5)


def test_dora_config_starts_magnitudes_at_the_kernels_norms():
  """`lora.dora=True` through the run config (scanned layers): the train state's magnitudes
  start at the kernels' column norms (an NF4 base's: the PEFT test above), and weight decay
  leaves them alone (it would pull them to 0, away from the base; HF's Trainer decays them)."""
  from test_train import tiny_config

  from jaxsft.parallel import mesh as mesh_lib
  from jaxsft.train import optim
  from jaxsft.train.model_source import model_config_from
  from jaxsft.train.run import run_settings
  from jaxsft.train.state import init_train_state
  config = tiny_config(lora=True)
  config.lora.dora, config.lora.targets = True, ['v_proj', 'down_proj']
  settings = run_settings(config)
  assert settings.lora.dora
  model_config, _ = model_config_from(settings.model, settings.lora)
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  optimizer, _ = optim.make_optimizer(settings.optim, 10)
  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(mesh_lib.DEFAULT_RULES):
    state = init_train_state(model_config, optimizer, mesh, mesh_lib.DEFAULT_RULES,
                             lora=settings.lora, quant=settings.quant, seed=settings.seed)
  for name, group in (('v_proj', 'self_attn'), ('down_proj', 'mlp')):
    kernel = np.asarray(state.frozen['layers'][group][name]['kernel'])  # [L, in, out]
    np.testing.assert_allclose(state.params['layers'][group][name]['magnitude'],
                               np.linalg.norm(kernel, axis=1), rtol=1e-6)
  decays = flax.traverse_util.flatten_dict(optim.decay_mask(state.params), sep='/')
  assert decays['layers/mlp/down_proj/a'] and not decays['layers/mlp/down_proj/magnitude']


def test_dora_refuses_experts_and_the_router():
  """PEFT adapts experts and the router as parameters (`ParamWrapper`), which refuse DoRA."""
  config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=2, num_kv_heads=2, num_experts=4, model_type='qwen3_moe')
  abstract = hf.abstract_params(config)
  for targets in (('gate_up_proj',), ('q_proj', 'gate')):
    with pytest.raises(UserError, match='lora.dora=True with adapters on experts or the router'):
      lora.abstract_lora(abstract, lora.LoraSettings(targets=targets, dropout=0.0, dora=True))
  attention = lora.abstract_lora(abstract, lora.LoraSettings(targets=('q_proj',), dora=True))
  assert attention['layers']['self_attn']['q_proj']['magnitude'].names == ('layers', 'heads')
