"""Export to transformers and PEFT, and import from PEFT: the same logits everywhere."""

import json

import flax.linen as nn
import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from test_train import e2e_config

from jaxsft.models import Llama
from jaxsft.parallel import mesh as mesh_lib
from jaxsft.train import export, optim
from jaxsft.train.model_source import model_config_from
from jaxsft.train.run import run_settings, train
from jaxsft.train.state import init_train_state

from hf_reference import make_model, random_tokens


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize('variant,modules_to_save', [('llama2_mha', []),
                                                     ('qwen3', ['q_norm', 'k_norm'])])
def test_lora_run_exports_as_peft_adapter_and_merged_checkpoint(tmp_path, variant,
                                                                modules_to_save):
  """Qwen3's per-head norms train whole (PEFT's modules_to_save) next to the adapters."""
  model_dir = tmp_path / 'model'
  make_model(variant, vocab_size=32000).save_pretrained(model_dir)
  config = e2e_config(tmp_path, model_dir, lora=True)
  config.train.num_steps = 4
  config.lora.targets = ['q_proj', 'v_proj', 'down_proj']
  config.lora.modules_to_save = modules_to_save
  config.lora.rank, config.lora.alpha = 4, 8.0
  result = train(config, str(tmp_path / 'run'))
  tokens = random_tokens(2, 16, vocab=32000)
  ours = np.asarray(Llama(result['model_config']).apply(
      jax.device_get(result['state'].variables()), tokens))
  assert np.abs(np.asarray(jax.device_get(result['state'].params['layers']['self_attn']
                                          ['q_proj']['b']))).max() > 0  # B really trained

  for name in modules_to_save:  # the norms really trained, away from the base's values
    trained = result['state'].params['layers']['self_attn'][name]['scale']
    frozen = result['state'].frozen['layers']['self_attn'][name]['scale']
    assert np.abs(np.asarray(trained) - np.asarray(frozen)).max() > 0

  export.export_run(str(tmp_path / 'run'), 'peft', str(tmp_path / 'adapter'))
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  adapted = peft.PeftModel.from_pretrained(base, tmp_path / 'adapter').eval()
  np.testing.assert_allclose(torch_logits(adapted, tokens), ours, atol=1e-4)
  adapter_config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert sorted(adapter_config['modules_to_save'] or []) == sorted(modules_to_save)

  export.export_run(str(tmp_path / 'run'), 'merged', str(tmp_path / 'merged'), 'float32')
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'merged',
                                                             dtype=torch.float32).eval()
  np.testing.assert_allclose(torch_logits(merged, tokens), ours, atol=1e-4)
  assert (tmp_path / 'merged' / 'tokenizer.json').exists() or (
      tmp_path / 'merged' / 'tokenizer.model').exists()


@pytest.mark.parametrize('variant,modules_to_save', [('llama3_gqa', []),
                                                     ('qwen3', ['q_norm', 'k_norm'])])
def test_peft_adapter_imports_with_peft_logits(tmp_path, variant, modules_to_save):
  model_dir = tmp_path / 'model'
  hf_model = make_model(variant)
  hf_model.save_pretrained(model_dir)
  peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'up_proj'], lora_dropout=0.0,
      init_lora_weights=False, modules_to_save=modules_to_save or None))  # random non-zero B
  with torch.no_grad():  # saved norms away from the base's
    for name, param in peft_model.named_parameters():
      if 'modules_to_save' in name:
        param.mul_(1.5)
  peft_model.save_pretrained(tmp_path / 'adapter')
  tokens = random_tokens(2, 16)
  expected = torch_logits(peft_model.eval(), tokens)

  config = e2e_config(tmp_path, model_dir, lora=True)
  config.lora.rank, config.lora.alpha, config.lora.dropout = 4, 8.0, 0.0
  config.lora.targets = ['q_proj', 'v_proj', 'up_proj']
  config.lora.modules_to_save = modules_to_save
  config.lora.init_from = str(tmp_path / 'adapter')
  settings = run_settings(config)
  model_config, folder = model_config_from(settings.model, settings.lora)
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  optimizer, _ = optim.make_optimizer(settings.optim, 10)
  with nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
    state = init_train_state(model_config, optimizer, mesh, mesh_lib.DEFAULT_RULES, base=folder,
                             lora=settings.lora, quant=settings.quant, seed=settings.seed,
                             adapters_from=settings.lora_init_from)
  ours = np.asarray(Llama(model_config).apply(jax.device_get(state.variables()), tokens))
  np.testing.assert_allclose(ours, expected, atol=1e-4)
