"""`jaxsft eval` on a work directory and on its merged export give the same NLL, equal to the
NLL torch computes from the HF model with the same template and loss mask; generate and eval
CLI smoke tests."""

import json
import subprocess
import sys

import numpy as np
import torch
import transformers
from test_train import e2e_config

from jaxsft.config import default_config
from jaxsft.data import encode_batch, load_tokenizer, to_messages
from jaxsft.eval import metrics as eval_metrics
from jaxsft.eval import model as eval_model
from jaxsft.train import export
from jaxsft.train.run import train

from conftest import shared_data
from hf_reference import make_model


def torch_nll(model_dir, data_file, tokenizer_dir, template, max_tokens):
  tokenizer = load_tokenizer(tokenizer_dir)
  with open(data_file) as f:
    records = json.load(f)
  from jaxsft.data.packing import fit_length
  examples = [fit_length(e, max_tokens) for e in encode_batch(
      [to_messages(r) for r in records], tokenizer, template)]
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                            dtype=torch.float32).eval()
  total, count = 0.0, 0
  with torch.no_grad():
    for e in examples:
      ids = torch.as_tensor([e['input_ids']])
      logits = model(ids[:, :-1]).logits[0].double()
      nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
      mask = torch.as_tensor(e['loss_mask'][1:], dtype=torch.float64)
      total += float((nll * mask).sum())
      count += int(mask.sum())
  return total / count


def test_eval_of_run_and_of_merged_export_equal_torch(tmp_path):
  model_dir = tmp_path / 'model'
  make_model('llama2_mha', vocab_size=32000).save_pretrained(model_dir)
  config = e2e_config(tmp_path, model_dir, lora=True)
  config.train.num_steps = 3
  train(config, str(tmp_path / 'run'))
  export.export_run(str(tmp_path / 'run'), 'merged', str(tmp_path / 'merged'), 'float32')
  data = str(shared_data('instructions/alpaca_tiny.json'))

  run_report = eval_metrics.likelihood(eval_model.from_workdir(str(tmp_path / 'run')), data)
  hf_run = default_config()
  hf_run.model.path = str(tmp_path / 'merged')
  hf_run.data.template = 'llama2'
  hf_run.data.max_seq_len = 256
  merged = eval_model.from_hf(hf_run)
  merged_report = eval_metrics.likelihood(merged, data)
  reference = torch_nll(tmp_path / 'merged', data, str(tmp_path / 'merged'), 'llama2', 257)
  np.testing.assert_allclose(run_report['nll'], merged_report['nll'], rtol=1e-5)
  np.testing.assert_allclose(run_report['nll'], reference, rtol=1e-4)
  assert run_report['records'] == 100

  out = subprocess.run(
      [sys.executable, '-m', 'jaxsft.cli', 'eval', '--workdir', str(tmp_path / 'run'),
       '--data', data, '--generate', '2', '--max-new-tokens', '8',
       '--out', str(tmp_path / 'eval.json')], capture_output=True, text=True, check=True)
  report = json.loads((tmp_path / 'eval.json').read_text())
  np.testing.assert_allclose(report['nll'], run_report['nll'], rtol=1e-5)
  assert 0 <= report['rouge_l'] <= 1 and report['generated'] == 2, out.stdout
  assert 0 <= report['bleu'] <= 100, out.stdout
  answers = subprocess.run(
      [sys.executable, '-m', 'jaxsft.cli', 'generate', '--hf', str(tmp_path / 'merged'),
       '--template', 'llama2', '--prompt', 'Name a fruit.', '--max-new-tokens', '5'],
      capture_output=True, text=True, check=True).stdout
  assert json.loads(answers.strip().splitlines()[-1])['prompt'] == 'Name a fruit.'
