"""Dataset records -> chat messages `[{'role', 'content'}, ...]`.

Formats: `alpaca` (instruction/input/output, optional system and history), `sharegpt`
(conversations of {from, value}), `messages` (OpenAI style), `prompt_completion`, and `text`
(plain text, every token trained; returned as one message with role `text`). `auto` detects
the format from the record's fields. Column names can be remapped per dataset with `columns`.

Every problem raises `BadRecord` naming the field and how to fix it; the pipeline adds the file
and record index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxsft.errors import UserError

Message = dict[str, str]
FORMATS = ('auto', 'alpaca', 'sharegpt', 'messages', 'prompt_completion', 'text')
ROLES = ('system', 'user', 'assistant', 'tool')
SHAREGPT_ROLES = {'system': 'system', 'human': 'user', 'user': 'user', 'gpt': 'assistant',
                  'assistant': 'assistant', 'function_call': 'assistant',
                  'observation': 'tool', 'tool': 'tool'}


class BadRecord(UserError):
  """A record that cannot become a conversation; the message says what is wrong."""


def _column(columns: Mapping[str, str] | None, name: str) -> str:
  return (columns or {}).get(name, name)


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


def _sharegpt(record, columns) -> list[Message]:
  field = _column(columns, 'conversations')
  turns = record[field]
  if not isinstance(turns, list):
    raise BadRecord(f'field {field!r} must be a list of {{"from", "value"}} turns, got '
                    f'{type(turns).__name__}.')
  role_key, content_key = _column(columns, 'from'), _column(columns, 'value')
  messages = []
  for i, turn in enumerate(turns):
    if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
      raise BadRecord(f'{field}[{i}] must be an object with {role_key!r} and {content_key!r}, '
                      f'got {str(turn)[:80]!r}.')
    role = SHAREGPT_ROLES.get(turn[role_key])
    if role is None:
      raise BadRecord(f'{field}[{i}] has unknown role {turn[role_key]!r}; known: '
                      f'{sorted(SHAREGPT_ROLES)}.')
    messages.append({'role': role, 'content': _text(turn, content_key)})
  return messages


def _content_text(content: Any, where: str) -> str:
  if isinstance(content, str):
    return content
  if isinstance(content, list):  # OpenAI content parts: keep the text parts, in order
    texts = []
    for j, part in enumerate(content):
      if not isinstance(part, Mapping) or part.get('type', 'text') != 'text' or \
          not isinstance(part.get('text'), str):
        raise BadRecord(f'{where}.content[{j}] must be a text part {{"type": "text", "text": '
                        f'...}}, got {str(part)[:80]!r}; only text is supported.')
      texts.append(part['text'])
    return ''.join(texts)
  raise BadRecord(f'{where}.content must be a string or a list of text parts, got '
                  f'{type(content).__name__}.')


def _messages(record, columns, field=None) -> list[Message]:
  field = field or _column(columns, 'messages')
  raw = record[field]
  if not isinstance(raw, list):
    raise BadRecord(f'field {field!r} must be a list of {{"role", "content"}} messages, got '
                    f'{type(raw).__name__}.')
  messages = []
  for i, message in enumerate(raw):
    where = f'{field}[{i}]'
    if not isinstance(message, Mapping) or 'role' not in message or 'content' not in message:
      raise BadRecord(f'{where} must be an object with "role" and "content", got '
                      f'{str(message)[:80]!r}.')
    if message['role'] not in ROLES:
      raise BadRecord(f'{where} has unknown role {message["role"]!r}; known: {ROLES}.')
    messages.append({'role': message['role'],
                     'content': _content_text(message['content'], where)})
  return messages


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
  """Converts one record to messages with roles system/user/assistant/tool (or one `text`)."""
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
