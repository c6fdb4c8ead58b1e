"""The training samples of a conversation: one, or one per assistant turn.

Qwen3's template drops the reasoning of the assistant turns before the last user query. Rendered
once, a conversation with reasoning in two assistant turns would train turn 1 without its think
block, while the model, answering turn 1, writes one. So when a trained turn with reasoning
renders differently at its own turn (`messages[:i + 1]`, the conversation as it stands when the
model writes the turn) than inside the whole conversation, the conversation becomes one sample per
trained assistant turn: the conversation through that turn, rendered as the template renders it
there, only that turn supervised. This is found by rendering, for any template: nothing is
expanded where the template keeps every turn as it was (reasoning in the last turn only, Qwen3's
multi-step tool calls after the last query, templates that keep all reasoning).

A trained turn whose reasoning the template does not render where the turn is supervised (a
template without a think block, or one that drops reasoning from every turn) is refused rather
than trained without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxsft.data.chat_template import ChatTemplate, Tools, render_jinja
from jaxsft.data.messages import BadRecord, Message
from jaxsft.data.templates import (
  check_train_on,
  load_template,
  render_examples,
  tokenize_rendered,
  turn_selection,
)


@dataclasses.dataclass(frozen=True)
class Sample:
  text: str
  spans: list[tuple[int, int]] | None  # supervised character spans; None: every token
  turns_trained: int  # assistant turns it supervises
  turns_masked: int   # assistant turns a loss_weight of 0 masks (a record's first sample)


def reasoning_text(message: Message) -> str:
  """An assistant turn's reasoning ('' without): its `reasoning_content`, else the think block
  its content starts with (as Qwen3's template reads it)."""
  if message['role'] != 'assistant':
    return ''
  if message.get('reasoning_content', '').strip():
    return message['reasoning_content'].strip()
  content = message['content']
  return content.split('</think>')[0].split('<think>')[-1].strip() if '</think>' in content else ''


def render_samples(conversations: Sequence[Sequence[Message]], template: ChatTemplate,
                   tokenizer: Any, train_on: str = 'assistant', *,
                   tools: Sequence[Tools] | None = None, train_on_reasoning: bool = True
                   ) -> list[list[Sample] | BadRecord]:
  """Each conversation's samples (see the module doc), or its `BadRecord`. Costs one more
  render per trained turn with reasoning that is not the conversation's last message, and a
  render per sample of the conversations that expand."""
  tools = list(tools) if tools is not None else [None] * len(conversations)
  whole = render_examples(conversations, template, tokenizer, train_on, tools=tools,
                          train_on_reasoning=train_on_reasoning)
  selections = [turn_selection(messages, train_on) for messages in conversations]
  keys = [(c, i) for c, (result, (trained, _)) in enumerate(zip(whole, selections))
          if not isinstance(result, BadRecord) and result[1] is not None and train_on != 'all'
          for i in trained if reasoning_text(conversations[c][i])]
  at_turn, failed = _render_at_turns(conversations, keys, template, tokenizer, tools)
  results: list[Any] = list(whole)
  expand: set[int] = set()
  for c, i in keys:
    if isinstance(results[c], BadRecord):
      continue
    text = at_turn.get((c, i), whole[c][0])
    if c in failed:
      results[c] = failed[c]
    elif reasoning_text(conversations[c][i]) not in text:
      number = sum(m['role'] == 'assistant' for m in conversations[c][:i + 1])
      results[c] = BadRecord(
          f'chat template {template.name!r} does not render the reasoning of assistant turn '
          f'{number} (message {i}), so it would be trained without it; use a template with a '
          "think block (data.template='qwen3', or the model's own), or drop the reasoning.")
    elif not whole[c][0].startswith(text):
      expand.add(c)
  parts = [(c, i) for c in sorted(expand) for i in selections[c][0]]
  rendered = render_examples([conversations[c][:i + 1] for c, i in parts], template, tokenizer,
                             'last', tools=[tools[c] for c, _ in parts],
                             train_on_reasoning=train_on_reasoning)
  per_turn: dict[int, list[Any]] = {}
  for (c, _), result in zip(parts, rendered):
    per_turn.setdefault(c, []).append(result)
  for c, result in enumerate(results):
    if isinstance(result, BadRecord):
      continue
    trained, masked = selections[c]
    if c in per_turn:
      error = next((r for r in per_turn[c] if isinstance(r, BadRecord)), None)
      results[c] = error or [Sample(text, spans, 1, len(masked) if k == 0 else 0)
                             for k, (text, spans) in enumerate(per_turn[c])]
    else:
      text, spans = result
      results[c] = [Sample(text, spans, len(trained) if spans is not None else 0, len(masked))]
  return results


def _render_at_turns(conversations: Sequence[Sequence[Message]], keys: list[tuple[int, int]],
                     template: ChatTemplate, tokenizer: Any, tools: list[Tools]
                     ) -> tuple[dict[tuple[int, int], str], dict[int, BadRecord]]:
  """The text of `conversations[c][:i + 1]` for each (c, i) of `keys` whose turn is not the
  last message (that one is the whole text), and the `BadRecord` of each conversation whose
  prefix the template rejects."""
  partial = [(c, i) for c, i in keys if i + 1 < len(conversations[c])]
  texts: dict[tuple[int, int], str] = {}
  failed: dict[int, BadRecord] = {}
  try:
    rendered = render_jinja([conversations[c][:i + 1] for c, i in partial], template, tokenizer,
                            tools=[tools[c] for c, _ in partial])
    texts = {key: text for key, (text, _) in zip(partial, rendered)}
  except BadRecord:
    for c, i in partial:
      try:
        texts[c, i] = render_jinja([conversations[c][:i + 1]], template, tokenizer,
                                   tools=[tools[c]])[0][0]
      except BadRecord as error:
        failed[c] = error
  return texts, failed


def encode_samples(conversations: Sequence[Sequence[Message]], tokenizer: Any,
                   template: ChatTemplate | str, train_on: str = 'assistant', *,
                   tools: Sequence[Tools] | None = None, train_on_reasoning: bool = True
                   ) -> list[list[dict[str, list[int]]]]:
  """Each conversation's training samples, as the pipeline trains them: per conversation a list
  of `{'input_ids', 'loss_mask'}`, each two lists of n ints (as `encode_messages` returns). One
  sample per conversation, or one per trained assistant turn where the template renders a turn
  with reasoning differently once later turns exist (Qwen3). Raises the `BadRecord` of the first
  conversation that cannot be trained on."""
  check_train_on(train_on, train_on_reasoning)
  if isinstance(template, str):
    template = load_template(template, tokenizer)
  results = render_samples(conversations, template, tokenizer, train_on, tools=tools,
                           train_on_reasoning=train_on_reasoning)
  for result in results:
    if isinstance(result, BadRecord):
      raise result
  flat = [sample for samples in results for sample in samples]
  examples = iter(tokenize_rendered([s.text for s in flat], [s.spans for s in flat], tokenizer))
  return [[{k: v.tolist() for k, v in next(examples).items()} for _ in samples]
          for samples in results]
