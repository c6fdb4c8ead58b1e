"""Chat templates on real data: ids equal `apply_chat_template`, masks equal transformers'
`return_assistant_tokens_mask`, and the supervised tokens decode to the assistant turns."""

import json
import pathlib

import pytest
import transformers

from jaxsft.data import encode_batch, encode_messages, load_template, to_messages
from jaxsft.data.builtin_templates import BUILTIN_TEMPLATES
from jaxsft.data.templates import render

from conftest import llama2_tokenizer, shared_data

EXTRA_SPECIAL_TOKENS = ['<|im_start|>', '<|im_end|>', '<|start_header_id|>',
                        '<|end_header_id|>', '<|eot_id|>']
# Qwen3's tokenizer has these as added tokens that are not special; as single tokens here too,
# the boundaries of the think block and the tool calls fall between tokens as they do in Qwen3.
QWEN3_ADDED_TOKENS = ['<think>', '</think>', '<tool_call>', '</tool_call>', '<tool_response>',
                      '</tool_response>']
END_OF_TURN = {'llama2': ' </s>', 'llama3': '<|eot_id|>', 'chatml': '<|im_end|>',
               'qwen3': '<|im_end|>', 'mistral': '</s>', 'alpaca': '</s>'}
# The chat template of Qwen3's tokenizer_config.json, verbatim: the reference `qwen3` must render.
QWEN3_OFFICIAL = (pathlib.Path(__file__).parent / 'fixtures' / 'qwen3_chat_template.jinja'
                  ).read_text()


@pytest.fixture(scope='module')
def tokenizer():
  tok = transformers.AutoTokenizer.from_pretrained(llama2_tokenizer())
  tok.add_special_tokens({'additional_special_tokens': EXTRA_SPECIAL_TOKENS})
  tok.add_tokens(QWEN3_ADDED_TOKENS)
  return tok


def conversations(name, limit=None):
  with open(shared_data(f'instructions/{name}')) as f:
    records = json.load(f)
  return [to_messages(r) for r in records[:limit]]


def assert_matches_transformers(tokenizer, messages_list, template_source, template_spec):
  encoded = encode_batch(messages_list, tokenizer, template_spec)
  for index, (messages, example) in enumerate(zip(messages_list, encoded)):
    reference = tokenizer.apply_chat_template(
        messages, chat_template=template_source, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True)
    assert example['input_ids'] == reference['input_ids'], index
    assert example['loss_mask'] == reference['assistant_masks'], index
    assert sum(example['loss_mask']) > 0


@pytest.mark.parametrize('template_file', ['qwen2_5_training.jinja', 'llama3_training.jinja'])
@pytest.mark.parametrize('dataset', ['sharegpt_tiny.json', 'alpaca_tiny.json',
                                     'identity_alpaca.json', 'alpaca_en_demo.json'])
def test_jinja_files_match_apply_chat_template(tokenizer, template_file, dataset):
  path = str(shared_data(f'chat_templates/{template_file}'))
  with open(path) as f:
    source = f.read()
  assert_matches_transformers(tokenizer, conversations(dataset), source, path)


def test_tokenizer_own_template():
  tokenizer = transformers.AutoTokenizer.from_pretrained(llama2_tokenizer())
  with open(shared_data('chat_templates/qwen2_5_training.jinja')) as f:
    tokenizer.chat_template = f.read()
  tokenizer.add_special_tokens({'additional_special_tokens': EXTRA_SPECIAL_TOKENS})
  assert load_template('jinja', tokenizer).has_generation_markers
  assert_matches_transformers(tokenizer, conversations('sharegpt_tiny.json'),
                              tokenizer.chat_template, 'jinja')


@pytest.mark.parametrize('template', sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_match_apply_chat_template(tokenizer, template):
  assert_matches_transformers(tokenizer, conversations('alpaca_en_demo.json'),
                              BUILTIN_TEMPLATES[template], template)


def supervised_runs(example):
  """The contiguous runs of supervised token ids."""
  runs, current = [], []
  for token, supervised in zip(example['input_ids'], example['loss_mask']):
    if supervised:
      current.append(token)
    elif current:
      runs.append(current)
      current = []
  return runs + ([current] if current else [])


@pytest.mark.parametrize('template', sorted(BUILTIN_TEMPLATES))
@pytest.mark.parametrize('dataset', ['sharegpt_tiny.json', 'alpaca_tiny.json',
                                     'identity_alpaca.json'])
def test_supervised_tokens_decode_to_assistant_turns(tokenizer, template, dataset):
  """Each supervised run is exactly one assistant turn's content plus its end-of-turn token."""
  trims = template in ('llama2', 'llama3')  # these templates strip the content, as upstream
  for messages in conversations(dataset):
    example = encode_messages(messages, tokenizer, template)
    decoded = [tokenizer.decode(run) for run in supervised_runs(example)]
    expected = [(m['content'].strip() if trims else m['content']) + END_OF_TURN[template]
                for m in messages if m['role'] == 'assistant']
    if template == 'qwen3':
      # Qwen3 renders the final turn (after the last user query) with a think block, empty
      # without reasoning; these datasets have none, and end on an assistant turn.
      assert messages[-1]['role'] == 'assistant'
      expected[-1] = '<think>\n\n</think>\n\n' + expected[-1].lstrip('\n')
    if template == 'mistral':
      # '[/INST]' abuts the content, so SentencePiece may merge its ']' into the content's first
      # token; that token is supervised (it overlaps the content), as transformers does.
      decoded = [d[1:] if d.startswith(']') and not e.startswith(']') else d
                 for d, e in zip(decoded, expected)]
    assert decoded == expected


def test_llama2_text_is_the_official_format(tokenizer):
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
              {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Bye'},
              {'role': 'assistant', 'content': 'Bye!'}]
  text = tokenizer.apply_chat_template(messages, chat_template=BUILTIN_TEMPLATES['llama2'],
                                       tokenize=False)
  assert text == ('<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s>'
                  '<s>[INST] Bye [/INST] Bye! </s>')


def test_alpaca_template_reproduces_the_datasets_own_text(tokenizer):
  with open(shared_data('instructions/alpaca_tiny.json')) as f:
    records = [r for r in json.load(f) if not r['input']]
  assert len(records) > 20
  for record in records:
    text = tokenizer.apply_chat_template(to_messages(record), tokenize=False,
                                         chat_template=BUILTIN_TEMPLATES['alpaca'])
    assert text == tokenizer.bos_token + record['text'] + tokenizer.eos_token


def test_train_on_last_and_all(tokenizer):
  messages = conversations('sharegpt_tiny.json')[0]
  every = encode_messages(messages, tokenizer, 'chatml')
  last = encode_messages(messages, tokenizer, 'chatml', train_on='last')
  everything = encode_messages(messages, tokenizer, 'chatml', train_on='all')
  assert 0 < sum(last['loss_mask']) < sum(every['loss_mask'])
  supervised_last = [t for t, m in zip(last['input_ids'], last['loss_mask']) if m]
  assert tokenizer.decode(supervised_last) == 'I agree.<|im_end|>'
  assert all(everything['loss_mask'])


def test_plain_text_trains_every_token(tokenizer):
  example = encode_messages(to_messages({'text': 'Just some text.'}), tokenizer, 'llama2')
  assert example['input_ids'][0] == tokenizer.bos_token_id
  assert example['input_ids'][-1] == tokenizer.eos_token_id
  assert all(example['loss_mask'])


def test_template_without_generation_markers_masks_content_through_end_of_turn(tokenizer):
  """Without {% generation %} markers (upstream qwen2_5.jinja), each assistant turn is located
  by rendering the conversation's prefixes and supervised through its end-of-turn token."""
  path = str(shared_data('chat_templates/qwen2_5.jinja'))
  assert not load_template(path).has_generation_markers
  for messages in conversations('sharegpt_tiny.json') + conversations('alpaca_tiny.json', 20):
    example = encode_messages(messages, tokenizer, path)
    with open(path) as f:
      reference = tokenizer.apply_chat_template(messages, chat_template=f.read(), tokenize=True,
                                                return_dict=True)
    assert example['input_ids'] == reference['input_ids']
    decoded = [tokenizer.decode(run) for run in supervised_runs(example)]
    assert decoded == [m['content'] + '<|im_end|>' for m in messages if m['role'] == 'assistant']


def _user(content):
  return {'role': 'user', 'content': content}


def _assistant(content, **fields):
  return {'role': 'assistant', 'content': content, **fields}


QWEN3_SYSTEM = {'role': 'system', 'content': 'You are terse.'}
QWEN3_TOOL = {'type': 'function', 'function': {
    'name': 'get_weather', 'description': 'The weather in a city.',
    'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}},
                   'required': ['city']}}}
EMPTY_THINK = '<think>\n\n</think>\n\n'
# name: (messages, what each assistant turn's supervised tokens decode to)
QWEN3_CASES = {
    'multi_turn': ([_user('Hi'), _assistant('Hello!'), _user('2+2?'), _assistant('4')],
                   ['Hello!<|im_end|>', EMPTY_THINK + '4<|im_end|>']),
    'system': ([QWEN3_SYSTEM, _user('Hi'), _assistant('Hello!')],
               [EMPTY_THINK + 'Hello!<|im_end|>']),
    'reasoning_last_turn': (
        [_user('2+2?'), _assistant('4', reasoning_content='\nTwo plus two.\n')],
        ['<think>\nTwo plus two.\n</think>\n\n4<|im_end|>']),
    # Reasoning before the last user query is dropped, as upstream.
    'reasoning_earlier_turn': (
        [QWEN3_SYSTEM, _user('1+1?'), _assistant('2', reasoning_content='One and one.'),
         _user('2+2?'), _assistant('4', reasoning_content='Two and two.')],
        ['2<|im_end|>', '<think>\nTwo and two.\n</think>\n\n4<|im_end|>']),
    'inline_think': (
        [_user('1+1?'), _assistant('<think>\nOne and one.\n</think>\n\n2'), _user('2+2?'),
         _assistant('<think>Two and two.</think>\n\n\n4')],
        ['2<|im_end|>', '<think>\nTwo and two.\n</think>\n\n4<|im_end|>']),
    # A multi-step tool turn: both assistant turns follow the last query, so both keep reasoning.
    'tool_calls': (
        [QWEN3_SYSTEM, _user('Weather in Paris and Rome?'),
         _assistant('', reasoning_content='Ask the tool.', tool_calls=[
             {'type': 'function', 'function': {'name': 'get_weather',
                                               'arguments': {'city': 'Paris'}}},
             {'type': 'function', 'function': {'name': 'get_weather',
                                               'arguments': '{"city": "Rome"}'}}]),
         {'role': 'tool', 'content': '{"temp": 20}'}, {'role': 'tool', 'content': '{"temp": 25}'},
         _assistant('Paris 20, Rome 25.')],
        ['<think>\nAsk the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
         '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
         '{"city": "Rome"}}\n</tool_call><|im_end|>',
         EMPTY_THINK + 'Paris 20, Rome 25.<|im_end|>']),
}


def _decoded_runs(tokenizer, input_ids, mask):
  return [tokenizer.decode(run)
          for run in supervised_runs({'input_ids': input_ids, 'loss_mask': mask})]


@pytest.mark.parametrize('case', sorted(QWEN3_CASES))
def test_qwen3_matches_the_official_template(tokenizer, case):
  """`qwen3` tokenizes as the official template does (with and without tools), and its markers
  supervise each assistant turn's rendered output (think block, content, tool calls) and
  `<|im_end|>`, both in transformers' mask and in the trainer's."""
  messages, supervised = QWEN3_CASES[case]
  for tools in (None, [QWEN3_TOOL]):
    reference = tokenizer.apply_chat_template(messages, chat_template=QWEN3_OFFICIAL, tools=tools,
                                              tokenize=True, return_dict=True)
    ours = tokenizer.apply_chat_template(messages, chat_template=BUILTIN_TEMPLATES['qwen3'],
                                         tools=tools, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
    assert ours['input_ids'] == reference['input_ids'], tools
    assert _decoded_runs(tokenizer, ours['input_ids'], ours['assistant_masks']) == supervised
  # The trainer renders without tools (records carry none): `reference` is the tools-less one.
  reference = tokenizer.apply_chat_template(messages, chat_template=QWEN3_OFFICIAL,
                                            tokenize=True, return_dict=True)
  example = encode_messages(messages, tokenizer, 'qwen3')
  assert example['input_ids'] == reference['input_ids']
  assert _decoded_runs(tokenizer, example['input_ids'], example['loss_mask']) == supervised


@pytest.mark.parametrize('enable_thinking', [None, False, True])
def test_qwen3_generation_prompt(tokenizer, enable_thinking):
  messages = [QWEN3_SYSTEM, _user('1+1?'), _assistant('2', reasoning_content='One and one.'),
              _user('2+2?')]
  kwargs = {} if enable_thinking is None else {'enable_thinking': enable_thinking}
  official, ours = (tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                  add_generation_prompt=True, **kwargs)
                    for source in (QWEN3_OFFICIAL, BUILTIN_TEMPLATES['qwen3']))
  assert ours == official
  prompt = '<|im_start|>assistant\n' + (EMPTY_THINK if enable_thinking is False else '')
  assert ours.endswith('<|im_end|>\n' + prompt) and 'One and one' not in ours
  if enable_thinking is None:  # how evaluation renders a prompt
    assert render(messages, load_template('qwen3'), tokenizer, add_generation_prompt=True,
                  spans=False)[0] == official


@pytest.mark.parametrize('dataset, limit', [('sharegpt_tiny.json', None),
                                            ('glaive_toolcall_zh_demo.json', 60),
                                            ('alpaca_en_demo.json', 200)])
def test_qwen3_matches_the_official_template_on_real_data(tokenizer, dataset, limit):
  """Real chats, tool turns included (ShareGPT `observation` -> role `tool`): ids equal the
  official template's, the mask equals transformers' mask of the built-in's markers."""
  messages_list = conversations(dataset, limit)
  assert_matches_transformers(tokenizer, messages_list, BUILTIN_TEMPLATES['qwen3'], 'qwen3')
  for messages, example in zip(messages_list, encode_batch(messages_list, tokenizer, 'qwen3')):
    assert example['input_ids'] == tokenizer.apply_chat_template(
        messages, chat_template=QWEN3_OFFICIAL, tokenize=True, return_dict=True)['input_ids']
