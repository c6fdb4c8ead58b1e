"""`jaxsft eval` on a work directory and on its merged export give the same NLL, equal to the
NLL torch computes from the HF model with the same template and loss mask; exact match, ROUGE-L
and BLEU are what `rouge-score` and `sacrebleu` give for the answers and the references."""

import json
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
import torch
import transformers
from rouge_score import rouge_scorer
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
  hf_data = default_config().data  # as `jaxsft eval --hf` makes it
  hf_data.template = 'llama2'
  hf_data.max_seq_len = 256
  merged = eval_model.from_hf(str(tmp_path / 'merged'), hf_data)
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
  assert report['generated'] == 2, out.stdout
  # The same greedy answers from `jaxsft generate` (the first two records are single-turn
  # alpaca records without input: their prompt is the instruction alone).
  with open(data) as f:
    first = json.load(f)[:2]
  assert not any(r['input'] for r in first)
  (tmp_path / 'prompts.jsonl').write_text(
      ''.join(json.dumps({'prompt': r['instruction']}) + '\n' for r in first))
  generated = subprocess.run(
      [sys.executable, '-m', 'jaxsft.cli', 'generate', '--workdir', str(tmp_path / 'run'),
       '--prompts', str(tmp_path / 'prompts.jsonl'), '--max-new-tokens', '8'],
      capture_output=True, text=True, check=True).stdout
  lines = [json.loads(line) for line in generated.strip().splitlines()[-2:]]
  assert [line['prompt'] for line in lines] == [r['instruction'] for r in first]
  expected = reference_generation_metrics([line['answer'] for line in lines],
                                          [r['output'] for r in first])
  for key, value in expected.items():
    np.testing.assert_allclose(report[key], value, rtol=1e-9, err_msg=key)


def reference_generation_metrics(answers, references):
  """The report's generation metrics, computed here from the packages' own documented calls:
  the mean over records of ROUGE-L F1 (no stemming) and sacrebleu's corpus BLEU of the answers
  against one reference stream."""
  references = [r.strip() for r in references]
  scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=False)
  return {'exact_match': float(np.mean([a == r for a, r in zip(answers, references)])),
          'rouge_l': float(np.mean([scorer.score(r, a)['rougeL'].fmeasure
                                    for r, a in zip(references, answers)])),
          'bleu': sacrebleu.corpus_bleu(answers, [references]).score}


def test_generation_metrics_equal_rouge_score_and_sacrebleu(tmp_path, monkeypatch):
  """`generation_metrics` scores the answers to the first `limit` records against their last
  assistant turn. With answers under the test's control the three metrics must be exactly those
  of the packages; each wrong definition checked below gives a different number."""
  records = [
      {'instruction': 'What is the capital of France?', 'input': '',
       'output': ' Paris is the capital of France.\n'},
      {'instruction': 'Name the primary colors.', 'input': '',
       'output': 'The three primary colors are red, blue and yellow.'},
      {'instruction': 'Describe the picture.', 'input': 'dogs and fences',
       'output': 'Running dogs jumped over the fences.'},
      {'instruction': 'Add 2 and 3.', 'input': '', 'output': '5'},
  ]
  answers = ['Paris is the capital of France.',
             'The primary colors are red, yellow and blue, as every painter knows.',
             'The dog runs and jumps over a fence.',
             'The answer is 5.']
  data = tmp_path / 'qa.json'
  data.write_text(json.dumps(records))
  asked = []

  def fake_answer(model, conversations, sampling=None, seed=0):
    assert model == 'the model' and sampling.max_new_tokens == 16 and sampling.temperature == 0
    asked.extend(conversations)
    return answers[:len(conversations)]

  monkeypatch.setattr(eval_metrics, 'answer', fake_answer)
  got = eval_metrics.generation_metrics('the model', str(data), limit=3, max_new_tokens=16)

  # The prompts: each record's conversation up to (without) its answer, for the first 3 only.
  assert [c[-1]['role'] for c in asked] == ['user'] * 3
  assert [c[-1]['content'].startswith(r['instruction']) for c, r in zip(asked, records)] == \
      [True] * 3 and 'dogs and fences' in asked[2][-1]['content']
  assert not any(m['role'] == 'assistant' for c in asked for m in c)
  expected = reference_generation_metrics(answers[:3], [r['output'] for r in records[:3]])
  assert got['generated'] == 3
  assert got['exact_match'] == pytest.approx(1 / 3)  # the stripped reference of record 1
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, rel=1e-9), key

  # What a wrong definition would give instead: each differs from the right one by > 0.3%.
  # (ROUGE-L F1 is symmetric: swapped arguments are only visible in BLEU.)
  refs, all_refs = [r['output'].strip() for r in records[:3]], [r['output'].strip()
                                                                for r in records]
  plain = [rouge_scorer.RougeScorer(['rougeL']).score(r, a)['rougeL']
           for r, a in zip(refs, answers[:3])]
  precision, recall = np.mean([x.precision for x in plain]), np.mean([x.recall for x in plain])
  stemmed = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)
  wrong = {
      'rouge_l': [np.mean([stemmed.score(r, a)['rougeL'].fmeasure
                           for r, a in zip(refs, answers[:3])]),
                  2 * precision * recall / (precision + recall),  # F1 of the mean P and R
                  reference_generation_metrics(answers, all_refs)['rouge_l']],  # no limit
      'bleu': [sacrebleu.corpus_bleu(refs, [answers[:3]]).score,  # swapped
               np.mean([sacrebleu.sentence_bleu(a, [r]).score  # mean sentence BLEU
                        for r, a in zip(refs, answers[:3])]),
               sacrebleu.corpus_bleu(answers[:3], [refs], lowercase=True).score,
               reference_generation_metrics(answers, all_refs)['bleu']],  # no limit
  }
  for key, values in wrong.items():
    for value in values:
      assert abs(value - expected[key]) > 3e-3 * expected[key], (key, value, expected[key])
