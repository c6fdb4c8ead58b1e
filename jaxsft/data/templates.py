"""Messages -> token ids + loss mask, through chat templates.

Every template is Jinja, rendered by transformers' own chat-template renderer, so token ids equal
`tokenizer.apply_chat_template(messages, tokenize=True)`. The built-in templates (`llama2`,
`llama3`, `chatml`, `qwen3`, `mistral`, `alpaca`) render the text of the official templates and
wrap each assistant turn's output and end-of-turn token in `{% generation %}` markers. The loss
mask comes from the character spans of those markers mapped through the tokenizer's offsets (the
same rule transformers uses for `return_assistant_tokens_mask`), never from tokenizing pieces
separately.

A template without markers (a tokenizer's own, say) gets each assistant turn's span from
renderings of the conversation's prefixes: the turn starts where `messages[:i]` rendered with the
generation prompt ends, and ends where `messages[:i + 1]` ends, less the whitespace the template
emits after the turn (ChatML's newline after `<|im_end|>`). Both prefixes must be the start of
the whole rendered conversation, as text and as token ids; a template that renders earlier turns
differently once later turns exist (Qwen3 dropping earlier reasoning, say) has no such prefixes,
and its records are refused with a `BadRecord` that asks for markers. The reply's text is never
searched for: it may also occur in a user turn or in a system header (a date).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers.utils import chat_template_utils

from jaxsft.data.builtin_templates import BUILTIN_TEMPLATES
from jaxsft.data.formats import BadRecord, Message
from jaxsft.errors import UserError

TRAIN_ON = ('assistant', 'last', 'all')

_GENERATION_MARKER = re.compile(r'\{%-?\s*generation\s*-?%\}')


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  name: str
  source: str  # Jinja text

  @property
  def has_generation_markers(self) -> bool:
    return bool(_GENERATION_MARKER.search(self.source))


def template_kind(spec: str) -> str:
  """What `data.template` names: `'builtin'`, `'tokenizer'` (the tokenizer's own
  `chat_template`) or `'file'` (a `.jinja` path, which must exist). Raises `UserError`
  otherwise; needs no tokenizer, so a config is checked before anything loads."""
  if spec in BUILTIN_TEMPLATES:
    return 'builtin'
  if spec in ('jinja', 'tokenizer'):
    return 'tokenizer'
  if spec.endswith('.jinja') or os.path.isfile(spec):
    if not os.path.isfile(spec):
      raise UserError(f'chat template file {spec!r} does not exist; fix data.template.')
    return 'file'
  raise UserError(f'unknown chat template {spec!r}; use one of {sorted(BUILTIN_TEMPLATES)}, '
                  '"jinja" (the tokenizer\'s own) or a path to a .jinja file.')


def load_template(spec: str, tokenizer: Any = None) -> ChatTemplate:
  """`spec`: a built-in name, `jinja` (the tokenizer's own `chat_template`), or a `.jinja` path."""
  kind = template_kind(spec)
  if kind == 'builtin':
    return ChatTemplate(spec, BUILTIN_TEMPLATES[spec].strip())
  if kind == 'tokenizer':
    source = getattr(tokenizer, 'chat_template', None)
    if not source or not isinstance(source, str):
      raise UserError('template "jinja" uses the tokenizer\'s chat_template, but this tokenizer '
                      f'has none; use one of {sorted(BUILTIN_TEMPLATES)} or a .jinja file.')
    return ChatTemplate('jinja', source)
  with open(spec) as f:
    return ChatTemplate(os.path.basename(spec), f.read())


def template_kwargs(tokenizer: Any) -> dict[str, Any]:
  return dict(getattr(tokenizer, 'special_tokens_map', {}) or {})


def render(messages: Sequence[Message], template: ChatTemplate, tokenizer: Any,
           add_generation_prompt: bool = False, *, spans: bool = True
           ) -> tuple[str, list[tuple[int, int]]]:
  """Renders one conversation. Returns `(text, assistant character spans)`; raises `BadRecord`
  when the template rejects the conversation or (without generation markers) its assistant turns
  cannot be located. `spans=False` (a generation prompt, say) skips locating them for a template
  without markers, so that any conversation the template renders works; the spans are then []."""
  if template.has_generation_markers:
    return _render_many([messages], template, tokenizer, add_generation_prompt)[0]
  if not spans:
    return _render_texts([messages], template, tokenizer, add_generation_prompt)[0], []
  result = _render_by_prefixes([messages], template, tokenizer, 'assistant',
                               add_generation_prompt)[0]
  if isinstance(result, BadRecord):
    raise result
  return result


def _mask_from_spans(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """int8 [tokens]: 1 for every token whose characters overlap a span; `offsets` [tokens, 2]."""
  mask = np.zeros(len(offsets), np.int8)
  if len(offsets):
    for start, end in spans:
      mask[(offsets[:, 1] > start) & (offsets[:, 0] < end)] = 1
  return mask


def render_example(messages: Sequence[Message], template: ChatTemplate, tokenizer: Any,
                   train_on: str = 'assistant') -> tuple[str, list[tuple[int, int]] | None]:
  """The text to tokenize and the character spans to train on (None: every token, plain text
  with BOS/EOS added). Raises `BadRecord` when the template rejects the conversation."""
  result = render_examples([messages], template, tokenizer, train_on)[0]
  if isinstance(result, BadRecord):
    raise result
  return result


def render_examples(conversations: Sequence[Sequence[Message]], template: ChatTemplate,
                    tokenizer: Any, train_on: str = 'assistant'
                    ) -> list[tuple[str, list[tuple[int, int]] | None] | BadRecord]:
  """`render_example` for many conversations; a conversation the template rejects gets its
  `BadRecord` in its place. Chats render in one call (per-call overhead is a third of the
  cost); only a batch that fails renders again one by one to find the culprit."""
  results: list[Any] = [None] * len(conversations)
  chats = []
  for i, messages in enumerate(conversations):
    if messages and messages[0]['role'] == 'text':
      results[i] = (messages[0]['content'], None)
    else:
      chats.append(i)
  if template.has_generation_markers:
    try:
      rendered = _render_many([conversations[i] for i in chats], template, tokenizer)
    except BadRecord:
      rendered = []
      for i in chats:
        try:
          rendered.append(_render_many([conversations[i]], template, tokenizer)[0])
        except BadRecord as error:
          rendered.append(error)
  else:
    rendered = _render_by_prefixes([conversations[i] for i in chats], template, tokenizer,
                                   train_on)
  for i, result in zip(chats, rendered):
    if not isinstance(result, BadRecord):
      text, spans = result
      if train_on == 'last':
        spans = spans[-1:]
      elif train_on == 'all':
        spans = [(0, len(text))]
      result = (text, spans)
    results[i] = result
  return results


def _render_texts(conversations: Sequence[Sequence[Message]], template: ChatTemplate,
                  tokenizer: Any, add_generation_prompt: bool, what: str = 'this conversation'
                  ) -> list[str]:
  """Rendered texts of a template without generation markers, in one renderer call."""
  if not conversations:
    return []
  try:
    texts, _ = chat_template_utils.render_jinja_template(
        conversations=[list(m) for m in conversations], chat_template=template.source,
        add_generation_prompt=add_generation_prompt, **template_kwargs(tokenizer))
  except Exception as error:  # jinja's raise_exception and undefined fields
    raise BadRecord(f'chat template {template.name!r} failed on {what}: {error}') from error
  return texts


def _render_many(conversations: Sequence[Sequence[Message]], template: ChatTemplate,
                 tokenizer: Any, add_generation_prompt: bool = False
                 ) -> list[tuple[str, list[tuple[int, int]]]]:
  """Texts and generation-marker spans of a template with markers, in one renderer call."""
  if not conversations:
    return []
  try:
    texts, indices = chat_template_utils.render_jinja_template(
        conversations=[list(m) for m in conversations], chat_template=template.source,
        return_assistant_tokens_mask=True, add_generation_prompt=add_generation_prompt,
        **template_kwargs(tokenizer))
  except Exception as error:  # jinja's raise_exception and undefined fields
    raise BadRecord(f'chat template {template.name!r} failed on this conversation: '
                    f'{error}') from error
  return [(text, [tuple(span) for span in spans]) for text, spans in zip(texts, indices)]


_ADD_MARKERS = ('add {% generation %} / {% endgeneration %} markers around the assistant output '
                '(its content and end-of-turn token) in the template, and point data.template '
                'at that .jinja file.')


def _render_by_prefixes(conversations: Sequence[Sequence[Message]], template: ChatTemplate,
                        tokenizer: Any, train_on: str, add_generation_prompt: bool = False
                        ) -> list[tuple[str, list[tuple[int, int]]] | BadRecord]:
  """Texts and assistant spans of a template without generation markers, located by rendering
  the conversations' prefixes; `train_on='last'` locates the last turn only, `'all'` none. A
  conversation whose turns cannot be located gets its `BadRecord` in its place. The batch
  renders in three calls; only a batch that fails renders again one by one."""
  turns = []
  for messages in conversations:
    assistant = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
    turns.append([] if train_on == 'all' else assistant[-1:] if train_on == 'last' else assistant)
  try:
    return _locate_turns(conversations, turns, template, tokenizer, add_generation_prompt)
  except BadRecord:
    results: list[Any] = []
    for messages, indices in zip(conversations, turns):
      try:
        results += _locate_turns([messages], [indices], template, tokenizer,
                                 add_generation_prompt)
      except BadRecord as error:
        results.append(error)
    return results


def _locate_turns(conversations: Sequence[Sequence[Message]], turns: Sequence[list[int]],
                  template: ChatTemplate, tokenizer: Any, add_generation_prompt: bool
                  ) -> list[tuple[str, list[tuple[int, int]]] | BadRecord]:
  """`_render_by_prefixes` for one batch; raises `BadRecord` when the template fails on any
  conversation or prefix of the batch."""
  texts = _render_texts(conversations, template, tokenizer, add_generation_prompt)
  where = ('the conversation up to an assistant turn (a template without generation markers is '
           'rendered at each turn to find it; to avoid that, ' + _ADD_MARKERS + ')')
  # For turn i: `messages[:i]` with the generation prompt (where the model starts answering) and
  # `messages[:i + 1]` (through the turn); the latter is the whole text for a final turn.
  keys = [(c, i) for c, indices in enumerate(turns) for i in indices]
  prompts = dict(zip(keys, _render_texts([conversations[c][:i] for c, i in keys], template,
                                         tokenizer, True, where)))
  partial = [(c, i) for c, i in keys if i + 1 < len(conversations[c]) or add_generation_prompt]
  withs = dict(zip(partial, _render_texts([conversations[c][:i + 1] for c, i in partial],
                                          template, tokenizer, False, where)))
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
  # The boundaries must also fall between tokens: each prefix tokenized alone (as
  # `tokenize_rendered` tokenizes the whole) must give the first ids of the whole conversation.
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
                   f'conversation {why}. To fix it, {_ADD_MARKERS}')


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
  for encoding, example_spans in zip(encodings, spans):
    ids = np.asarray(encoding.ids, np.int32)
    if example_spans is None:
      ids = np.asarray(_with_specials(tokenizer, encoding.ids), np.int32)
      mask = np.ones(len(ids), np.int8)
    else:
      mask = _mask_from_spans(np.asarray(encoding.offsets, np.int64).reshape(-1, 2), example_spans)
    examples.append({'input_ids': ids, 'loss_mask': mask})
  return examples


def check_train_on(train_on: str) -> None:
  if train_on not in TRAIN_ON:
    raise UserError(f'train_on={train_on!r}; choose one of {TRAIN_ON}.')


def encode_batch(conversations: Sequence[Sequence[Message]], tokenizer: Any,
                 template: ChatTemplate | str, train_on: str = 'assistant'
                 ) -> list[dict[str, list[int]]]:
  """`encode_messages` for many conversations, tokenized in one batched call."""
  check_train_on(train_on)
  if isinstance(template, str):
    template = load_template(template, tokenizer)
  rendered = render_examples(conversations, template, tokenizer, train_on)
  for result in rendered:
    if isinstance(result, BadRecord):
      raise result
  examples = tokenize_rendered([t for t, _ in rendered], [s for _, s in rendered], tokenizer)
  return [{key: value.tolist() for key, value in example.items()} for example in examples]


def _with_specials(tokenizer: Any, ids: list[int]) -> list[int]:
  bos, eos = getattr(tokenizer, 'bos_token_id', None), getattr(tokenizer, 'eos_token_id', None)
  prefix = [bos] if bos is not None and getattr(tokenizer, 'add_bos_token', True) else []
  return prefix + list(ids) + ([eos] if eos is not None else [])


def encode_messages(messages: Sequence[Message], tokenizer: Any, template: ChatTemplate | str,
                    train_on: str = 'assistant') -> dict[str, list[int]]:
  """Token ids and loss mask (1 = trained) of one conversation, as lists of int."""
  return encode_batch([messages], tokenizer, template, train_on)[0]
