"""Assistant turns of a template without `{% generation %}` markers, located by rendering the
conversation's prefixes.

Turn i starts where `messages[:i]` rendered with the generation prompt ends (where the model
starts answering) and ends where `messages[:i + 1]` ends, less the whitespace the template emits
after the turn (ChatML's newline after `<|im_end|>`). Both prefixes must be the start of the whole
rendered conversation, as text and as token ids; a template that renders earlier turns
differently once later turns exist (Qwen3 dropping earlier reasoning, say) has no such prefixes,
and its records are refused with a `BadRecord` that asks for markers. The reply's text is never
searched for: it may also occur in a user turn or in a system header (a date).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxsft.data.chat_template import ADD_MARKERS, ChatTemplate, Tools, render_jinja
from jaxsft.data.messages import BadRecord, Message

Located = tuple[str, list[tuple[int, int]]]  # (text, one character span per requested turn)


def locate_turns(conversations: Sequence[Sequence[Message]], turns: Sequence[Sequence[int]],
                 template: ChatTemplate, tokenizer: Any, *, tools: Sequence[Tools] | None = None,
                 add_generation_prompt: bool = False) -> list[Located | BadRecord]:
  """Texts and the spans of the assistant turns `turns[c]` (message indices) of each
  conversation. A conversation whose turns cannot be located gets its `BadRecord` in its place.
  The batch renders in three calls (per tool list); only a batch that fails renders again one by
  one."""
  tools = list(tools) if tools is not None else [None] * len(conversations)
  try:
    return _locate(conversations, turns, template, tokenizer, tools, add_generation_prompt)
  except BadRecord:
    results: list[Any] = []
    for messages, indices, conversation_tools in zip(conversations, turns, tools):
      try:
        results += _locate([messages], [indices], template, tokenizer, [conversation_tools],
                           add_generation_prompt)
      except BadRecord as error:
        results.append(error)
    return results


def _locate(conversations: Sequence[Sequence[Message]], turns: Sequence[Sequence[int]],
            template: ChatTemplate, tokenizer: Any, tools: list[Tools],
            add_generation_prompt: bool) -> list[Located | BadRecord]:
  """`locate_turns` for one batch; raises `BadRecord` when the template fails on any
  conversation or prefix of the batch."""
  texts = [text for text, _ in render_jinja(conversations, template, tokenizer, tools=tools,
                                            add_generation_prompt=add_generation_prompt)]
  where = ('the conversation up to an assistant turn (a template without generation markers is '
           'rendered at each turn to find it; to avoid that, ' + ADD_MARKERS + ')')
  # For turn i: `messages[:i]` with the generation prompt (where the model starts answering) and
  # `messages[:i + 1]` (through the turn); the latter is the whole text for a final turn.
  keys = [(c, i) for c, indices in enumerate(turns) for i in indices]
  prompts = dict(zip(keys, (text for text, _ in render_jinja(
      [conversations[c][:i] for c, i in keys], template, tokenizer,
      tools=[tools[c] for c, _ in keys], add_generation_prompt=True, what=where))))
  partial = [(c, i) for c, i in keys if i + 1 < len(conversations[c]) or add_generation_prompt]
  withs = dict(zip(partial, (text for text, _ in render_jinja(
      [conversations[c][:i + 1] for c, i in partial], template, tokenizer,
      tools=[tools[c] for c, _ in partial], what=where))))
  results: list[Any] = []
  checks: list[list[tuple[int, str, str]]] = []  # per conversation: (message index, prompt, turn)
  for c, (messages, indices) in enumerate(zip(conversations, turns)):
    text, spans, check, error = texts[c], [], [], None
    for i in indices:
      prompt, turn = prompts[c, i], withs.get((c, i), text)
      if not text.startswith(turn):
        error = _cannot_locate(template, messages, i, 'rendered through this turn is not the '
                               'start of the whole rendered conversation: the template renders '
                               'earlier turns differently once later turns exist')
      elif not turn.startswith(prompt):
        error = _cannot_locate(template, messages, i, 'rendered up to this turn with the '
                               'generation prompt is not the start of the turn in the whole '
                               'rendered conversation: the template renders earlier turns '
                               'differently once later turns exist, or its generation prompt is '
                               'not how it starts an assistant turn')
      if error:
        break
      # Whitespace after the turn (ChatML's newline after <|im_end|>) is never generated.
      spans.append((len(prompt), max(len(prompt), len(turn.rstrip()))))
      check.append((i, prompt, turn))
    results.append(error or (text, spans))
    checks.append([] if error else check)
  # The boundaries must also fall between tokens: each prefix tokenized alone (as the whole is
  # tokenized) must give the first ids of the whole conversation.
  needed = list(dict.fromkeys(t for c, check in enumerate(checks) if check
                              for t in (texts[c], *(p for _, *pair in check for p in pair))))
  if not needed:
    return results
  encodings = tokenizer.backend_tokenizer.encode_batch(needed, add_special_tokens=False)
  ids = {t: encoding.ids for t, encoding in zip(needed, encodings)}
  for c, check in enumerate(checks):
    for i, prompt, turn in check:
      whole = ids[texts[c]]
      if any(whole[:len(ids[p])] != ids[p] for p in (prompt, turn)):
        results[c] = _cannot_locate(template, conversations[c], i, 'tokenized up to or through '
                                    'this turn is not the start of the whole conversation\'s '
                                    'tokens: a token spans the boundary of the turn')
        break
  return results


def _cannot_locate(template: ChatTemplate, messages: Sequence[Message], index: int,
                   why: str) -> BadRecord:
  number = sum(m['role'] == 'assistant' for m in messages[:index + 1])
  return BadRecord(f'cannot locate assistant turn {number} (message {index}) to train on: chat '
                   f'template {template.name!r} has no {{% generation %}} markers, and the '
                   f'conversation {why}. To fix it, {ADD_MARKERS}')
