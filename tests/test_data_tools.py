"""Tool calls, reasoning and per-turn loss control: ids equal `apply_chat_template(messages,
tools=...)` on every record of LLaMA-Factory's tool-calling demo and the supervised tokens are
exactly the assistant's turns (calls included); a Qwen3 conversation with reasoning in several
turns trains each turn as HF renders it at that turn; `loss_weight` masks turns; templates
without a tool or think format refuse records they would render without them; `data inspect`
counts turns and dumps every example."""

import json
import pathlib
import re

import pytest
import transformers

from jaxsft.config import default_config
from jaxsft.data import (
  BadRecord,
  encode_batch,
  encode_messages,
  encode_samples,
  to_messages,
  to_tools,
)
from jaxsft.data.builtin_templates import BUILTIN_TEMPLATES, WITHOUT_TOOLS
from jaxsft.data.inspect import inspect_data
from jaxsft.data.templates import ChatTemplate
from jaxsft.errors import UserError

from conftest import llama2_tokenizer, shared_data

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
QWEN3_OFFICIAL = (FIXTURES / 'qwen3_chat_template.jinja').read_text()
LLAMA31 = str(FIXTURES / 'llama3_1_chat_template.jinja')
SPECIAL_TOKENS = ['<|im_start|>', '<|im_end|>', '<|start_header_id|>', '<|end_header_id|>',
                  '<|eot_id|>', '<|python_tag|>', '<|eom_id|>']
# Added, not special, in Qwen's tokenizers: single tokens here too.
ADDED_TOKENS = ['<think>', '</think>', '<tool_call>', '</tool_call>', '<tool_response>',
                '</tool_response>']
# Where each template's assistant turns are: what the model writes after the turn's header,
# through its end-of-turn token (the reference mask, found in the text HF renders).
ASSISTANT_TURN = {
    'chatml': re.compile(r'<\|im_start\|>assistant\n(.*?<\|im_end\|>)', re.S),
    'llama3': re.compile(r'<\|start_header_id\|>assistant<\|end_header_id\|>\n\n'
                         r'(.*?(?:<\|eot_id\|>|<\|eom_id\|>))', re.S),
}


@pytest.fixture(scope='module')
def tokenizer():
  tok = transformers.AutoTokenizer.from_pretrained(llama2_tokenizer())
  tok.add_special_tokens({'additional_special_tokens': SPECIAL_TOKENS})
  tok.add_tokens(ADDED_TOKENS)
  return tok


def runs(tokenizer, example):
  """The decoded runs of supervised tokens."""
  out, current = [], []
  for token, supervised in zip(example['input_ids'], example['loss_mask']):
    if supervised:
      current.append(token)
    elif current:
      out.append(tokenizer.decode(current))
      current = []
  return out + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize('template', ['qwen2_5.jinja', 'llama3_1', 'qwen3'])
def test_tool_calling_demo_matches_apply_chat_template(tokenizer, template):
  """Every record of LLaMA-Factory's glaive demo (ShareGPT function_call / observation turns
  and a tools column) with Qwen2.5's template (no generation markers: located by prefixes), the
  LLaMA-3.1 Instruct template and the built-in qwen3 (against Qwen3's own): ids equal
  `apply_chat_template(messages, tools=tools)`, the supervised tokens are exactly the assistant
  turns, calls included, and no tool result."""
  turns = 'llama3' if template == 'llama3_1' else 'chatml'
  if template == 'qwen3':  # the built-in, against Qwen3's own template
    source = QWEN3_OFFICIAL
  else:
    template = LLAMA31 if template == 'llama3_1' else str(shared_data(f'chat_templates/{template}'))
    source = pathlib.Path(template).read_text()
  with open(shared_data('instructions/glaive_toolcall_zh_demo.json')) as f:
    records = json.load(f)
  conversations, tools = [to_messages(r) for r in records], [to_tools(r) for r in records]
  assert sum(bool(t) for t in tools) == 200
  assert sum('tool_calls' in m for c in conversations for m in c) == 216
  examples = encode_batch(conversations, tokenizer, template, tools=tools)
  texts = [tokenizer.apply_chat_template(messages, tools=tools_, chat_template=source,
                                         tokenize=False)
           for messages, tools_ in zip(conversations, tools)]
  encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
  for i, (text, encoding, example) in enumerate(zip(texts, encodings, examples)):
    assert example['input_ids'] == encoding.ids, i
    spans = [m.span(1) for m in ASSISTANT_TURN[turns].finditer(text)]
    assert len(spans) == sum(m['role'] == 'assistant' for m in conversations[i]), i
    expected = [int(any(a < end and b > start for start, end in spans))
                for a, b in encoding.offsets]
    assert example['loss_mask'] == expected, i


@pytest.mark.parametrize('template', WITHOUT_TOOLS)
def test_templates_without_a_tool_format_refuse_tool_records(tokenizer, template):
  call = {'type': 'function', 'function': {'name': 'add', 'arguments': {'a': 1}}}
  messages = [{'role': 'user', 'content': '1+?'},
              {'role': 'assistant', 'content': '', 'tool_calls': [call]},
              {'role': 'tool', 'content': '2'}, {'role': 'assistant', 'content': '2.'}]
  for tools, chat in (([call], messages), (None, messages), ([call], messages[:1] + messages[3:])):
    with pytest.raises(BadRecord) as error:
      encode_messages(chat, tokenizer, template, tools=tools)
    assert f"chat template '{template}' has no tool format" in str(error.value)
    assert "data.template='qwen3'" in str(error.value) and '\n' not in str(error.value)
  # A template file that drops them is found out by rendering.
  with pytest.raises(BadRecord, match="'llama3_training.jinja' has no tool format.*tool call "
                     "'add'"):
    encode_messages(messages, tokenizer, str(shared_data('chat_templates/llama3_training.jinja')))


def test_openai_messages_with_tools_reasoning_and_weights(tokenizer):
  """`messages` records: tool calls with JSON-text arguments become objects, a reasoning alias,
  OpenAI's `weight`, tools as JSON text or a list (nulls `datasets` fills in dropped)."""
  schema = {'name': 'add', 'description': 'Adds.', 'parameters': {'type': 'object'}}
  record = {'messages': [
      {'role': 'user', 'content': 'Add 1 and 2.', 'tool_calls': None},
      {'role': 'assistant', 'content': None, 'reasoning': 'Use the tool.', 'tool_calls': [
          {'id': 'c1', 'type': 'function',
           'function': {'name': 'add', 'arguments': '{"a": 1, "b": 2}'}}]},
      {'role': 'tool', 'content': '3', 'tool_call_id': 'c1'},
      {'role': 'assistant', 'content': '3.', 'weight': 0}],
      'tools': [{'type': 'function', 'function': {**schema, 'strict': None}}]}
  messages = to_messages(record)
  assert messages == [
      {'role': 'user', 'content': 'Add 1 and 2.'},
      {'role': 'assistant', 'content': '', 'reasoning_content': 'Use the tool.', 'tool_calls': [
          {'type': 'function', 'id': 'c1', 'function': {'name': 'add',
                                                        'arguments': {'a': 1, 'b': 2}}}]},
      {'role': 'tool', 'content': '3', 'tool_call_id': 'c1'},
      {'role': 'assistant', 'content': '3.', 'loss_weight': 0}]
  tools = [{'type': 'function', 'function': schema}]
  assert to_tools(record) == tools
  assert to_tools({**record, 'tools': json.dumps([schema])}) == tools
  assert to_tools({**record, 'tools': '[]'}) is None and to_tools({'text': 'x'}) is None
  example = encode_messages(messages, tokenizer, 'qwen3', tools=tools)
  reference = tokenizer.apply_chat_template(messages, tools=tools, chat_template=QWEN3_OFFICIAL,
                                            tokenize=True, return_dict=True)
  assert example['input_ids'] == reference['input_ids']
  assert runs(tokenizer, example) == [
      '<think>\nUse the tool.\n</think>\n\n<tool_call>\n{"name": "add", "arguments": '
      '{"a": 1, "b": 2}}\n</tool_call><|im_end|>']
  for bad, problem in (({'weight': 0.5}, 'must be 0 or 1'), ({'train': 'no'}, 'true or false'),
                       ({'loss_weight': 0, 'train': True}, 'keep one')):
    with pytest.raises(BadRecord, match=problem):
      to_messages({'messages': [record['messages'][0], {'role': 'assistant', 'content': 'x',
                                                        **bad}]})


def _user(content):
  return {'role': 'user', 'content': content}


def _assistant(content, **fields):
  return {'role': 'assistant', 'content': content, **fields}


SYSTEM = {'role': 'system', 'content': 'You are terse.'}
REASONING_TWICE = [SYSTEM, _user('1+1?'), _assistant('2', reasoning_content='One and one.'),
                   _user('2+2?'), _assistant('4', reasoning_content='Two and two.')]


@pytest.mark.parametrize('inline', [False, True])
def test_qwen3_reasoning_in_two_turns_trains_each_turn_as_rendered_at_that_turn(tokenizer,
                                                                                 inline):
  """Qwen3 drops turn 1's reasoning once turn 2 exists, so the conversation trains as two
  samples, each the conversation through its turn as HF renders it there, only that turn
  supervised (its think block included, or not with train_on_reasoning=False)."""
  conversation = REASONING_TWICE
  if inline:  # the reasoning as a think block in the content
    conversation = [_assistant(f'<think>\n{m["reasoning_content"]}\n</think>\n\n{m["content"]}')
                    if m['role'] == 'assistant' else m for m in conversation]
  samples, = encode_samples([conversation], tokenizer, 'qwen3')
  assert len(samples) == 2
  for sample, end in zip(samples, (3, 5)):
    assert sample['input_ids'] == tokenizer.apply_chat_template(
        conversation[:end], chat_template=QWEN3_OFFICIAL, tokenize=True,
        return_dict=True)['input_ids']
  assert [runs(tokenizer, s) for s in samples] == [
      ['<think>\nOne and one.\n</think>\n\n2<|im_end|>'],
      ['<think>\nTwo and two.\n</think>\n\n4<|im_end|>']]
  unsupervised, = encode_samples([conversation], tokenizer, 'qwen3', train_on_reasoning=False)
  assert [runs(tokenizer, s) for s in unsupervised] == [['2<|im_end|>'], ['4<|im_end|>']]
  assert [s['input_ids'] for s in unsupervised] == [s['input_ids'] for s in samples]


def test_no_expansion_where_every_turn_renders_as_it_was(tokenizer):
  call = {'type': 'function', 'function': {'name': 'f', 'arguments': {}}}
  kept = {  # conversation: what its one sample supervises
      'reasoning in the last turn only': (
          REASONING_TWICE[:2] + [_assistant('2')] + REASONING_TWICE[3:],
          ['2<|im_end|>', '<think>\nTwo and two.\n</think>\n\n4<|im_end|>']),
      # Both turns follow the last user query: Qwen3 keeps the first one's reasoning.
      'multi-step tool calls': (
          [_user('Go.'), _assistant('', reasoning_content='Call f.', tool_calls=[call]),
           {'role': 'tool', 'content': 'ok'}, _assistant('Done.', reasoning_content='Done.')],
          ['<think>\nCall f.\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {}}\n'
           '</tool_call><|im_end|>', '<think>\nDone.\n</think>\n\nDone.<|im_end|>'])}
  for name, (conversation, supervised) in kept.items():
    samples, = encode_samples([conversation], tokenizer, 'qwen3')
    assert [runs(tokenizer, s) for s in samples] == [supervised], name
  # A template that keeps all reasoning (chatml, the think block in the content) trains once.
  inline = [_user('1+1?'), _assistant('<think>One and one.</think>2'), _user('2+2?'),
            _assistant('4')]
  assert len(encode_samples([inline], tokenizer, 'chatml')[0]) == 1
  # A template that does not render the reasoning refuses to train without it: chatml has no
  # reasoning_content, a DeepSeek-R1-like one drops think blocks from every turn.
  with pytest.raises(BadRecord, match="'chatml' does not render the reasoning of assistant "
                     r'turn 1 \(message 2\)'):
    encode_samples([REASONING_TWICE], tokenizer, 'chatml')
  marked = "{{- message['content'] + '<|im_end|>' -}}{%- endgeneration"
  drops_all = BUILTIN_TEMPLATES['chatml'].replace(marked, marked.replace(
      "message['content']", "message['content'].split('</think>')[-1]"))
  assert drops_all != BUILTIN_TEMPLATES['chatml']
  with pytest.raises(BadRecord, match=r"'r1' does not render the reasoning of .* turn 1"):
    encode_samples([inline], tokenizer, ChatTemplate('r1', drops_all))
  with pytest.raises(UserError, match="train_on='all' trains every token"):
    encode_samples([REASONING_TWICE], tokenizer, 'qwen3', 'all', train_on_reasoning=False)


@pytest.mark.parametrize('template', ['chatml', 'qwen2_5.jinja'])
def test_loss_weight_masks_turns_on_top_of_train_on(tokenizer, template):
  """A turn with loss_weight 0 (or train: false) is not supervised, under every train_on, for
  a template with markers and one located by prefixes."""
  if template.endswith('.jinja'):
    template = str(shared_data(f'chat_templates/{template}'))
  record = {'messages': [_user('Hi'), _assistant('Hello!', train=False), _user('2+2?'),
                         _assistant('4'), _user('3+3?'), _assistant('6', loss_weight=1)]}
  messages = to_messages(record)
  assert messages[1]['loss_weight'] == 0
  example = encode_messages(messages, tokenizer, template)
  assert runs(tokenizer, example) == ['4<|im_end|>', '6<|im_end|>']
  masked_last = messages[:5] + [_assistant('6', loss_weight=0)]
  assert runs(tokenizer, encode_messages(masked_last, tokenizer, template, 'last')) == []
  assert runs(tokenizer, encode_messages(messages, tokenizer, template, 'last')) == ['6<|im_end|>']
  everything = encode_messages(messages, tokenizer, template, 'all')
  supervised = ''.join(runs(tokenizer, everything))
  assert 'Hello!' not in supervised and '2+2?' in supervised and '6<|im_end|>' in supervised
  assert len(runs(tokenizer, everything)) == 2  # the whole text, less turn 1


def test_inspect_counts_turns_and_dumps_every_example(tmp_path, tokenizer):
  """`data inspect`: the per-turn counts, each sample shown, and `--dump`'s lines are the
  examples the pipeline trains, in record order with their source and index."""
  records = [{'messages': REASONING_TWICE},
             {'messages': [_user('Hi'), _assistant('Hello!', loss_weight=0), _user('Bye'),
                           _assistant('Bye!')]},
             {'messages': [_user('?')]},  # no assistant turn: a bad record
             {'messages': [_user('Hi'), _assistant('Hey', train=False)]},
             {'messages': [_user('Hi'), _assistant('Hey')], 'tools': '[{"name"'},  # bad JSON
             {'messages': [_user('Hi'), _assistant('Hey')]}]
  path = tmp_path / 'chats.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  config = default_config().data
  config.datasets = [{'path': str(path)}]
  config.template, config.max_seq_len, config.on_bad_record = 'qwen3', 128, 'skip'
  config.cache_dir = str(tmp_path / 'cache')
  dump = tmp_path / 'examples.jsonl'
  report = inspect_data(config, tokenizer, batch_size=2, num_examples=1, dump=str(dump))
  assert '--- record 0, sample 2 of 2 (one per assistant turn)' in report
  assert ('6 records (7 examples: 1 more from training each assistant turn' in report and
          '1 dropped with no supervised token, 2 bad records skipped' in report and
          '4 assistant turns trained, 1 masked by loss_weight' in report), report
  lines = [json.loads(line) for line in dump.read_text().splitlines()]
  assert [(x['index'], x['sample'], x['status']) for x in lines] == [
      (0, 0, 'kept'), (0, 1, 'kept'), (1, 0, 'kept'), (2, 0, 'bad_record'),
      (3, 0, 'dropped_unsupervised'), (4, 0, 'bad_record'), (5, 0, 'kept')]
  assert {x['source'] for x in lines} == {str(path)} and {x['split'] for x in lines} == {'train'}
  expected = encode_samples([to_messages(records[i]) for i in (0, 1, 5)], tokenizer, 'qwen3')
  assert [{k: x[k] for k in ('input_ids', 'loss_mask')} for x in lines[:3] + lines[6:]] == [
      *expected[0], *expected[1], *expected[2]]
  assert lines[3]['input_ids'] == lines[4]['input_ids'] == lines[5]['input_ids'] == []
  assert 'wrote 7 examples' in report


def test_builtin_qwen3_is_the_only_builtin_with_a_tool_format():
  assert sorted(set(BUILTIN_TEMPLATES) - set(WITHOUT_TOOLS)) == ['qwen3']
