"""LoRA: target selection, PEFT's initialisation, the adapted forward pass against PEFT, and
merging."""

import flax
import jax
import numpy as np
import peft
import pytest
import torch

from jaxsft.adapters import lora
from jaxsft.interop import hf
from jaxsft.models import Llama
from jaxsft.models.layers import low_rank_update

from hf_reference import make_model, random_tokens


def kernel_paths(tree):
  flat = flax.traverse_util.flatten_dict(tree, sep='/')
  return sorted(k.rsplit('/', 1)[0] for k in flat if k.endswith('/a'))


MLP_PROJECTIONS = ('gate_proj', 'up_proj', 'down_proj')


def adapting(targets, rank):
  """`LoraSettings` of rank `rank` on `targets` (the parts `abstract_lora` reads)."""
  return lora.LoraSettings(rank=rank, targets=tuple(targets))


def peft_with_random_adapters(model, config, targets, rank, alpha, rslora=False, seed=0,
                              dora=False):
  """Random (non-zero) jaxsft adapters for `targets` of the 2-layer model, and a PEFT model
  over `model` holding the same ones (DoRA: magnitudes U(0.4, 0.9), near the kernels' column
  norms of ~0.64). Returns `(adapters, peft_model, named_modules)`."""
  abstract = lora.abstract_lora(hf.abstract_params(config), lora.LoraSettings(
      rank=rank, alpha=alpha, rslora=rslora, targets=tuple(targets), dora=dora))
  rng = np.random.default_rng(seed)
  adapters = jax.tree_util.tree_map(
      lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), flax.core.unfreeze(
          flax.linen.unbox(abstract)))
  if dora:
    flat = flax.traverse_util.flatten_dict(adapters, sep=None)
    adapters = flax.traverse_util.unflatten_dict({path: rng.uniform(0.4, 0.9, x.shape).astype(
        np.float32) if path[-1] == 'magnitude' else x for path, x in flat.items()})
  peft_model = peft.get_peft_model(model, peft.LoraConfig(
      r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
      init_lora_weights=False, use_dora=dora))
  modules = dict(peft_model.named_modules())
  with torch.no_grad():
    for layer in range(2):
      for name in targets:
        group = 'mlp' if name in MLP_PROJECTIONS else 'self_attn'
        module = modules[f'base_model.model.model.layers.{layer}.{group}.{name}']
        pair = adapters[f'layers_{layer}'][group][name]
        module.lora_A['default'].weight.copy_(torch.from_numpy(pair['a'].T.copy()))
        module.lora_B['default'].weight.copy_(torch.from_numpy(pair['b'].T.copy()))
        if dora:
          module.lora_magnitude_vector['default'].weight.copy_(torch.from_numpy(
              pair['magnitude']))
  return adapters, peft_model, modules


@pytest.fixture(scope='module')
def loaded(tmp_path_factory):
  folder = tmp_path_factory.mktemp('llama')
  model = make_model('llama3_gqa')
  model.save_pretrained(folder)
  config, params = hf.load_checkpoint(folder, config_overrides={'scan_layers': False})
  return model, config, params


def test_targets_by_name_regex_and_all_linear(loaded):
  _, config, _ = loaded
  boxed = hf.abstract_params(config)
  by_name = kernel_paths(lora.abstract_lora(boxed, adapting(['q_proj', 'v_proj'], 4)))
  assert by_name == ['layers_0/self_attn/q_proj', 'layers_0/self_attn/v_proj',
                     'layers_1/self_attn/q_proj', 'layers_1/self_attn/v_proj']
  by_regex = kernel_paths(lora.abstract_lora(boxed, adapting([r'layers_1/mlp/(gate|up)_proj'],
                                                              4)))
  assert by_regex == ['layers_1/mlp/gate_proj', 'layers_1/mlp/up_proj']
  all_linear = kernel_paths(lora.abstract_lora(boxed, adapting(['all-linear'], 4)))
  assert len(all_linear) == 14 and not any('lm_head' in p for p in all_linear)
  query = adapting(['query'], 4)
  with pytest.raises(ValueError, match='match no kernel'):
    lora.abstract_lora(boxed, query)


def test_adapters_shard_like_their_kernels(loaded):
  _, config, _ = loaded
  boxed = hf.abstract_params(config.replace(scan_layers=True))
  abstract = lora.abstract_lora(boxed, adapting(['q_proj', 'down_proj'], 8))
  q = abstract['layers']['self_attn']['q_proj']
  assert q['a'].names == ('layers', 'embed', 'lora_rank')
  assert q['b'].names == ('layers', 'lora_rank', 'heads')
  assert q['a'].value.shape == (2, 64, 8) and q['b'].value.shape == (2, 8, 64)
  assert abstract['layers']['mlp']['down_proj']['a'].names == ('layers', 'mlp', 'lora_rank')


def test_peft_initialisation_keeps_the_base_model(loaded):
  _, config, params = loaded
  abstract = lora.abstract_lora(hf.abstract_params(config), adapting(['all-linear'], 8))
  adapters = lora.init_lora(jax.random.key(0), abstract)
  a = np.asarray(adapters['layers_0']['mlp']['down_proj']['a'])  # in = intermediate 128
  assert np.abs(a).max() <= 1 / np.sqrt(128) and np.abs(a).max() > 0.8 / np.sqrt(128)
  assert all(not np.asarray(x).any() for x in jax.tree_util.tree_leaves(adapters)
             if x.shape[-2] == 8)  # every b is zero
  tokens = random_tokens(2, 12)
  base = Llama(config).apply({'params': params}, tokens)
  # Any scale: every b is zero (the scale a model applying adapters has to be given).
  adapted = Llama(config.replace(lora_scale=1.0)).apply({'params': params, 'lora': adapters},
                                                        tokens)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))


@pytest.mark.parametrize('rslora', [False, True])
def test_adapted_forward_matches_peft_and_merging(loaded, rslora):
  model, config, params = loaded
  rank, alpha = 4, 16.0
  targets = ['q_proj', 'v_proj', 'down_proj']
  scale = lora.lora_scale(rank, alpha, rslora)
  adapters, peft_model, _ = peft_with_random_adapters(model, config, targets, rank, alpha,
                                                     rslora, seed=0)
  tokens = random_tokens(2, 12)
  with torch.no_grad():
    expected = peft_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  adapted_config = config.replace(lora_scale=scale)
  ours = Llama(adapted_config).apply({'params': params, 'lora': adapters}, tokens)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)
  merged = lora.merge_lora(params, adapters, scale)
  np.testing.assert_allclose(np.asarray(Llama(config).apply({'params': merged}, tokens)),
                             expected, atol=1e-4)
  peft_model.unload()


def test_low_rank_update_gradients_equal_autodiff():
  """The custom backward of `(x @ a) @ b` (written for XLA:CPU's speed) is autodiff's."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  a_ir = rng.normal(size=(8, 3)).astype(np.float32)
  b_ro = rng.normal(size=(3, 6)).astype(np.float32)
  weights = rng.normal(size=(2, 5, 6)).astype(np.float32)

  def loss(update):
    return lambda x, a, b: jax.numpy.sum(jax.numpy.tanh(update(x, a, b)) * weights)

  plain = lambda x, a, b: jax.numpy.einsum('...i,ir,ro->...o', x, a, b)  # noqa: E731
  np.testing.assert_allclose(low_rank_update(x, a_ir, b_ro), plain(x, a_ir, b_ro), rtol=1e-5)
  got = jax.grad(loss(low_rank_update), argnums=(0, 1, 2))(x, a_ir, b_ro)
  want = jax.grad(loss(plain), argnums=(0, 1, 2))(x, a_ir, b_ro)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_adapter_gradients_match_peft(loaded):
  """d loss / d (A, B) of every adapted projection equals PEFT's under torch autograd."""
  model, config, params = loaded
  rank, alpha = 4, 8.0
  targets = ['q_proj', 'k_proj', 'o_proj', 'gate_proj', 'up_proj']
  scale = lora.lora_scale(rank, alpha)
  adapters, peft_model, modules = peft_with_random_adapters(model, config, targets, rank,
                                                           alpha, seed=2)
  tokens = random_tokens(2, 12)
  peft_model.zero_grad()
  logits = peft_model(torch.as_tensor(tokens, dtype=torch.long)).logits
  torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                    torch.as_tensor(tokens[:, 1:].reshape(-1),
                                                    dtype=torch.long)).backward()

  adapted = Llama(config.replace(lora_scale=scale))

  def loss(adapters):
    logits = adapted.apply({'params': params, 'lora': adapters}, tokens)
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jax.numpy.mean(jax.numpy.take_along_axis(log_probs, tokens[:, 1:, None], -1))

  grads = jax.grad(loss)(adapters)
  for layer in range(2):
    for name in targets:
      group = 'mlp' if name in MLP_PROJECTIONS else 'self_attn'
      module = modules[f'base_model.model.model.layers.{layer}.{group}.{name}']
      pair = grads[f'layers_{layer}'][group][name]
      np.testing.assert_allclose(np.asarray(pair['a']).T,
                                 module.lora_A['default'].weight.grad.numpy(), atol=2e-6, rtol=1e-4)
      np.testing.assert_allclose(np.asarray(pair['b']).T,
                                 module.lora_B['default'].weight.grad.numpy(), atol=2e-6, rtol=1e-4)
  peft_model.unload()
