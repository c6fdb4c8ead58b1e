"""Metrics of a model on a data file: likelihood over supervised tokens and, for data with
reference answers, generation metrics.

  nll         mean negative log-likelihood per supervised token (nats)
  perplexity  exp(nll)
  accuracy    argmax next-token accuracy over supervised tokens
  exact_match fraction of greedy answers equal to the reference (whitespace-stripped)
  rouge_l     mean ROUGE-L F1 (the `rouge-score` package) of greedy answers vs references
  bleu        corpus BLEU (sacrebleu, its default 13a tokenization) of the greedy answers
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

from jaxsft.data.formats import to_messages
from jaxsft.data.pipeline import Pipeline
from jaxsft.errors import UserError
from jaxsft.eval.generate import SamplingConfig
from jaxsft.eval.model import Model, answer
from jaxsft.train.step import compiler_options, evaluate_loss, make_eval_step


def likelihood(model: Model, data_file: str, batch_size: int = 8) -> dict[str, float]:
  """nll, perplexity and accuracy over the supervised tokens of every record of `data_file`,
  rendered with the model's template and packed as in training."""
  data_config = ml_collections.ConfigDict(model.data.to_dict())
  data_config.datasets = []  # eval only: the file is read and tokenized once
  data_config.eval_datasets = [{'path': data_file}]
  data_config.eval_size = 0.0
  data_config.streaming = False
  pipeline = Pipeline(data_config, model.tokenizer, batch_size=batch_size * jax.process_count(),
                      process_index=jax.process_index(), process_count=jax.process_count())
  eval_step = jax.jit(make_eval_step(model.model_config, model.loss_chunk_size),
                      compiler_options=compiler_options(jax.default_backend()))
  metrics = evaluate_loss(eval_step, model.variables, pipeline, None)
  if not metrics:
    raise UserError(f'{data_file}: no supervised tokens to evaluate (every record was '
                    'dropped or has no assistant turn).')
  return {'nll': metrics['loss'], 'perplexity': metrics['perplexity'],
          'accuracy': metrics['accuracy'], 'supervised_tokens': metrics['supervised_tokens'],
          'records': pipeline.total_stats().records}


def generation_metrics(model: Model, data_file: str, limit: int,
                       max_new_tokens: int = 256) -> dict[str, float]:
  """Exact match, ROUGE-L and BLEU of greedy answers to the first `limit` records' last
  turn."""
  records = _read_records(data_file)[:limit]
  conversations = [to_messages(r) for r in records]
  prompts = [m[:max(i for i, x in enumerate(m) if x['role'] == 'assistant')]
             for m in conversations]
  references = [m[max(i for i, x in enumerate(m) if x['role'] == 'assistant')]['content'].strip()
                for m in conversations]
  answers = answer(model, prompts, SamplingConfig(max_new_tokens=max_new_tokens))
  scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=False)
  rouge = [scorer.score(ref, out)['rougeL'].fmeasure for ref, out in zip(references, answers)]
  return {'exact_match': float(np.mean([a == r for a, r in zip(answers, references)])),
          'rouge_l': float(np.mean(rouge)),
          'bleu': float(sacrebleu.corpus_bleu(answers, [references]).score),
          'generated': len(answers)}


def _read_records(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    text = f.read()
  if path.endswith('.jsonl'):
    return [json.loads(line) for line in text.splitlines() if line.strip()]
  return json.loads(text)
