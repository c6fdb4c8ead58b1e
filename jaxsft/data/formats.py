"""Dataset records -> chat messages `[{'role', 'content'}, ...]`.

Formats: `alpaca` (instruction/input/output, optional system and history), `sharegpt`
(conversations of {from, value}, LLaMA-Factory's `function_call` / `observation` turns and
`tools` column included), `messages` (OpenAI style), `prompt_completion`, and `text` (plain
text, every token trained; returned as one message with role `text`). `auto` detects the format
from the record's fields. Column names can be remapped per dataset with `columns`
(`COLUMN_KEYS`; ShareGPT role names too, with LLaMA-Factory's `*_tag` names).

Messages carry `role` and `content` and, where the record has them, `reasoning_content`,
`tool_calls` (OpenAI form, `arguments` as objects), `name` (of a tool result) and `loss_weight`
(0 or 1), as `apply_chat_template` takes them.

Every problem raises `BadRecord` naming the field and how to fix it; the pipeline adds the file
and record index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jaxsft.data.messages import (
  BadRecord,
  Message,
  content_parts,
  message_loss_weight,
  parse_tool_calls,
  read_message,
  tool_schema,
  without_nulls,
)
from jaxsft.errors import UserError, did_you_mean

FORMATS = ('auto', 'alpaca', 'sharegpt', 'messages', 'prompt_completion', 'text')
# The role names of ShareGPT turns, by kind. The `*_tag` keys of a dataset's `columns` replace a
# kind's names (LLaMA-Factory's "tags"): `{'user_tag': 'USER'}` reads `{"from": "USER"}` turns.
SHAREGPT_TAGS = {'user_tag': ('human', 'user'), 'assistant_tag': ('gpt', 'assistant'),
                 'function_tag': ('function_call',), 'observation_tag': ('observation', 'tool'),
                 'system_tag': ('system',)}
# The fields each format reads; a dataset's `columns` may rename exactly these.
COLUMN_KEYS = {
    'alpaca': ('instruction', 'input', 'output', 'system', 'history', 'tools'),
    'sharegpt': ('conversations', 'from', 'value', 'system', 'tools', *SHAREGPT_TAGS),
    'messages': ('messages', 'tools'),
    'prompt_completion': ('prompt', 'completion', 'tools'),
    'text': ('text',),
}


def _column(columns: Mapping[str, str] | None, name: str) -> str:
  return (columns or {}).get(name, name)


def check_columns(format: str, columns: Mapping[str, Any] | None, where: str) -> None:  # pylint: disable=redefined-builtin
  """Raises `UserError` for a `columns` key that `format` does not read (a typo would otherwise
  be ignored and the field silently read under its default name) or a value that is no name."""
  known = sorted({k for keys in COLUMN_KEYS.values() for k in keys} if format == 'auto'
                 else COLUMN_KEYS[format])
  for key, value in (columns or {}).items():
    if key not in known:
      raise UserError(f'{where}: unknown key {key!r} in "columns" for format {format!r}.'
                      f'{did_you_mean(key, known)} Known: {known}.')
    if not isinstance(value, str) or not value:
      raise UserError(f'{where}: columns[{key!r}] must be a field name (a non-empty string), '
                      f'got {value!r}.')
  tags = [tag for tag in SHAREGPT_TAGS if tag in (columns or {})]
  for k, tag in enumerate(tags):
    for other in tags[k + 1:]:
      if columns[tag] == columns[other]:
        raise UserError(f'{where}: columns {tag!r} and {other!r} both name the role '
                        f'{columns[tag]!r}; each kind of turn needs its own name.')


def detect_format(record: Mapping[str, Any], columns: Mapping[str, str] | None = None) -> str:
  """The format a record's fields imply (first match of messages, sharegpt, alpaca,
  prompt_completion, text)."""
  col = lambda name: _column(columns, name)  # noqa: E731
  if col('messages') in record:
    return 'messages'
  if col('conversations') in record:
    return 'sharegpt'
  if col('instruction') in record and col('output') in record:
    return 'alpaca'
  if col('prompt') in record and col('completion') in record:
    return 'prompt_completion'
  if col('text') in record:
    return 'text'
  raise BadRecord(f'cannot tell the format from the fields {sorted(record)}; expected one of '
                  "'messages', 'conversations', 'instruction'+'output', 'prompt'+'completion', "
                  "'text', or set the dataset's format and columns in the config.")


def _text(record: Mapping[str, Any], field: str, *, required: bool = True) -> str | None:
  if field not in record or record[field] is None:
    if required:
      present = sorted(k for k, v in record.items() if v is not None)
      raise BadRecord(f'missing field {field!r} (this record has {present}); add it, or map '
                      'another field onto it with the dataset\'s "columns".')
    return None
  value = record[field]
  if not isinstance(value, str):
    raise BadRecord(f'field {field!r} must be a string, got {type(value).__name__}: '
                    f'{str(value)[:60]!r}.')
  return value


def _alpaca(record, columns) -> list[Message]:
  col = lambda name: _column(columns, name)  # noqa: E731
  instruction = _text(record, col('instruction'))
  extra_input = _text(record, col('input'), required=False)
  output = _text(record, col('output'))
  system = _text(record, col('system'), required=False)
  history = record.get(col('history')) or []
  messages = [{'role': 'system', 'content': system}] if system else []
  if not isinstance(history, list):
    raise BadRecord(f'field {col("history")!r} must be a list of [user, assistant] pairs.')
  for turn, pair in enumerate(history):
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or
        not all(isinstance(x, str) for x in pair)):
      raise BadRecord(f'{col("history")}[{turn}] must be a [user, assistant] pair of strings, '
                      f'got {str(pair)[:60]!r}.')
    messages += [{'role': 'user', 'content': pair[0]}, {'role': 'assistant', 'content': pair[1]}]
  prompt = f'{instruction}\n\n{extra_input}' if extra_input else instruction
  return messages + [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': output}]


_TAG_KINDS = {'user_tag': 'user', 'assistant_tag': 'assistant', 'function_tag': 'function_call',
              'observation_tag': 'tool', 'system_tag': 'system'}
# How LLaMA-Factory joins the results of several calls into one observation (its OpenAI reader
# writes them so, its Qwen template wraps the whole in one more <tool_response> block).
_TOOL_RESPONSE_SEPARATOR = '\n</tool_response>\n<tool_response>\n'


def _sharegpt_roles(columns: Mapping[str, str] | None) -> dict[str, str]:
  """Role name -> kind (user, assistant, function_call, tool, system); `*_tag` keys of
  `columns` replace a kind's default names."""
  columns = columns or {}
  roles = {name: _TAG_KINDS[tag] for tag, names in SHAREGPT_TAGS.items() if tag not in columns
           for name in names}
  roles.update({columns[tag]: _TAG_KINDS[tag] for tag in SHAREGPT_TAGS if tag in columns})
  return roles


def _sharegpt(record, columns) -> list[Message]:
  """ShareGPT turns -> messages. A `function_call` turn (JSON of one call or a list of calls,
  optionally after a `<think>` block) becomes an assistant message with `tool_calls`; an
  `observation` turn becomes `tool` messages named after the calls they answer."""
  field = _column(columns, 'conversations')
  turns = record[field]
  if not isinstance(turns, list):
    raise BadRecord(f'field {field!r} must be a list of {{"from", "value"}} turns, got '
                    f'{type(turns).__name__}.')
  role_key, content_key = _column(columns, 'from'), _column(columns, 'value')
  roles = _sharegpt_roles(columns)
  messages: list[Message] = []
  pending: list[str] = []  # names of the calls whose results have not been seen yet
  for i, turn in enumerate(turns):
    where = f'{field}[{i}]'
    if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
      raise BadRecord(f'{where} must be an object with {role_key!r} and {content_key!r}, '
                      f'got {str(turn)[:80]!r}.')
    kind = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
    if kind is None:
      raise BadRecord(f'{where} has unknown role {turn[role_key]!r}; known: {sorted(roles)} '
                      '(name other roles with the user_tag, assistant_tag, function_tag, '
                      'observation_tag and system_tag keys of the dataset\'s "columns").')
    parts = _turn_content(turn[content_key], f'{where}.{content_key}')
    if kind == 'function_call':
      new = [_function_call(parts, f'{where}.{content_key}')]
      pending = [call['function']['name'] for call in new[0]['tool_calls']]
    elif kind == 'tool':
      new, pending = _observations(parts, pending, f'{where}.{content_key}')
    else:
      if kind != 'assistant' and len(parts) > 1:
        raise BadRecord(f'{where} is a {kind} turn; only assistant turns hold reasoning or tool '
                        'calls.')
      new = [{'role': kind, **parts}]
      pending = [call['function']['name'] for call in parts.get('tool_calls', [])]
    weight = message_loss_weight(turn, where)
    if weight is not None:
      for message in new:
        message['loss_weight'] = weight
    messages += new
  system = _text(record, _column(columns, 'system'), required=False)
  if system and not (messages and messages[0]['role'] == 'system'):  # a system turn wins
    messages.insert(0, {'role': 'system', 'content': system})
  return messages


def _turn_content(value: Any, where: str) -> dict[str, Any]:
  if isinstance(value, str):
    return {'content': value}
  if isinstance(value, list):
    return content_parts(value, where)
  raise BadRecord(f'{where} must be a string or a list of content parts, got '
                  f'{type(value).__name__}: {str(value)[:60]!r}.')


def _function_call(parts: dict[str, Any], where: str) -> Message:
  """A function-call turn -> an assistant message with `tool_calls` and no text."""
  message: Message = {'role': 'assistant', 'content': ''}
  reasoning, text = parts.get('reasoning_content'), parts['content']
  if 'tool_calls' in parts:  # content parts that name their calls; the text stays text
    message['content'] = text
    calls = parts['tool_calls']
  else:
    stripped = text.lstrip()
    if stripped.startswith('<think>') and '</think>' in stripped:  # a thought before the call
      thought, text = stripped[len('<think>'):].split('</think>', 1)
      reasoning = (reasoning or '') + thought.strip('\n')
    if not text.strip():
      raise BadRecord(f'{where} is a function call turn without a call; its value must be JSON '
                      'of a call {"name": ..., "arguments": {...}} or a list of calls.')
    calls = parse_tool_calls(text, where)
  if reasoning:
    message['reasoning_content'] = reasoning
  message['tool_calls'] = calls
  return message


def _observations(parts: dict[str, Any], pending: list[str], where: str
                  ) -> tuple[list[Message], list[str]]:
  """An observation turn -> `tool` messages, and the calls still unanswered after it. The
  results of n > 1 calls either come one turn each, or in one turn joined as LLaMA-Factory joins
  them (`\\n</tool_response>\\n<tool_response>\\n`): then one message per call."""
  if len(parts) > 1:
    raise BadRecord(f'{where} is an observation (tool result); it holds text only.')
  content = parts['content']
  results = content.split(_TOOL_RESPONSE_SEPARATOR) if len(pending) > 1 else [content]
  if len(results) != len(pending) or not pending:
    results = [content]
  messages = []
  for k, result in enumerate(results):
    message: Message = {'role': 'tool', 'content': result}
    if k < len(pending):
      message['name'] = pending[k]
    messages.append(message)
  return messages, pending[len(results):]


def sharegpt_tools(record: Mapping[str, Any], columns: Mapping[str, str] | None
                   ) -> list[dict[str, Any]] | None:
  """The record's `tools` column (JSON text of a list of function schemas, as in glaive, or the
  list itself) in OpenAI form `[{"type": "function", "function": schema}]`, as
  `apply_chat_template(tools=...)` takes it; None when the record has none (an empty list too:
  LLaMA-Factory then writes no tool prompt, while some templates would write an empty one)."""
  field = _column(columns, 'tools')
  value = record.get(field)
  if isinstance(value, str):
    if not value.strip():
      return None
    try:
      value = json.loads(value)
    except json.JSONDecodeError as error:
      raise BadRecord(f'field {field!r} must be JSON of a list of function schemas; it does not '
                      f'parse ({error.msg} at column {error.colno}): {value[:80]!r}.') from None
  if value is None:
    return None
  if isinstance(value, Mapping):
    value = [value]
  if not isinstance(value, list):
    raise BadRecord(f'field {field!r} must be a list of function schemas (or JSON of one), got '
                    f'{type(value).__name__}.')
  return [tool_schema(tool, f'{field}[{k}]') for k, tool in enumerate(value)] or None


def _messages(record, columns, field=None) -> list[Message]:
  field = field or _column(columns, 'messages')
  raw = record[field]
  if not isinstance(raw, list):
    raise BadRecord(f'field {field!r} must be a list of {{"role", "content"}} messages, got '
                    f'{type(raw).__name__}.')
  return [read_message(message, f'{field}[{i}]') for i, message in enumerate(raw)]


def _prompt_completion(record, columns) -> list[Message]:
  parts = []
  for name, role in (('prompt', 'user'), ('completion', 'assistant')):
    field = _column(columns, name)
    value = record.get(field)
    if isinstance(value, list):  # conversational prompt/completion
      parts += _messages(record, columns, field)
    else:
      parts.append({'role': role, 'content': _text(record, field)})
  return parts


def _plain_text(record, columns) -> list[Message]:
  text = _text(record, _column(columns, 'text'))
  if not text:
    raise BadRecord(f'field {_column(columns, "text")!r} is empty.')
  return [{'role': 'text', 'content': text}]


_PARSERS = {'alpaca': _alpaca, 'sharegpt': _sharegpt, 'messages': _messages,
            'prompt_completion': _prompt_completion, 'text': _plain_text}


def validate_conversation(messages: list[Message]) -> None:
  """Raises `BadRecord` for conversations a chat template cannot train on."""
  if not messages:
    raise BadRecord('the conversation is empty.')
  if messages[0]['role'] == 'text':
    return
  if not any(m['role'] == 'assistant' for m in messages):
    raise BadRecord(f'the conversation has no assistant turn (roles: '
                    f'{[m["role"] for m in messages]}); nothing would be trained.')


def to_messages(record: Mapping[str, Any], format: str = 'auto',  # pylint: disable=redefined-builtin
                columns: Mapping[str, str] | None = None) -> list[Message]:
  """Converts one record to messages (dicts with `role` system/user/assistant/tool and
  `content`, plus `tool_calls` or `reasoning_content` where the record has them), or one `text`
  message for plain text. `format`: 'auto' (`detect_format`) or one of `FORMATS`; `columns`
  renames the fields it reads. Raises `BadRecord` for a record that is not a trainable
  conversation."""
  if not isinstance(record, Mapping):
    raise BadRecord(f'a record must be a JSON object, got {type(record).__name__}.')
  if format not in FORMATS:
    raise UserError(f'unknown data format {format!r}; choose one of {FORMATS}.')
  if format == 'auto':
    format = detect_format(record, columns)
  for name in {'alpaca': ('instruction', 'output'), 'sharegpt': ('conversations',),
               'messages': ('messages',), 'prompt_completion': ('prompt', 'completion'),
               'text': ('text',)}[format]:
    if _column(columns, name) not in record:
      raise BadRecord(f'missing field {_column(columns, name)!r} required by format {format!r} '
                      f'(fields present: {sorted(record)}).')
  messages = _PARSERS[format](record, columns)
  validate_conversation(messages)
  return messages


def to_tools(record: Mapping[str, Any], format: str = 'auto',  # pylint: disable=redefined-builtin
             columns: Mapping[str, str] | None = None) -> list[dict[str, Any]] | None:
  """The record's tools in OpenAI form (`[{'type': 'function', 'function': schema}]`, what
  `apply_chat_template(tools=...)` takes); None when it has none. ShareGPT records keep them in
  LLaMA-Factory's `tools` column; `messages` and the other chat formats in a `tools` field (a list
  of OpenAI tools or function schemas, or JSON text of one), as OpenAI's fine-tuning format."""
  if format == 'auto':
    format = detect_format(record, columns)
  if format == 'text':
    return None
  if format == 'sharegpt':
    return sharegpt_tools(record, columns)
  field = _column(columns, 'tools')
  value = record.get(field)
  return sharegpt_tools({field: value if isinstance(value, str) else without_nulls(value)},
                        columns)
