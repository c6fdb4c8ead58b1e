"""jaxsft as an lm-evaluation-harness backend: `JaxsftLM`, an `lm_eval` `TemplateLM`.

Requests are tokenized by the rules of lm-eval's `hf` backend (the context's trailing spaces
move to the continuation, the context and continuation are encoded together and split, BOS is
added when the tokenizer adds it, an empty context is the prefix token), so the same model gives
the same log-likelihoods through either backend.
  loglikelihood          `eval.scoring`: requests packed into rows, the head only at the
                         continuation, a few compiled shapes per task
  loglikelihood_rolling  lm-eval's disjoint windows of the model's length, scored the same way
  generate_until         the KV-cache decoder (`eval.generate`), greedy, cut at the stop strings
  apply_chat_template    the model's chat template (the one it trained with), for
                         `--apply-chat-template`
The model is a `jaxsft.eval.model.Model`: a run's checkpoint with its LoRA / 4-bit variables
applied as trained, or an HF folder. Every process of a multi-host run computes every request
(rows split over the mesh) and reports itself as one rank, so lm-eval needs no gathering.

Needs the `eval` extra (`pip install -e '.[eval]'`).
"""

from __future__ import annotations

import functools
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from jaxsft.data.templates import load_template, render
from jaxsft.eval.generate import SamplingConfig, generate
from jaxsft.eval.model import Model
from jaxsft.eval.scoring import score_requests

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's `hf` backend default


class JaxsftLM(TemplateLM):
  """An lm-eval model over a `jaxsft.eval.model.Model`."""

  def __init__(self, model: Model, batch_size: int = 8, max_length: int | None = None
               ) -> None:
    super().__init__()
    self.model = model
    self.tokenizer = model.tokenizer
    self.batch_size = int(batch_size)
    self._max_length = int(max_length or model.model_config.max_position_embeddings)
    self._rank, self._world_size = 0, 1

  # ---------------------------------------------------------------- tokenization

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return getattr(self.tokenizer, 'name_or_path', 'jaxsft').replace('/', '__')

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
    """The `hf` backend's encoding: the tokenizer's own special tokens unless told otherwise,
    none when the string already starts with the BOS text."""
    options = {} if add_special_tokens is None else {'add_special_tokens': add_special_tokens}
    if add_special_tokens is None and string.startswith(
        self.tokenizer.decode(self.prefix_token_id)):
      options['add_special_tokens'] = False
    ids = self.tokenizer.encode(string, **options)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  # ---------------------------------------------------------------- scoring

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any
                            ) -> list[tuple[float, bool]]:
    prepared = [(context, continuation) for _, context, continuation in requests]
    with tqdm(total=len(prepared), disable=disable_tqdm, desc='loglikelihood requests') as bar:
      scored = score_requests(self.model.model_config, self.model.variables, prepared,
                              rows_per_call=self.batch_size, max_length=self.max_length,
                              progress=bar)
    return [(s.logprob, s.is_greedy) for s in scored]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for index, (text,) in enumerate(req.args for req in requests):
      for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[owner] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  # ---------------------------------------------------------------- generation

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
    groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
    prompts: list[list[int]] = []
    for index, (context, gen_kwargs) in enumerate(req.args for req in requests):
      gen_kwargs = dict(gen_kwargs)
      if gen_kwargs.get('do_sample') and float(gen_kwargs.get('temperature', 0.0)) > 0:
        raise ValueError('jaxsft benchmark decodes greedily; this task asks for sampling '
                         f'({gen_kwargs}).')
      until = gen_kwargs.get('until') or []
      until = [until] if isinstance(until, str) else list(until)
      if eos_text not in until:
        until.append(eos_text)
      max_gen_toks = int(gen_kwargs.get('max_gen_toks', gen_kwargs.get('max_new_tokens',
                                                                       DEFAULT_MAX_GEN_TOKS)))
      prompts.append(self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks))
      groups.setdefault((max_gen_toks, tuple(until)), []).append(index)
    answers: list[str] = [''] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc='generate_until requests')
    stops = self._eos_ids()
    for (max_gen_toks, until), members in groups.items():
      members = sorted(members, key=lambda i: -len(prompts[i]))
      sampling = SamplingConfig(max_new_tokens=max_gen_toks)
      for start in range(0, len(members), self.batch_size):
        batch = members[start:start + self.batch_size]
        outputs = generate(self.model.model_config, self.model.variables,
                           [prompts[i] for i in batch], sampling, stop_ids=stops)
        for i, ids in zip(batch, outputs):
          text = self.tokenizer.decode(ids, skip_special_tokens=True)
          for stop in until:
            if stop:
              text = text.split(stop)[0]
          answers[i] = text
          self.cache_hook.add_partial('generate_until', requests[i].args, text)
        bar.update(len(batch))
    bar.close()
    return answers

  def _eos_ids(self) -> list[int]:
    """Where the `hf` backend's `generate` stops: the tokenizer's EOS and the model config's
    EOS ids (the text is then cut at the task's stop strings, as there)."""
    eos = self.model.model_config.eos_token_id
    ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])}
    return sorted(i for i in ids if i is not None)

  # ---------------------------------------------------------------- chat

  @functools.cached_property
  def _template(self):
    """The run's template, loaded when a task asks for it (a model without one is fine until
    then) and once: lm-eval renders every request through `apply_chat_template`."""
    return load_template(self.model.template, self.tokenizer)

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The conversation rendered with the model's template (`data.template`), as it trained;
    without the generation prompt the last (assistant) message stays open for prefilling."""
    text, _ = render(chat_history, self._template, self.tokenizer,
                     add_generation_prompt=add_generation_prompt, spans=False)
    if not add_generation_prompt and chat_history and chat_history[-1]['role'] == 'assistant':
      last = chat_history[-1]['content']
      text = text[:text.rindex(last) + len(last)] if last in text else text
    return text

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if chat_template is False or chat_template is None:
      return None
    return self._template.source
