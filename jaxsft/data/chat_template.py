"""Chat templates and the one call that renders them.

A template is Jinja text (a built-in of `builtin_templates`, the tokenizer's own `chat_template`,
or a `.jinja` file), rendered by transformers' own renderer with the tokenizer's special tokens,
the record's tools and the conversation, exactly as `tokenizer.apply_chat_template(messages,
tools=tools)` renders it. `templates` builds loss masks on top of this.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from jaxsft.data.builtin_templates import BUILTIN_TEMPLATES
from jaxsft.data.messages import BadRecord, Message
from jaxsft.errors import UserError

Tools = list[dict[str, Any]] | None  # OpenAI-form tools of one conversation

_GENERATION_MARKER = re.compile(r'\{%-?\s*generation\s*-?%\}')
ADD_MARKERS = ('add {% generation %} / {% endgeneration %} markers around the assistant output '
               '(its content and end-of-turn token) in the template, and point data.template '
               'at that .jinja file.')


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  name: str
  source: str  # Jinja text

  @property
  def has_generation_markers(self) -> bool:
    return bool(_GENERATION_MARKER.search(self.source))


class TemplateFailed(BadRecord):
  """The template itself raised on a conversation (its `raise_exception`, an undefined field)."""


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
  """The chat template `spec` names (its name and Jinja text): a built-in name (`llama2`,
  `llama3`, `chatml`, `qwen3`, `mistral`, `alpaca`), `jinja` or `tokenizer` (the tokenizer's
  own `chat_template`, so `tokenizer` is needed only then) or a `.jinja` path. Raises
  `UserError` for anything else."""
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


def render_jinja(conversations: Sequence[Sequence[Message]], template: ChatTemplate,
                 tokenizer: Any, *, tools: Sequence[Tools] | None = None,
                 add_generation_prompt: bool = False, marks: bool = False,
                 what: str = 'this conversation') -> list[tuple[str, list[tuple[int, int]]]]:
  """Rendered texts and, with `marks`, the character spans of `{% generation %}` blocks (else
  []), of conversations with their tools (`tools[i]` for conversation i). One renderer call per
  distinct tool list: the renderer takes one list per call, and conversations without tools
  (most) share one. Raises `TemplateFailed` when the template raises on any of them."""
  if not conversations:
    return []
  # transformers costs about 0.5 s to import; `from jaxsft.data import pack` and a config check
  # must not pay for it (a cached import here costs well under a microsecond per call).
  from transformers.utils import chat_template_utils  # pylint: disable=import-outside-toplevel
  tools = list(tools) if tools is not None else [None] * len(conversations)
  groups: dict[str, list[int]] = {}
  for i, conversation_tools in enumerate(tools):
    key = json.dumps(conversation_tools, sort_keys=True) if conversation_tools else ''
    groups.setdefault(key, []).append(i)
  results: list[Any] = [None] * len(conversations)
  for members in groups.values():
    try:
      texts, indices = chat_template_utils.render_jinja_template(
          conversations=[list(conversations[i]) for i in members], chat_template=template.source,
          tools=tools[members[0]], return_assistant_tokens_mask=marks,
          add_generation_prompt=add_generation_prompt, **template_kwargs(tokenizer))
    except Exception as error:  # jinja's raise_exception and undefined fields
      raise TemplateFailed(f'chat template {template.name!r} failed on {what}: '
                           f'{error}') from error
    for j, i in enumerate(members):
      results[i] = (texts[j], [tuple(span) for span in indices[j]] if marks else [])
  return results
