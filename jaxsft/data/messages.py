"""One chat message as jaxsft and `apply_chat_template` take it, from whatever a record holds.

A message is a dict with `role` and `content` and, where the record has them,
`reasoning_content`, `tool_calls` (OpenAI form: `[{"type": "function", "function": {"name",
"arguments"}}]`, `arguments` as objects), `tool_call_id`, `name` (of a tool result) and
`loss_weight` (0 or 1). This module reads one message (OpenAI style, LLaMA-Factory v1 content
parts), tool calls and tool schemas; `jaxsft.data.formats` reads whole records with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jaxsft.errors import UserError

Message = dict[str, Any]
ROLES = ('system', 'user', 'assistant', 'tool')


class BadRecord(UserError):
  """A record that cannot become a conversation; the message says what is wrong."""


def parse_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
  """One call or a list of calls, as JSON text or objects: `{"name": ..., "arguments": {...}}`
  (`arguments` may be JSON text of an object) or OpenAI's `{"type": "function", "function":
  {...}}` -> OpenAI-form `tool_calls` with `arguments` as objects, as `apply_chat_template`
  takes them."""
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError as error:
      raise BadRecord(f'{where} must be JSON of a call {{"name": ..., "arguments": {{...}}}} or a '
                      f'list of calls; it does not parse ({error.msg} at column {error.colno}): '
                      f'{value[:80]!r}.') from None
  if isinstance(value, list):
    if not value:
      raise BadRecord(f'{where} is an empty list of calls; give at least one call.')
    return [_tool_call(call, f'{where}[{k}]') for k, call in enumerate(value)]
  return [_tool_call(value, where)]


def _tool_call(call: Any, where: str) -> dict[str, Any]:
  out: dict[str, Any] = {'type': 'function'}
  if isinstance(call, Mapping) and call.get('type') == 'function' and 'function' in call:
    if call.get('id') is not None:
      out['id'] = call['id']
    call = call['function']
  if not isinstance(call, Mapping) or not isinstance(call.get('name'), str) or not call['name']:
    raise BadRecord(f'{where} must be a call {{"name": ..., "arguments": {{...}}}}, got '
                    f'{str(call)[:80]!r}.')
  if 'arguments' not in call:
    hint = ' (rename "parameters" to "arguments")' if 'parameters' in call else ''
    raise BadRecord(f'{where}: the call to {call["name"]!r} has no "arguments"{hint}; give '
                    '"arguments": {} for a call without any.')
  arguments = call['arguments']
  if isinstance(arguments, str):
    try:
      arguments = json.loads(arguments)
    except json.JSONDecodeError:
      pass  # reported below, as any other non-object
  if not isinstance(arguments, Mapping):
    raise BadRecord(f'{where}: the arguments of {call["name"]!r} must be an object (or JSON text '
                    f'of one), got {str(call["arguments"])[:60]!r}.')
  out['function'] = {'name': call['name'], 'arguments': dict(arguments)}
  return out


def content_parts(parts: list[Any], where: str) -> dict[str, Any]:
  """A message's content given as parts -> `{'content', 'reasoning_content'?, 'tool_calls'?}`.

  Parts are LLaMA-Factory v1's `{"type": "text" | "reasoning" | "tool_call", "value": ...}`
  (a tool call's value is JSON of a call object) or OpenAI's text parts `{"type": "text",
  "text": ...}`. Text parts are joined, as are reasoning parts; images, audio and video are
  refused (jaxsft trains text-only models)."""
  texts, reasoning, calls = [], [], []
  for j, part in enumerate(parts):
    here = f'{where}[{j}]'
    if not isinstance(part, Mapping):
      raise BadRecord(f'{here} must be a content part {{"type": "text", "value": ...}}, got '
                      f'{str(part)[:80]!r}.')
    # Missing keys may read as None: Arrow gives a list of parts one schema with every key.
    kind = part.get('type') or 'text'
    value = part.get('value')
    if value is None and kind == 'text':
      value = part.get('text')
    if kind in ('text', 'reasoning'):
      if not isinstance(value, str):
        raise BadRecord(f'{here} is a {kind} part whose "value" must be a string, got '
                        f'{str(value)[:60]!r}.')
      (texts if kind == 'text' else reasoning).append(value)
    elif kind == 'tool_call':
      calls += parse_tool_calls(value, f'{here}.value')
    else:
      raise BadRecord(f'{here} is a {kind!r} part; only text is supported in content parts '
                      '(text, reasoning and tool_call; jaxsft trains text-only models).')
  out: dict[str, Any] = {'content': ''.join(texts)}
  if reasoning:
    out['reasoning_content'] = ''.join(reasoning)
  if calls:
    out['tool_calls'] = calls
  return out


def message_loss_weight(message: Mapping[str, Any], where: str) -> int | None:
  """A message's own switch for its loss: `loss_weight` 0 or 1 (LLaMA-Factory v1) or `train`
  true/false; None when it has neither."""
  weight = message.get('loss_weight')
  if weight is not None:
    if isinstance(weight, str) or weight not in (0, 1):
      raise BadRecord(f'{where}.loss_weight must be 0 or 1, got {weight!r}; a message is trained '
                      'on whole or not at all.')
    weight = int(weight)
  train = message.get('train')
  if train is not None:
    if not isinstance(train, bool):
      raise BadRecord(f'{where}.train must be true or false, got {train!r}.')
    if weight is not None and weight != int(train):
      raise BadRecord(f'{where} has loss_weight {weight} and train {train}; keep one of them.')
    weight = int(train)
  return weight


def tool_schema(tool: Any, where: str) -> dict[str, Any]:
  if isinstance(tool, str):  # a list of schemas each given as JSON text
    try:
      tool = json.loads(tool)
    except json.JSONDecodeError:
      pass  # reported below
  if isinstance(tool, Mapping) and tool.get('type') == 'function':
    function = tool.get('function')
    if isinstance(function, Mapping) and isinstance(function.get('name'), str):
      return dict(tool)
  elif isinstance(tool, Mapping) and isinstance(tool.get('name'), str) and tool['name']:
    return {'type': 'function', 'function': dict(tool)}
  raise BadRecord(f'{where} must be a function schema {{"name": ..., "description": ..., '
                  f'"parameters": {{...}}}}, got {str(tool)[:80]!r}.')


def without_nulls(value: Any) -> Any:
  """`value` without null-valued object keys, at any depth. `datasets` may load a column of
  objects as one Arrow struct whose fields are the union over all records, so a key that only
  other records have comes back null; a tool schema or arguments must render as written."""
  if isinstance(value, Mapping):
    return {k: without_nulls(v) for k, v in value.items() if v is not None}
  if isinstance(value, list):
    return [without_nulls(v) for v in value]
  return value


# transformers reads a message's reasoning under any of these names (the first one set).
_REASONING_KEYS = ('reasoning_content', 'reasoning', 'thinking')


def read_message(raw: Any, where: str) -> Message:
  """One OpenAI-style message -> `{'role', 'content', 'reasoning_content'?, 'tool_calls'?,
  'tool_call_id'?, 'name'?, 'loss_weight'?}`. A key is set only when the record gives it a value:
  templates test for keys (LLaMA-3.1 renders any message with a 'tool_calls' key as a call), and
  `datasets` fills a key that only other records have with null."""
  if not isinstance(raw, Mapping) or raw.get('role') is None or \
      (raw.get('content') is None and not raw.get('tool_calls')):
    raise BadRecord(f'{where} must be an object with "role" and "content" (or "tool_calls"), '
                    f'got {str(raw)[:80]!r}.')
  role = raw['role']
  if role not in ROLES:
    raise BadRecord(f'{where} has unknown role {role!r}; known: {ROLES}.')
  content = raw.get('content')
  parts = (content_parts(content, f'{where}.content') if isinstance(content, list) else
           {'content': '' if content is None else content})
  if not isinstance(parts['content'], str):
    raise BadRecord(f'{where}.content must be a string or a list of content parts, got '
                    f'{type(content).__name__}.')
  message: Message = {'role': role, **parts}
  reasoning = next((raw[k] for k in _REASONING_KEYS if raw.get(k) is not None), None)
  if reasoning is not None:
    if not isinstance(reasoning, str):
      raise BadRecord(f'{where}: its reasoning must be a string, got {str(reasoning)[:60]!r}.')
    message['reasoning_content'] = message.get('reasoning_content', '') + reasoning
  if raw.get('tool_calls'):
    calls = raw['tool_calls']
    message['tool_calls'] = message.get('tool_calls', []) + parse_tool_calls(
        calls if isinstance(calls, str) else without_nulls(calls), f'{where}.tool_calls')
  extra = [k for k in ('reasoning_content', 'tool_calls') if k in message]
  if extra and role != 'assistant':
    raise BadRecord(f'{where} is a {role} message; only assistant messages carry {extra[0]!r}.')
  for key in ('tool_call_id', 'name'):
    if raw.get(key) is not None:
      if not isinstance(raw[key], str):
        raise BadRecord(f'{where}.{key} must be a string, got {str(raw[key])[:60]!r}.')
      message[key] = raw[key]
  weight = message_loss_weight(raw, where)
  if raw.get('weight') is not None:  # OpenAI's fine-tuning format: "weight": 0 or 1
    openai = message_loss_weight({'loss_weight': raw['weight']}, f'{where} (weight)')
    if weight is not None and weight != openai:
      raise BadRecord(f'{where} has weight {raw["weight"]} and loss_weight {weight}; keep one.')
    weight = openai
  if weight is not None:
    message['loss_weight'] = weight
  return message
