"""One way to build the train state: the abstract state that `jaxsft plan`, the checkpoint
space check and resharding use is `jax.eval_shape` of the real init, placed by the same
`state_shardings`; the real init (random or from an HF folder, full, LoRA or QLoRA, on a
sharded mesh) gives exactly that tree: structure, shapes, dtypes and shardings."""

import flax
import flax.linen as nn
import jax
import pytest
from test_train import abstract_run_state, tiny_config

from jaxsft.adapters.quant import QuantizedKernel
from jaxsft.parallel.mesh import DEFAULT_RULES, make_mesh
from jaxsft.train import optim
from jaxsft.train.model_source import model_config_from
from jaxsft.train.run import run_settings
from jaxsft.train.state import abstract_train_state, init_train_state, state_shardings

from hf_reference import make_model


def _leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree)


def assert_same_layout(real, abstract, shardings):
  real_leaves, real_structure = _leaves(real)
  abstract_leaves, abstract_structure = _leaves(abstract)
  sharding_leaves = jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  assert real_structure == abstract_structure
  assert len(real_leaves) == len(abstract_leaves) == len(sharding_leaves)
  for (path, x), (_, a), sharding in zip(real_leaves, abstract_leaves, sharding_leaves):
    name = jax.tree_util.keystr(path)
    assert (x.shape, x.dtype) == (a.shape, a.dtype), name
    assert x.sharding == sharding, (name, x.sharding, sharding)


@pytest.mark.parametrize('method', ['full', 'lora', 'qlora'])
@pytest.mark.parametrize('source', ['random', 'hf'])
def test_the_abstract_state_is_the_real_init(tmp_path, method, source):
  config = tiny_config(lora=method != 'full')
  if method == 'qlora':
    config.quant.kind = 'nf4'
    config.quant.targets = ['all-linear']
  if source == 'hf':
    make_model('llama3_gqa').save_pretrained(tmp_path)
    config.model.path = str(tmp_path)
    config.model.architecture = {}
  config.mesh.shape = (2, 2, 2)
  settings = run_settings(config)
  model_config, folder = model_config_from(settings.model, settings.lora)
  assert (folder is None) == (source == 'random')
  mesh = make_mesh(settings.mesh.shape)
  optimizer, _ = optim.make_optimizer(settings.optim, 10)
  parts = {'lora': settings.lora, 'quant': settings.quant}
  with nn.logical_axis_rules(DEFAULT_RULES):
    real = init_train_state(model_config, optimizer, mesh, DEFAULT_RULES, base=folder,
                            seed=settings.seed, **parts)
  abstract = abstract_train_state(model_config, optimizer, **parts)
  shardings = state_shardings(model_config, optimizer, mesh, DEFAULT_RULES, **parts)
  assert_same_layout(real, abstract, shardings)
  # The fsdp and tensor axes really split the weights (not a layout of replicas).
  kernel = real.frozen if method != 'full' else real.params
  up = kernel['layers']['mlp']['up_proj']['kernel']
  up = up.codes if isinstance(up, QuantizedKernel) else up
  assert up.sharding.spec[1:] == ('fsdp', 'tensor')
  if method == 'qlora':  # quant.targets=['all-linear']: every projection is 4-bit, the rest not
    flat = flax.traverse_util.flatten_dict(real.frozen, sep='/')
    quantized = sorted(k[:-len('/kernel')] for k, v in flat.items()
                       if isinstance(v, QuantizedKernel))
    assert quantized == sorted(f'layers/{g}/{p}' for g, ps in (
        ('self_attn', ('q_proj', 'k_proj', 'v_proj', 'o_proj')),
        ('mlp', ('gate_proj', 'up_proj', 'down_proj'))) for p in ps)


def test_the_run_abstract_state_needs_no_weights(tmp_path):
  """The run's abstract state as `jaxsft plan` builds it (`shapes_only`: a preset stands in
  for a model.path that is not on disk)."""
  config = tiny_config(lora=True)
  config.model.architecture = {}
  config.model.path = str(tmp_path / 'not-downloaded')
  config.model.preset = 'llama2-7b'
  state = abstract_run_state(config)
  assert state.frozen['layers']['mlp']['up_proj']['kernel'].shape == (32, 4096, 11008)
  assert state.params['layers']['mlp']['up_proj']['a'].shape == (32, 4096, 4)
