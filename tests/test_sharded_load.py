"""Loading onto a (2, 2, 2) mesh of 8 fake CPU devices: the right shardings, the right values,
and each device's shard read from disk on its own."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxsft.interop import hf
from jaxsft.models import Llama
from jaxsft.parallel import mesh as mesh_lib

from hf_reference import random_tokens, save_model


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  paths = {}
  for variant in ('llama3_gqa', 'qwen3'):
    paths[variant] = tmp_path_factory.mktemp(variant)
    save_model(variant, paths[variant])
  return paths


@pytest.mark.parametrize('variant,scan_layers', [('llama3_gqa', True), ('llama3_gqa', False),
                                                 ('qwen3', True)])
def test_sharded_load_matches_logical_axes_and_values(folders, variant, scan_layers,
                                                      monkeypatch):
  folder = folders[variant]
  assert jax.device_count() == 8
  mesh = mesh_lib.make_mesh((2, 2, 2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'context': 1, 'tensor': 2}

  reads = []
  original_read = hf.SafetensorsReader.read

  def recording_read(self, name, index=()):
    part = original_read(self, name, index)
    reads.append((name, part.shape, self.shape(name)))
    return part

  monkeypatch.setattr(hf.SafetensorsReader, 'read', recording_read)
  overrides = {'scan_layers': scan_layers}
  config, sharded = hf.load_checkpoint(folder, mesh=mesh, config_overrides=overrides)
  monkeypatch.undo()
  _, unsharded = hf.load_checkpoint(folder, config_overrides=overrides)

  # Expected shardings straight from flax's logical-axis machinery.
  specs = nn.get_partition_spec(hf.abstract_params(config))
  expected = nn.logical_to_mesh_sharding(specs, mesh, mesh_lib.DEFAULT_RULES)
  flat_expected = jax.tree_util.tree_leaves_with_path(expected)
  flat_sharded = jax.tree_util.tree_leaves_with_path(sharded)
  assert [p for p, _ in flat_expected] == [p for p, _ in flat_sharded]
  sharded_dims = 0
  for (path, want), (_, array) in zip(flat_expected, flat_sharded):
    assert array.sharding.is_equivalent_to(want, array.ndim), (path, array.sharding, want)
    sharded_dims += sum(axis is not None for axis in want.spec)
  assert sharded_dims > 10  # the rules really shard most weights on this mesh
  for x, y in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(unsharded)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Weights sharded 4 ways ('embed' over fsdp, 'mlp'/'heads' over tensor) were read one quarter
  # at a time: no read returned a whole matrix.
  matrix_reads = [(shape, full) for name, shape, full in reads if len(full) == 2]
  assert matrix_reads and all(np.prod(shape) * 4 == np.prod(full) for shape, full in matrix_reads)

  tokens = random_tokens(4, 16, seed=7)
  with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, 'use_mesh') else mesh:
    logits_sharded = jax.jit(lambda p, t: Llama(config).apply({'params': p}, t))(sharded, tokens)
  logits = Llama(config).apply({'params': unsharded}, tokens)
  np.testing.assert_allclose(logits_sharded, logits, atol=1e-5)
