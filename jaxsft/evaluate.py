"""Evaluation of a run or a plain HF checkpoint: likelihood metrics over supervised tokens and,
for data with reference answers, generation metrics (exact match, ROUGE-L).

  nll         mean negative log-likelihood per supervised token (nats)
  perplexity  exp(nll)
  accuracy    argmax next-token accuracy over supervised tokens
  exact_match fraction of greedy answers equal to the reference (whitespace-stripped)
  rouge_l     mean ROUGE-L F1 (the `rouge-score` package) of greedy answers vs references
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxsft import generate, hf, train
from jaxsft.config import default_config
from jaxsft.errors import UserError


@dataclasses.dataclass
class Model:
  """What evaluation and generation need: architecture, variables, tokenizer, template."""

  config: Any            # the run's config (data section: template, max_seq_len, ...)
  model_config: Any
  variables: Any
  tokenizer: Any


def from_workdir(workdir: str) -> Model:
  from jaxsft import export  # pylint: disable=import-outside-toplevel
  from jaxsft.data import load_tokenizer  # pylint: disable=import-outside-toplevel
  config, model_config, folder, state, _ = export.load_run(workdir)
  tokenizer = load_tokenizer(config.data.tokenizer or folder or '')
  return Model(config, model_config, state.variables(), tokenizer)


def from_hf(path: str, template: str = 'jinja', max_seq_len: int = 2048,
            dtype: str = 'float32') -> Model:
  """A plain HF checkpoint (no work directory)."""
  from jaxsft.data import load_tokenizer  # pylint: disable=import-outside-toplevel
  config = default_config()
  config.model.path = path
  config.data.template = template
  config.data.max_seq_len = max_seq_len
  model_config, params = hf.load_checkpoint(path, dtype=dtype, config_overrides={
      'dtype': dtype, 'attention_implementation': 'xla'})
  return Model(config, model_config, {'params': params}, load_tokenizer(path))


def likelihood(model: Model, data_file: str, batch_size: int = 8) -> dict[str, float]:
  """nll, perplexity and accuracy over the supervised tokens of every record of `data_file`,
  rendered with the model's template and packed as in training."""
  from jaxsft.data import Pipeline  # pylint: disable=import-outside-toplevel
  data_config = ml_collections.ConfigDict(model.config.data.to_dict())
  data_config.datasets = []  # eval only: the file is read and tokenized once
  data_config.eval_datasets = [{'path': data_file}]
  data_config.eval_size = 0.0
  data_config.streaming = False
  pipeline = Pipeline(data_config, model.tokenizer, batch_size=batch_size * jax.process_count(),
                      process_index=jax.process_index(), process_count=jax.process_count())
  eval_step = jax.jit(train.make_eval_step(model.model_config),
                      compiler_options=train.compiler_options(jax.default_backend()))
  metrics = train.evaluate_loss(eval_step, model.variables, pipeline, None)
  if not metrics:
    raise UserError(f'{data_file}: no supervised tokens to evaluate (every record was '
                    'dropped or has no assistant turn).')
  return {'nll': metrics['loss'], 'perplexity': metrics['perplexity'],
          'accuracy': metrics['accuracy'], 'supervised_tokens': metrics['supervised_tokens'],
          'records': pipeline.total_stats().records}


def prompt_ids(model: Model, messages: list[dict[str, str]]) -> list[int]:
  """The rendered prompt (with the assistant header) as token ids."""
  from jaxsft.data.templates import load_template, render  # pylint: disable=import-outside-toplevel
  template = load_template(model.config.data.template, model.tokenizer)
  text, _ = render(messages, template, model.tokenizer, add_generation_prompt=True, spans=False)
  return model.tokenizer(text, add_special_tokens=False)['input_ids']


def stop_ids(model: Model) -> list[int]:
  tokenizer = model.tokenizer
  ids = {tokenizer.eos_token_id}
  for token in ('<|im_end|>', '<|eot_id|>', '<|end|>', '</s>'):
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is not None and token_id != tokenizer.unk_token_id:
      ids.add(token_id)
  return sorted(i for i in ids if i is not None)


def answer(model: Model, conversations: list[list[dict[str, str]]],
           sampling: generate.SamplingConfig | None = None, seed: int = 0) -> list[str]:
  """The model's next assistant turn for each conversation (greedy by default)."""
  sampling = sampling or generate.SamplingConfig()
  prompts = [prompt_ids(model, messages) for messages in conversations]
  outputs = generate.generate(model.model_config, model.variables, prompts, sampling,
                              stop_ids=stop_ids(model), seed=seed)
  return [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]


def generation_metrics(model: Model, data_file: str, limit: int,
                       max_new_tokens: int = 256) -> dict[str, float]:
  """Exact match and ROUGE-L of greedy answers to the first `limit` records' last turn."""
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel

  from jaxsft.data.formats import to_messages  # pylint: disable=import-outside-toplevel
  records = _read_records(data_file)[:limit]
  conversations = [to_messages(r) for r in records]
  prompts = [m[:max(i for i, x in enumerate(m) if x['role'] == 'assistant')]
             for m in conversations]
  references = [m[max(i for i, x in enumerate(m) if x['role'] == 'assistant')]['content'].strip()
                for m in conversations]
  answers = answer(model, prompts, generate.SamplingConfig(max_new_tokens=max_new_tokens))
  scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=False)
  rouge = [scorer.score(ref, out)['rougeL'].fmeasure for ref, out in zip(references, answers)]
  return {'exact_match': float(np.mean([a == r for a, r in zip(answers, references)])),
          'rouge_l': float(np.mean(rouge)), 'generated': len(answers)}


def _read_records(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    text = f.read()
  if path.endswith('.jsonl'):
    return [json.loads(line) for line in text.splitlines() if line.strip()]
  return json.loads(text)
