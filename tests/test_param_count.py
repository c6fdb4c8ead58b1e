"""Abstract shapes of published configs give the published parameter counts."""

import math

import jax
import jax.numpy as jnp
import pytest

from jaxsft.interop import hf, presets


@pytest.mark.parametrize('name, expected', [('llama2-7b', 6_738_415_616),
                                            ('llama3-8b', 8_030_261_248),
                                            ('llama3.1-8b', 8_030_261_248),
                                            ('llama3.2-1b', 1_235_814_400),
                                            ('mistral-7b', 7_241_732_096),
                                            ('qwen2.5-7b', 7_615_616_512),
                                            ('qwen3-0.6b', 596_049_920),
                                            ('qwen3-8b', 8_190_735_360),
                                            # mixtures of experts: every expert counted
                                            ('qwen3-30b-a3b', 30_532_122_624),
                                            ('mixtral-8x7b', 46_702_792_704)])
@pytest.mark.parametrize('scan_layers', [True, False])
def test_eval_shape_parameter_count(name, expected, scan_layers):
  config = presets.preset(name, scan_layers=scan_layers, param_dtype=jnp.bfloat16)
  leaves = jax.tree_util.tree_leaves(hf.abstract_params(config))  # eval_shape: no allocation
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
  assert sum(math.prod(leaf.shape) for leaf in leaves) == expected
  assert config.num_params() == expected


def test_an_unknown_preset_is_a_user_error_naming_the_closest():
  from jaxsft.errors import UserError
  with pytest.raises(UserError, match=r"unknown model preset 'llama2-7B' \(model.preset\).*"
                     r"Did you mean 'llama2-7b'\?"):
    presets.preset('llama2-7B')
