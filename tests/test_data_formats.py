"""Records of every format become messages; malformed records raise errors that say what."""

import json

import pytest

from jaxsft.data import BadRecord, detect_format, to_messages

from conftest import shared_data


def test_alpaca_with_input_system_and_history():
  record = {'instruction': 'Translate.', 'input': 'Bonjour', 'output': 'Hello',
            'system': 'You translate.', 'history': [['Hi', 'Hey!']]}
  assert to_messages(record) == [
      {'role': 'system', 'content': 'You translate.'}, {'role': 'user', 'content': 'Hi'},
      {'role': 'assistant', 'content': 'Hey!'},
      {'role': 'user', 'content': 'Translate.\n\nBonjour'},
      {'role': 'assistant', 'content': 'Hello'}]


def test_sharegpt_roles_including_tools():
  record = {'conversations': [
      {'from': 'system', 'value': 's'}, {'from': 'human', 'value': 'q'},
      {'from': 'function_call', 'value': '{"name": "f", "arguments": {}}'}, {'from': 'observation', 'value': '3'},
      {'from': 'gpt', 'value': 'a'}]}
  assert [m['role'] for m in to_messages(record)] == ['system', 'user', 'assistant', 'tool',
                                                      'assistant']


def test_openai_messages_with_text_parts_and_prompt_completion():
  record = {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'a'},
                                                      {'type': 'text', 'text': 'b'}]},
                         {'role': 'assistant', 'content': 'c'}]}
  assert to_messages(record)[0] == {'role': 'user', 'content': 'ab'}
  assert to_messages({'prompt': 'p', 'completion': 'c'}) == [
      {'role': 'user', 'content': 'p'}, {'role': 'assistant', 'content': 'c'}]
  assert to_messages({'text': 'plain'}) == [{'role': 'text', 'content': 'plain'}]


def test_column_mapping_and_forced_format():
  record = {'question': 'q', 'answer': 'a', 'text': 'ignored'}
  columns = {'instruction': 'question', 'output': 'answer'}
  assert detect_format(record, columns) == 'alpaca'
  assert to_messages(record, 'alpaca', columns)[-1] == {'role': 'assistant', 'content': 'a'}
  assert to_messages(record, 'text') == [{'role': 'text', 'content': 'ignored'}]


@pytest.mark.parametrize('name, fmt', [('alpaca_tiny.json', 'alpaca'),
                                       ('alpaca_en_demo.json', 'alpaca'),
                                       ('identity_alpaca.json', 'alpaca'),
                                       ('sharegpt_tiny.json', 'sharegpt')])
def test_real_files_are_detected(name, fmt):
  with open(shared_data(f'instructions/{name}')) as f:
    records = json.load(f)
  assert {detect_format(r) for r in records} == {fmt}
  assert all(to_messages(r)[-1]['role'] == 'assistant' for r in records)


@pytest.mark.parametrize('record, fmt, problem', [
    ({'instruction': 'x'}, 'alpaca', r"missing field 'output'"),
    ({'instruction': 'x', 'output': 3}, 'alpaca', r"field 'output' must be a string, got int"),
    ({'instruction': 'x', 'output': 'y', 'history': [['a']]}, 'alpaca',
     r'history\[0\] must be a \[user, assistant\] pair'),
    ({'conversations': []}, 'sharegpt', 'the conversation is empty'),
    ({'conversations': 'hi'}, 'sharegpt', "must be a list"),
    ({'conversations': [{'from': 'human', 'value': 'q'}]}, 'sharegpt', 'no assistant turn'),
    ({'conversations': [{'from': 'robot', 'value': 'q'}]}, 'sharegpt', "unknown role 'robot'"),
    ({'conversations': [{'from': 'human'}]}, 'sharegpt', r"conversations\[0\] must be an object"),
    ({'messages': [{'role': 'wizard', 'content': 'x'}]}, 'messages', "unknown role 'wizard'"),
    ({'messages': [{'role': 'user', 'content': [{'type': 'image'}]}]}, 'messages',
     'only text is supported'),
    ({'messages': [{'role': 'user', 'content': 'q'}]}, 'messages', 'no assistant turn'),
    ({'text': ''}, 'text', 'is empty'),
    ({'foo': 1}, 'auto', 'cannot tell the format'),
    (['not', 'a', 'dict'], 'auto', 'must be a JSON object'),
])
def test_malformed_records_say_what_is_wrong(record, fmt, problem):
  with pytest.raises(BadRecord, match=problem):
    to_messages(record, fmt)
