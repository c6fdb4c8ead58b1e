"""Chat templates on real data: ids equal `apply_chat_template`, masks equal transformers'
`return_assistant_tokens_mask`, and the supervised tokens decode to the assistant turns."""

import json

import pytest
import transformers

from jaxsft.data import encode_batch, encode_messages, load_template, to_messages
from jaxsft.data.builtin_templates import BUILTIN_TEMPLATES

from conftest import shared_data

EXTRA_SPECIAL_TOKENS = ['<|im_start|>', '<|im_end|>', '<|start_header_id|>',
                        '<|end_header_id|>', '<|eot_id|>']
END_OF_TURN = {'llama2': ' </s>', 'llama3': '<|eot_id|>', 'chatml': '<|im_end|>',
               'mistral': '</s>', 'alpaca': '</s>'}


@pytest.fixture(scope='module')
def tokenizer():
  tok = transformers.AutoTokenizer.from_pretrained(shared_data('tokenizers/llama2'))
  tok.add_special_tokens({'additional_special_tokens': EXTRA_SPECIAL_TOKENS})
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
  tokenizer = transformers.AutoTokenizer.from_pretrained(shared_data('tokenizers/llama2'))
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
