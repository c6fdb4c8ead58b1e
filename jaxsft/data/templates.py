"""Messages -> token ids + loss mask, through chat templates.

Every template is Jinja, rendered by transformers' own chat-template renderer with the record's
tools (`chat_template`), so token ids equal `tokenizer.apply_chat_template(messages, tools=tools,
tokenize=True)`. The built-in templates (`llama2`, `llama3`, `chatml`, `qwen3`, `mistral`,
`alpaca`) render the text of the official templates and wrap each assistant turn's output and
end-of-turn token in `{% generation %}` markers. The loss mask comes from the character spans of
those markers mapped through the tokenizer's offsets (the same rule transformers uses for
`return_assistant_tokens_mask`), never from tokenizing pieces separately. A template without
markers gets its assistant turns from renderings of the conversation's prefixes (`prefixes`).

Which turns are supervised: `train_on` ('assistant' every assistant turn, 'last' the last one,
'all' every token), less the turns a message's `loss_weight` 0 masks; with
`train_on_reasoning=False`, less the think block (`<think>...</think>` and the whitespace after
it) that starts a supervised turn. Records with tools or tool calls need a template that renders
them: a template that fails on them or drops them is refused, never trained on silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxsft.data.builtin_templates import BUILTIN_TEMPLATES, WITHOUT_TOOLS
from jaxsft.data.chat_template import ChatTemplate as ChatTemplate
from jaxsft.data.chat_template import TemplateFailed, Tools, render_jinja
from jaxsft.data.chat_template import load_template as load_template
from jaxsft.data.chat_template import template_kind as template_kind
from jaxsft.data.chat_template import template_kwargs as template_kwargs
from jaxsft.data.messages import BadRecord, Message
from jaxsft.data.prefixes import locate_turns
from jaxsft.errors import UserError

# `ChatTemplate`, `load_template`, `template_kind` and `template_kwargs` live in `chat_template`;
# the `x as x` imports above re-export them to the modules that import them from here.
TRAIN_ON = ('assistant', 'last', 'all')
Rendered = tuple[str, list[tuple[int, int]] | None]  # (text, supervised spans; None: all + BOS/EOS)
_THINK, _END_THINK = '<think>', '</think>'
_TOOL_TEMPLATES = ("data.template='qwen3', a .jinja file of the model's own template (Qwen2.5, "
                   "LLaMA-3.1) or 'jinja' (the tokenizer's own, if it has a tool format)")


def render(messages: Sequence[Message], template: ChatTemplate, tokenizer: Any,
           add_generation_prompt: bool = False, *, spans: bool = True, tools: Tools = None
           ) -> tuple[str, list[tuple[int, int]]]:
  """Renders one conversation. Returns `(text, assistant character spans)`; raises `BadRecord`
  when the template rejects the conversation or (without generation markers) its assistant turns
  cannot be located. `spans=False` (a generation prompt, say) skips locating them for a template
  without markers, so that any conversation the template renders works; the spans are then []."""
  if template.has_generation_markers or not spans:
    return render_jinja([messages], template, tokenizer, tools=[tools],
                        add_generation_prompt=add_generation_prompt,
                        marks=template.has_generation_markers)[0]
  assistant = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
  result = locate_turns([messages], [assistant], template, tokenizer, tools=[tools],
                        add_generation_prompt=add_generation_prompt)[0]
  if isinstance(result, BadRecord):
    raise result
  return result


def check_train_on(train_on: str, train_on_reasoning: bool = True) -> None:
  if train_on not in TRAIN_ON:
    raise UserError(f'train_on={train_on!r}; choose one of {TRAIN_ON}.')
  if not train_on_reasoning and train_on == 'all':
    raise UserError("data.train_on_reasoning=False leaves think blocks of assistant turns "
                    "unsupervised, but train_on='all' trains every token; use train_on "
                    "'assistant' or 'last'.")


def turn_selection(messages: Sequence[Message], train_on: str) -> tuple[list[int], list[int]]:
  """(assistant turns trained, assistant turns masked by their `loss_weight` 0) as message
  indices; under 'last' only the last assistant turn counts."""
  assistant = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
  if train_on == 'last':
    assistant = assistant[-1:]
  trained = [i for i in assistant if messages[i].get('loss_weight', 1)]
  return trained, [i for i in assistant if i not in trained]


def render_example(messages: Sequence[Message], template: ChatTemplate, tokenizer: Any,
                   train_on: str = 'assistant', *, tools: Tools = None,
                   train_on_reasoning: bool = True) -> Rendered:
  """The text to tokenize and the character spans to train on (None: every token, plain text
  with BOS/EOS added). Raises `BadRecord` when the template rejects the conversation."""
  result = render_examples([messages], template, tokenizer, train_on, tools=[tools],
                           train_on_reasoning=train_on_reasoning)[0]
  if isinstance(result, BadRecord):
    raise result
  return result


def render_examples(conversations: Sequence[Sequence[Message]], template: ChatTemplate,
                    tokenizer: Any, train_on: str = 'assistant', *,
                    tools: Sequence[Tools] | None = None, train_on_reasoning: bool = True
                    ) -> list[Rendered | BadRecord]:
  """`render_example` for many conversations (`tools[i]`: conversation i's tools); a
  conversation the template rejects gets its `BadRecord` in its place. Chats render in one call
  per tool list (per-call overhead is a third of the cost); only a batch that fails renders
  again one by one to find the culprit."""
  tools = list(tools) if tools is not None else [None] * len(conversations)
  results: list[Any] = [None] * len(conversations)
  chats = []
  builtin_without_tools = (template.name in WITHOUT_TOOLS and
                           template.source == BUILTIN_TEMPLATES[template.name].strip())
  for i, messages in enumerate(conversations):
    if messages and messages[0]['role'] == 'text':
      results[i] = (messages[0]['content'], None)
    elif builtin_without_tools and _has_tools(messages, tools[i]):
      results[i] = BadRecord(f'chat template {template.name!r} has no tool format, and this '
                             f'record has tools or tool calls; use {_TOOL_TEMPLATES}.')
    else:
      chats.append(i)
  selections = [turn_selection(conversations[i], train_on) for i in chats]
  # The spans needed: the trained turns, or under 'all' the masked ones (cut out of the whole).
  needed = [masked if train_on == 'all' else trained for trained, masked in selections]
  if template.has_generation_markers:
    rendered = _marked([conversations[i] for i in chats], needed, template, tokenizer,
                       [tools[i] for i in chats], train_on)
  else:
    rendered = locate_turns([conversations[i] for i in chats], needed, template, tokenizer,
                            tools=[tools[i] for i in chats])
  for i, result in zip(chats, rendered):
    if not isinstance(result, BadRecord):
      text, spans = result
      if train_on == 'all':
        spans = _complement(spans, len(text))
      if not train_on_reasoning:
        spans = [piece for span in spans for piece in _without_think(text, span)]
      result = _check_tools(conversations[i], tools[i], template, text) or (text, spans)
    elif isinstance(result, TemplateFailed) and (_has_tools(conversations[i], tools[i]) or any(
        m['role'] == 'tool' for m in conversations[i])):
      result = BadRecord(f'{result}. If the template has no tool format (this record has tools, '
                         f'tool calls or tool results), use one that has: {_TOOL_TEMPLATES}.')
    results[i] = result
  return results


def _marked(conversations: Sequence[Sequence[Message]], needed: Sequence[list[int]],
            template: ChatTemplate, tokenizer: Any, tools: list[Tools], train_on: str
            ) -> list[tuple[str, list[tuple[int, int]]] | BadRecord]:
  """Texts and the generation-marker spans of the `needed` assistant turns."""
  try:
    rendered: list[Any] = render_jinja(conversations, template, tokenizer, tools=tools,
                                       marks=True)
  except BadRecord:
    rendered = []
    for messages, conversation_tools in zip(conversations, tools):
      try:
        rendered += render_jinja([messages], template, tokenizer, tools=[conversation_tools],
                                 marks=True)
      except BadRecord as error:
        rendered.append(error)
  results: list[Any] = []
  for messages, indices, result in zip(conversations, needed, rendered):
    if isinstance(result, BadRecord):
      results.append(result)
      continue
    text, spans = result
    assistant = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
    if len(spans) == len(assistant):  # one marked block per assistant turn, in order
      by_turn = dict(zip(assistant, spans))
      results.append((text, [by_turn[i] for i in indices]))
    elif not indices:
      results.append((text, []))
    elif train_on == 'assistant' and len(indices) == len(assistant):
      results.append((text, spans))  # every turn is trained: every marked block is
    elif train_on == 'last':
      results.append((text, spans[-1:]))
    else:
      results.append(BadRecord(
          f'chat template {template.name!r} marks {len(spans)} {{% generation %}} blocks for '
          f'{len(assistant)} assistant turns, so the turns a loss_weight of 0 masks cannot be '
          'told apart; mark each assistant turn in its own block.'))
  return results


def _complement(spans: Sequence[tuple[int, int]], length: int) -> list[tuple[int, int]]:
  """[0, length) less the spans."""
  out, start = [], 0
  for begin, end in sorted(spans):
    if begin > start:
      out.append((start, begin))
    start = max(start, end)
  return out + ([(start, length)] if start < length else [])


def _without_think(text: str, span: tuple[int, int]) -> list[tuple[int, int]]:
  """A supervised span less the think block it starts with (`<think>` through `</think>` and
  the whitespace after it): the template writes it, the model is not trained to."""
  start, end = span
  turn = text[start:end]
  lead = len(turn) - len(turn.lstrip())
  close = turn.find(_END_THINK, lead)
  if not turn.startswith(_THINK, lead) or close < 0:
    return [span]
  after = close + len(_END_THINK)
  after += len(turn[after:]) - len(turn[after:].lstrip())
  return [(a, b) for a, b in ((start, start + lead), (start + after, end)) if b > a]


def _has_tools(messages: Sequence[Message], tools: Tools) -> bool:
  return bool(tools) or any('tool_calls' in m for m in messages)


def _check_tools(messages: Sequence[Message], tools: Tools, template: ChatTemplate,
                 text: str) -> BadRecord | None:
  """A `BadRecord` when the rendered text lacks the name of a tool or of a call: the template
  has no tool format and dropped them (ChatML, LLaMA-3's, Alpaca's)."""
  names = [('tool', t['function']['name']) for t in tools or ()]
  names += [('tool call', c['function']['name']) for m in messages for c in m.get('tool_calls', ())]
  missing = next(((kind, name) for kind, name in names if name not in text), None)
  if missing is None:
    return None
  return BadRecord(f'chat template {template.name!r} has no tool format: it rendered this record '
                   f'without its {missing[0]} {missing[1]!r}. Use a template with one: '
                   f'{_TOOL_TEMPLATES}.')


def _mask_from_spans(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """int8 [tokens]: 1 for every token whose characters overlap a span; `offsets` [tokens, 2]."""
  mask = np.zeros(len(offsets), np.int8)
  if len(offsets):
    for start, end in spans:
      mask[(offsets[:, 1] > start) & (offsets[:, 0] < end)] = 1
  return mask


def tokenize_rendered(texts: Sequence[str], spans: Sequence[list[tuple[int, int]] | None],
                      tokenizer: Any) -> list[dict[str, np.ndarray]]:
  """One batched call of the Rust tokenizer over rendered texts -> `input_ids` (int32) and
  `loss_mask` (int8) arrays, the mask from the spans' character offsets."""
  if not texts:
    return []
  # The backend directly: the transformers wrapper adds per-example Python conversion work
  # that costs as much as the tokenization itself, and gives the same ids and offsets.
  encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
  examples = []
  adds_bos = None  # asked of the tokenizer at the first plain-text record
  for encoding, example_spans in zip(encodings, spans):
    ids = np.asarray(encoding.ids, np.int32)
    if example_spans is None:
      adds_bos = _adds_bos(tokenizer) if adds_bos is None else adds_bos
      ids = np.asarray(_with_specials(tokenizer, encoding.ids, adds_bos), np.int32)
      mask = np.ones(len(ids), np.int8)
    else:
      mask = _mask_from_spans(np.asarray(encoding.offsets, np.int64).reshape(-1, 2), example_spans)
    examples.append({'input_ids': ids, 'loss_mask': mask})
  return examples


def _with_specials(tokenizer: Any, ids: list[int], adds_bos: bool) -> list[int]:
  """Plain text as the tokenizer would encode it on its own (its BOS, if it `adds_bos`), plus
  EOS."""
  bos, eos = getattr(tokenizer, 'bos_token_id', None), getattr(tokenizer, 'eos_token_id', None)
  prefix = [bos] if bos is not None and adds_bos else []
  return prefix + list(ids) + ([eos] if eos is not None else [])


def _adds_bos(tokenizer: Any) -> bool:
  """Whether the tokenizer puts BOS before what it encodes, asked of its output: transformers
  5 reports `add_bos_token=False` for a LLaMA-2 `tokenizer.json` whose post-processor adds it
  (a folder with only `tokenizer.model` says True)."""
  probe = tokenizer('a')['input_ids']
  return bool(probe) and probe[0] == tokenizer.bos_token_id


def encode_batch(conversations: Sequence[Sequence[Message]], tokenizer: Any,
                 template: ChatTemplate | str, train_on: str = 'assistant', *,
                 tools: Sequence[Tools] | None = None, train_on_reasoning: bool = True
                 ) -> list[dict[str, list[int]]]:
  """`encode_messages` for many conversations (`tools[i]`: conversation i's tools), tokenized in
  one batched call: one `{'input_ids', 'loss_mask'}` per conversation, in order, each two lists
  of n_i ints (token ids; 1 = trained, 0 = not). Raises the `BadRecord` of the first
  conversation that cannot be trained on."""
  check_train_on(train_on, train_on_reasoning)
  if isinstance(template, str):
    template = load_template(template, tokenizer)
  rendered = render_examples(conversations, template, tokenizer, train_on, tools=tools,
                             train_on_reasoning=train_on_reasoning)
  for result in rendered:
    if isinstance(result, BadRecord):
      raise result
  examples = tokenize_rendered([t for t, _ in rendered], [s for _, s in rendered], tokenizer)
  return [{key: value.tolist() for key, value in example.items()} for example in examples]


def encode_messages(messages: Sequence[Message], tokenizer: Any, template: ChatTemplate | str,
                    train_on: str = 'assistant', *, tools: Tools = None,
                    train_on_reasoning: bool = True) -> dict[str, list[int]]:
  """`{'input_ids', 'loss_mask'}` of one conversation rendered once: two lists of n ints (n
  tokens; the mask is 1 where the token is trained, 0 elsewhere). The ids equal
  `tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)`. `tools` in OpenAI's
  form, `[{'type': 'function', 'function': {'name', 'description', 'parameters'}}]`. Training
  renders a conversation whose template drops earlier turns' reasoning once per assistant turn
  instead (`samples.encode_samples`)."""
  return encode_batch([messages], tokenizer, template, train_on, tools=[tools],
                      train_on_reasoning=train_on_reasoning)[0]
