"""ShareGPT with tools: function_call turns become assistant `tool_calls` (arguments as objects),
observation turns become `tool` messages, the `tools` column becomes OpenAI-form schemas; custom
role tags, LLaMA-Factory v1 content parts and per-turn loss weights; bad input says what."""

import json

import pytest

from jaxsft.data import BadRecord, to_messages
from jaxsft.data.formats import sharegpt_tools
from jaxsft.data.messages import content_parts
from jaxsft.data.spec import dataset_spec
from jaxsft.errors import UserError

from conftest import shared_data


def call(name, arguments=None):
  return {'type': 'function', 'function': {'name': name, 'arguments': arguments or {}}}


def test_glaive_demo_reads_calls_results_and_tools():
  """Every record of LLaMA-Factory's glaive demo: each function_call turn is an assistant call
  whose arguments equal the turn's JSON, each observation answers the call before it."""
  with open(shared_data('instructions/glaive_toolcall_zh_demo.json')) as f:
    records = json.load(f)
  calls = unanswered = 0
  for record in records:
    messages = to_messages(record)
    turns = record['conversations']
    assert len(messages) == len(turns)
    for i, (turn, message) in enumerate(zip(turns, messages)):
      if turn['from'] == 'function_call':
        expected = json.loads(turn['value'])
        assert message == {'role': 'assistant', 'content': '',
                           'tool_calls': [call(expected['name'], expected['arguments'])]}
        calls += 1
      elif turn['from'] == 'observation':
        assert message['role'] == 'tool' and message['content'] == turn['value']
        before = messages[i - 1].get('tool_calls')
        if before:
          assert message['name'] == before[0]['function']['name']
        else:  # 2 records answer a call written as the assistant's text: no call to name
          assert 'name' not in message
          unanswered += 1
      else:
        assert message == {'role': {'human': 'user', 'gpt': 'assistant'}[turn['from']],
                           'content': turn['value']}
    schemas = json.loads(record['tools'])
    assert sharegpt_tools(record, None) == (
        [{'type': 'function', 'function': s} for s in schemas] or None)
  assert (calls, unanswered) == (216, 2)


def test_parallel_calls_thoughts_and_results():
  record = {'system': 'Be brief.', 'conversations': [
      {'from': 'human', 'value': 'Weather in Paris and Rome?'},
      {'from': 'function_call', 'value': '<think>\nTwo cities.\n</think>' + json.dumps(
          [{'name': 'weather', 'arguments': {'city': 'Paris'}},
           {'name': 'weather_v2', 'arguments': '{"city": "Rome"}'}])},
      # LLaMA-Factory joins the results of several calls into one observation so.
      {'from': 'observation', 'value': 'sunny\n</tool_response>\n<tool_response>\nrain'},
      {'from': 'gpt', 'value': 'Paris sunny, Rome rain.'},
      {'from': 'human', 'value': 'And Oslo, Bern?'},
      {'from': 'function_call', 'value': json.dumps(
          [{'type': 'function', 'function': {'name': 'weather', 'arguments': {'city': 'Oslo'}}},
           {'name': 'weather', 'arguments': {'city': 'Bern'}}])},
      {'from': 'observation', 'value': 'snow'},  # one result per turn
      {'from': 'observation', 'value': 'fog'},
      {'from': 'gpt', 'value': 'Snow and fog.'}]}
  messages = to_messages(record, 'sharegpt')
  assert messages[:5] == [
      {'role': 'system', 'content': 'Be brief.'},
      {'role': 'user', 'content': 'Weather in Paris and Rome?'},
      {'role': 'assistant', 'content': '', 'reasoning_content': 'Two cities.',
       'tool_calls': [call('weather', {'city': 'Paris'}), call('weather_v2', {'city': 'Rome'})]},
      {'role': 'tool', 'content': 'sunny', 'name': 'weather'},
      {'role': 'tool', 'content': 'rain', 'name': 'weather_v2'}]
  assert messages[7]['tool_calls'] == [call('weather', {'city': 'Oslo'}),
                                       call('weather', {'city': 'Bern'})]
  assert messages[8:10] == [{'role': 'tool', 'content': 'snow', 'name': 'weather'},
                            {'role': 'tool', 'content': 'fog', 'name': 'weather'}]
  # A system turn wins over the system column.
  record['conversations'].insert(0, {'from': 'system', 'value': 'Turn.'})
  assert to_messages(record)[0] == {'role': 'system', 'content': 'Turn.'}


def test_tools_column_forms():
  schema = {'name': 'add', 'parameters': {'type': 'object', 'properties': {}}}
  wrapped = {'type': 'function', 'function': schema}
  for value in (json.dumps([schema]), [schema], [wrapped], json.dumps(schema), [json.dumps(schema)]):
    assert sharegpt_tools({'tools': value}, None) == [wrapped]
  for empty in (None, '', '[]', []):
    assert sharegpt_tools({'tools': empty}, None) is None
  assert sharegpt_tools({}, None) is None
  assert sharegpt_tools({'functions': [schema]}, {'tools': 'functions'}) == [wrapped]


def test_custom_tags_v1_parts_and_loss_weights():
  """Role and content keys and role names from `columns` (LLaMA-Factory's tags), LLaMA-Factory
  v1 content parts and per-message loss weights."""
  columns = {'conversations': 'messages', 'from': 'role', 'value': 'content',
             'user_tag': 'user', 'assistant_tag': 'assistant', 'function_tag': 'call',
             'observation_tag': 'result'}
  record = {'messages': [
      {'role': 'user', 'content': [{'type': 'text', 'value': 'Add '}, {'type': 'text',
                                                                        'value': '2 and 3.'}],
       'loss_weight': 0.0},
      {'role': 'call', 'content': '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
      {'role': 'result', 'content': '5'},
      {'role': 'assistant', 'content': [
          {'type': 'reasoning', 'value': 'Easy.'}, {'type': 'text', 'value': '5'},
          {'type': 'tool_call', 'value': '{"name": "log", "arguments": {}}'}],
       'loss_weight': 1.0}]}
  assert to_messages(record, 'sharegpt', columns) == [
      {'role': 'user', 'content': 'Add 2 and 3.', 'loss_weight': 0},
      {'role': 'assistant', 'content': '', 'tool_calls': [call('add', {'a': 2, 'b': 3})]},
      {'role': 'tool', 'content': '5', 'name': 'add'},
      {'role': 'assistant', 'content': '5', 'reasoning_content': 'Easy.',
       'tool_calls': [call('log')], 'loss_weight': 1}]
  # A tag replaces that kind's default names: 'human' is no longer a user here.
  with pytest.raises(BadRecord, match=r"unknown role 'human'.*user_tag"):
    to_messages({'messages': [{'role': 'human', 'content': 'q'}]}, 'sharegpt', columns)
  assert content_parts([{'type': 'text', 'text': 'a'}, {'type': 'text', 'value': 'b'}],
                       'm') == {'content': 'ab'}


@pytest.mark.parametrize('turn, problem', [
    ({'from': 'function_call', 'value': '{"name": "f", '}, r'value must be JSON of a call'),
    ({'from': 'function_call', 'value': '{"name": "f", "parameters": {}}'},
     r'has no "arguments" \(rename "parameters" to "arguments"\)'),
    ({'from': 'function_call', 'value': '{"name": "f", "arguments": "[1]"}'},
     "arguments of 'f' must be an object"),
    ({'from': 'function_call', 'value': '[]'}, 'empty list of calls'),
    ({'from': 'function_call', 'value': '<think>x</think>'}, 'without a call'),
    ({'from': 'gpt', 'value': 'a', 'loss_weight': 0.5}, r'loss_weight must be 0 or 1'),
    ({'from': 'gpt', 'value': 'a', 'train': 'yes'}, r'train must be true or false'),
    ({'from': 'gpt', 'value': [{'type': 'image_url', 'value': 'x.png'}]}, 'only text'),
    ({'from': 'gpt', 'value': [{'type': 'text', 'value': 3}]}, r'value\[0\] is a text part'),
    ({'from': 'human', 'value': [{'type': 'reasoning', 'value': 'x'}]},
     'only assistant turns hold reasoning'),
    ({'from': 'observation', 'value': None}, 'must be a string or a list of content parts'),
])
def test_bad_turns_say_what_and_where(turn, problem):
  record = {'conversations': [{'from': 'human', 'value': 'q'}, turn,
                              {'from': 'gpt', 'value': 'a'}]}
  with pytest.raises(BadRecord, match=problem) as error:
    to_messages(record, 'sharegpt')
  assert 'conversations[1]' in str(error.value)


@pytest.mark.parametrize('tools, problem', [
    ('[{"name": "f"', 'must be JSON of a list of function schemas'),
    ('[{"description": "no name"}]', r'tools\[0\] must be a function schema'),
    (3, 'must be a list of function schemas'),
])
def test_bad_tools_column(tools, problem):
  with pytest.raises(BadRecord, match=problem):
    sharegpt_tools({'tools': tools}, None)


def test_unknown_column_keys_are_errors():
  with pytest.raises(UserError, match=r"unknown key 'tool' in \"columns\" for format 'sharegpt'. "
                     r"Did you mean 'tools'"):
    dataset_spec({'path': 'a.json', 'format': 'sharegpt', 'columns': {'tool': 'functions'}},
                 'data.datasets[0]')
  with pytest.raises(UserError, match=r"unknown key 'conversations' .* format 'alpaca'"):
    dataset_spec({'path': 'a.json', 'format': 'alpaca', 'columns': {'conversations': 'c'}},
                 'data.datasets[0]')
  with pytest.raises(UserError, match=r"columns\['output'\] must be a field name"):
    dataset_spec({'path': 'a.json', 'columns': {'output': 3}}, 'data.datasets[0]')
  assert dataset_spec({'path': 'a.json', 'columns': {'user_tag': 'USER'}},
                      'd')['columns'] == {'user_tag': 'USER'}  # auto: any format's keys
  with pytest.raises(UserError, match="'user_tag' and 'observation_tag' both name the role 'u'"):
    dataset_spec({'path': 'a.json', 'columns': {'user_tag': 'u', 'observation_tag': 'u'}}, 'd')
