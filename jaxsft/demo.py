"""The no-download demo: synthetic instruction tasks, a character tokenizer, a tiny LLaMA.

`configs/demo.py` turns this on. Before training, `prepare` writes into `workdir/demo/`:
  tokenizer/    a character-level fast tokenizer with ChatML special tokens
  train.jsonl   multi-turn conversations (OpenAI `messages`) of tasks with exact answers:
                addition, reversing, upper-casing and repeating words, unit conversion
  eval.jsonl    held-out single-turn prompts
and points the config's data and model at them. `report` measures exact-match accuracy on the
held-out prompts with greedy decoding before and after training. `DemoCallback` does both
inside a run (`jaxsft train` passes it when `demo.enabled`).
"""

from __future__ import annotations

import json
import os
import random
import string
from typing import Any

import jax
import numpy as np

from jaxsft.eval.generate import SamplingConfig
from jaxsft.eval.model import Model, answer
from jaxsft.train.callbacks import Callback, RunContext

SPECIAL_TOKENS = ['<pad>', '<unk>', '<s>', '<|im_start|>', '<|im_end|>']
_LETTERS = 'abcdefghijklmnopqrstuvwxyz'
_UNITS = (('km', 'm', '000'), ('m', 'cm', '00'), ('kg', 'g', '000'))


def make_task(rng: random.Random) -> tuple[str, str]:
  """One (question, exact answer) pair. Words are random 4-letter strings and numbers random,
  so nearly every held-out question is new and only a learned rule answers it."""
  kind = rng.randrange(5)
  word = ''.join(rng.choice(_LETTERS) for _ in range(4))
  if kind == 0:
    return f'upper {word}', word.upper()
  if kind == 1:
    return f'twice {word}', f'{word} {word}'
  if kind == 2:
    return f'reverse {word}', word[::-1]
  if kind == 3:
    return f'next {word}', ''.join(_LETTERS[(_LETTERS.index(c) + 1) % 26] for c in word)
  big, small, zeros = rng.choice(_UNITS)
  n = rng.randrange(10, 100)
  return f'{big} to {small}: {n}', f'{n}{zeros} {small}'


def make_conversations(count: int, seed: int, turns: tuple[int, int] = (2, 4)
                       ) -> list[dict[str, Any]]:
  rng = random.Random(seed)
  records = []
  for _ in range(count):
    messages = []
    for _ in range(rng.randint(*turns)):
      question, answer = make_task(rng)
      messages += [{'role': 'user', 'content': question},
                   {'role': 'assistant', 'content': answer}]
    records.append({'messages': messages})
  return records


def build_tokenizer(folder: str) -> Any:
  """A character-level `PreTrainedTokenizerFast` (every printable ASCII character and newline
  is one token) with ChatML special tokens; `<|im_end|>` is its EOS."""
  # pylint: disable=import-outside-toplevel
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  characters = sorted(set(string.printable) - set('\t\r\x0b\x0c'))
  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
  backend = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  backend.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')
  backend.decoder = decoders.Fuse()
  tokenizer = PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token='<s>', eos_token='<|im_end|>', pad_token='<pad>',
      unk_token='<unk>', additional_special_tokens=['<|im_start|>'])
  tokenizer.save_pretrained(folder)
  return tokenizer


def prepare(config: Any, workdir: str) -> None:
  """Writes the demo's tokenizer and data and points `config` at them."""
  folder = os.path.join(workdir, 'demo')
  os.makedirs(folder, exist_ok=True)
  tokenizer = build_tokenizer(os.path.join(folder, 'tokenizer'))
  splits = {'train': make_conversations(config.demo.num_train, seed=1),
            'eval': make_conversations(config.demo.num_eval, seed=2, turns=(1, 1))}
  train_questions = {m['content'] for r in splits['train'] for m in r['messages']
                     if m['role'] == 'user'}
  splits['eval'] = [r for r in splits['eval'] if r['messages'][0]['content']
                    not in train_questions]  # held out: no eval question was trained on
  for name, records in splits.items():
    with open(os.path.join(folder, f'{name}.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)
  config.data.datasets = [{'path': os.path.join(folder, 'train.jsonl')}]
  config.data.eval_datasets = [{'path': os.path.join(folder, 'eval.jsonl')}]
  config.data.tokenizer = os.path.join(folder, 'tokenizer')
  architecture = dict(config.model.architecture)
  architecture.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  config.model.architecture = architecture


def report(config: Any, state: Any, model_config: Any, tokenizer: Any, workdir: str,
           when: str) -> dict[str, Any]:
  """Exact-match accuracy of greedy answers (KV-cache decoding, `jaxsft.eval.model.answer`)
  on the held-out prompts, printed and returned."""
  with open(os.path.join(workdir, 'demo', 'eval.jsonl')) as f:
    records = [json.loads(line) for line in f]
  model = Model(model_config, jax.device_get(state.variables()), tokenizer, config.data.template)
  generated = answer(model, [r['messages'][:-1] for r in records],
                     SamplingConfig(max_new_tokens=16))
  answers = [r['messages'][-1]['content'] for r in records]
  correct = [g == a for g, a in zip(generated, answers)]
  accuracy = float(np.mean(correct))
  print(f'demo: held-out exact match {when} training: {accuracy:.1%} '
        f'({sum(correct)}/{len(correct)})', flush=True)
  for record, g, a in list(zip(records, generated, answers))[:config.demo.show_examples]:
    print(f'  {record["messages"][0]["content"]!r:20s} -> {g!r:16s} (expected {a!r})',
          flush=True)
  return {'exact_match': accuracy, 'examples': len(correct)}


class DemoCallback(Callback):
  """The demo inside a run: its data and tokenizer written before the model is built, the
  held-out exact match measured before the first step and after the last."""

  name = 'demo'

  def __init__(self) -> None:
    self._before: dict[str, Any] | None = None

  def setup(self, config: Any, workdir: str) -> None:
    prepare(config, workdir)

  def start(self, run: RunContext, state: Any) -> None:
    self._before = report(run.config, state, run.model_config, run.tokenizer, run.workdir,
                          'before')

  def end(self, run: RunContext, state: Any) -> dict[str, Any]:
    after = report(run.config, state, run.model_config, run.tokenizer, run.workdir, 'after')
    return {'before': self._before, 'after': after}
