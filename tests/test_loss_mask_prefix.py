"""Loss masks of chat templates without `{% generation %}` markers, located by rendering the
conversation's prefixes. Ground truth: the supervised tokens decode to exactly the reply and its
end-of-turn token, and equal the masks the same template gives with markers; a template whose
prefixes are not the start of the whole conversation is refused, never guessed."""

import json
import re

import pytest
import transformers
from test_data_templates import supervised_runs as supervised_id_runs
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from jaxsft.data import BadRecord, encode_batch, encode_messages, load_template, to_messages
from jaxsft.data.builtin_templates import BUILTIN_TEMPLATES
from jaxsft.data.templates import ChatTemplate, render, render_examples

from conftest import llama2_tokenizer as llama2_folder
from conftest import shared_data

EXTRA_SPECIAL_TOKENS = ['<|im_start|>', '<|im_end|>', '<|start_header_id|>',
                        '<|end_header_id|>', '<|eot_id|>']
_MARKER = re.compile(r'\{%-?\s*(end)?generation\s*-?%\}')

# LLaMA-3.1 style: a system header with dates whose digits ('4', '2024', '26') a reply may repeat.
LLAMA31_HEADER = 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n'
LLAMA31_MARKED = r"""
{{- bos_token -}}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' -}}
{%- if messages[0]['role'] == 'system' -%}
  {{- messages[0]['content'] | trim -}}{%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- for message in loop_messages -%}
  {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}
  {%- if message['role'] == 'assistant' -%}
    {%- generation -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endgeneration -%}
  {%- else -%}
    {{- message['content'] | trim + '<|eot_id|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
""".strip()


def strip_markers(source):
  return _MARKER.sub('', source)


LLAMA31 = strip_markers(LLAMA31_MARKED)

# Qwen3 style: the final assistant turn gets an (empty) think block, earlier turns do not, so the
# conversation rendered through turn 1 is not the start of the whole rendered conversation.
THINKS_ON_LAST_TURN = r"""
{%- for message in messages -%}
  {{- '<|im_start|>' + message['role'] + '\n' -}}
  {%- if message['role'] == 'assistant' and loop.last -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
  {{- message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

# Keeps only the latest assistant reply's content: earlier replies render empty.
DROPS_EARLIER_REPLIES = r"""
{%- for message in messages -%}
  {{- '<|im_start|>' + message['role'] + '\n' -}}
  {%- if message['role'] != 'assistant' or loop.last -%}{{- message['content'] -}}{%- endif -%}
  {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

# Mistral style: '[/INST]' abuts the reply, which a tokenizer may merge into one token.
ABUTTING = r"""
{{- bos_token -}}
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}
  {%- else -%}{{- message['content'] + eos_token -}}{%- endif -%}
{%- endfor -%}
""".strip()

# ChatML turns with "OK" in the user's text as well as the reply.
OK_CHAT = [{'role': 'system', 'content': 'Answer OK or not OK.'},
           {'role': 'user', 'content': 'Reply OK if you read me. OK?'},
           {'role': 'assistant', 'content': 'OK'},
           {'role': 'user', 'content': 'Say OK once more'},
           {'role': 'assistant', 'content': 'OK'}]


def local_tokenizer(corpus, chat_template=None):
  """A word-level fast tokenizer over `corpus` (words, single digits, single whitespace and
  punctuation characters; ']' joins a following word, as SentencePiece may merge it) with the
  chat special tokens. Its tokens concatenate back to the exact text."""
  specials = ['<s>', '</s>', '<unk>'] + EXTRA_SPECIAL_TOKENS
  split = pre_tokenizers.Split(Regex(r'\][A-Za-z]+|[A-Za-z]+|\d|\s|[^\sA-Za-z\d]'),
                               behavior='isolated')
  pieces = sorted({piece for text in corpus for piece, _ in split.pre_tokenize_str(text)})
  backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + pieces)},
                                       unk_token='<unk>'))
  backend.pre_tokenizer = split
  backend.decoder = decoders.Fuse()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token='<s>', eos_token='</s>', unk_token='<unk>',
      additional_special_tokens=EXTRA_SPECIAL_TOKENS)
  if chat_template is not None:
    tokenizer.chat_template = chat_template
  return tokenizer


def llama2_tokenizer(chat_template=None):
  tokenizer = transformers.AutoTokenizer.from_pretrained(llama2_folder())
  tokenizer.add_special_tokens({'additional_special_tokens': EXTRA_SPECIAL_TOKENS})
  if chat_template is not None:
    tokenizer.chat_template = chat_template
  return tokenizer


def corpus_of(*conversations):
  """Texts that cover every word the templates below render for these conversations."""
  return ([m['content'] for c in conversations for m in c] +
          [LLAMA31_HEADER, 'system user assistant INST think', '[INST] [/INST] <think>\n\n</think>'])


def supervised_runs(tokenizer, example):
  """The decoded text of each contiguous run of supervised tokens."""
  return [tokenizer.decode(run) for run in supervised_id_runs(example)]


def replies(messages, end_of_turn, trim=False):
  return [(m['content'].strip() if trim else m['content']) + end_of_turn
          for m in messages if m['role'] == 'assistant']


def reference_ids(tokenizer, messages, source):
  return tokenizer.apply_chat_template(messages, chat_template=source, tokenize=True,
                                       return_dict=True)['input_ids']


def read(relative):
  with open(shared_data(relative)) as f:
    return f.read()


def conversations(name):
  with open(shared_data(f'instructions/{name}')) as f:
    return [to_messages(record) for record in json.load(f)]


# 1. A reply that also occurs in the LLaMA-3.1 date header.

DATE_CHATS = [
    [{'role': 'user', 'content': 'What is 2 + 2?'}, {'role': 'assistant', 'content': '4'}],
    [{'role': 'user', 'content': 'Which year is it?'}, {'role': 'assistant', 'content': '2024'}],
    [{'role': 'system', 'content': 'Be terse.'}, {'role': 'user', 'content': 'Day of month?'},
     {'role': 'assistant', 'content': '26'}, {'role': 'user', 'content': 'And 2 + 2?'},
     {'role': 'assistant', 'content': '4'}],
]


@pytest.mark.parametrize('make_tokenizer', ['local', 'llama2'])
def test_reply_in_date_header_supervises_only_the_reply(make_tokenizer):
  tokenizer = (local_tokenizer(corpus_of(*DATE_CHATS)) if make_tokenizer == 'local'
               else llama2_tokenizer())
  assert not ChatTemplate('t', LLAMA31).has_generation_markers
  for messages in DATE_CHATS:
    example = encode_messages(messages, tokenizer, ChatTemplate('llama31', LLAMA31))
    assert example['input_ids'] == reference_ids(tokenizer, messages, LLAMA31)
    header_length = example['input_ids'].index(tokenizer.convert_tokens_to_ids('<|eot_id|>')) + 1
    assert LLAMA31_HEADER in tokenizer.decode(example['input_ids'][:header_length])
    assert not any(example['loss_mask'][:header_length]), 'a reply was found in the header'
    assert supervised_runs(tokenizer, example) == replies(messages, '<|eot_id|>')
    marked = encode_messages(messages, tokenizer, ChatTemplate('marked', LLAMA31_MARKED))
    assert example == marked


# 2. ChatML (Qwen2.5) with "OK" in the user's text and as the reply.

def qwen_with_content_markers():
  """qwen2_5.jinja with markers around each plain assistant reply's content and <|im_end|>
  (the built-in chatml's placement), leaving the template's text unchanged."""
  source = read('chat_templates/qwen2_5.jinja')
  line = "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
  assert source.count(line) == 1
  marked = ("{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
            "{%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}"
            "{{- '\\n' }}{%- else %}" + line + '{%- endif %}')
  return source.replace(line, marked)


def assert_ok_chat_ground_truth(tokenizer, example, training_example):
  """Supervised: each reply "OK" and its <|im_end|>. The upstream training template's markers
  also cover the newline after `<|im_start|>assistant` (part of the generation prompt) and the
  one after <|im_end|> (never generated); those newline tokens are the only difference."""
  assert example['input_ids'] == training_example['input_ids']
  assert supervised_runs(tokenizer, example) == ['OK<|im_end|>', 'OK<|im_end|>']
  ids, mask = example['input_ids'], example['loss_mask']
  first_reply = ids.index(tokenizer.convert_tokens_to_ids('<|im_start|>'), 1 + ids.index(
      tokenizer.convert_tokens_to_ids('<|im_start|>'), 1 + ids.index(
          tokenizer.convert_tokens_to_ids('<|im_start|>'))))
  assert tokenizer.decode(ids[:first_reply]).endswith('Reply OK if you read me. OK?<|im_end|>\n')
  assert not any(mask[:first_reply]), "the user's OK is supervised"
  differ = [i for i, (a, b) in enumerate(zip(mask, training_example['loss_mask'])) if a != b]
  assert [(mask[i], training_example['loss_mask'][i]) for i in differ] == [(0, 1)] * 4
  assert all(tokenizer.decode([ids[i]]) == '\n' for i in differ)


def test_chatml_reply_in_user_turn_matches_markers():
  tokenizer = llama2_tokenizer()
  path = str(shared_data('chat_templates/qwen2_5.jinja'))
  assert not load_template(path).has_generation_markers
  example = encode_messages(OK_CHAT, tokenizer, path)
  training = encode_messages(OK_CHAT, tokenizer,
                             str(shared_data('chat_templates/qwen2_5_training.jinja')))
  assert_ok_chat_ground_truth(tokenizer, example, training)
  assert example == encode_messages(OK_CHAT, tokenizer,
                                    ChatTemplate('marked', qwen_with_content_markers()))


def test_chatml_without_markers_matches_markers_on_real_data():
  tokenizer = llama2_tokenizer()
  plain = load_template(str(shared_data('chat_templates/qwen2_5.jinja')))
  marked = ChatTemplate('marked', qwen_with_content_markers())
  data = conversations('alpaca_en_demo.json') + conversations('sharegpt_tiny.json')
  assert encode_batch(data, tokenizer, plain) == encode_batch(data, tokenizer, marked)


# 3. The tokenizer's own template.

def test_tokenizer_own_template_without_markers():
  tokenizer = llama2_tokenizer(read('chat_templates/qwen2_5.jinja'))
  assert not load_template('jinja', tokenizer).has_generation_markers
  example = encode_messages(OK_CHAT, tokenizer, 'jinja')
  training = encode_messages(OK_CHAT, tokenizer,
                             str(shared_data('chat_templates/qwen2_5_training.jinja')))
  assert_ok_chat_ground_truth(tokenizer, example, training)


def test_local_tokenizer_own_template_without_markers():
  tokenizer = local_tokenizer(corpus_of(*DATE_CHATS), chat_template=LLAMA31)
  for messages in DATE_CHATS:
    example = encode_messages(messages, tokenizer, 'jinja')
    assert supervised_runs(tokenizer, example) == replies(messages, '<|eot_id|>')
    assert example == encode_messages(messages, tokenizer, ChatTemplate('m', LLAMA31_MARKED))


# 4. Templates whose prefixes are not the start of the whole conversation are refused.

@pytest.mark.parametrize('source', [THINKS_ON_LAST_TURN, DROPS_EARLIER_REPLIES],
                         ids=['thinks_on_last_turn', 'drops_earlier_replies'])
def test_template_rewriting_earlier_turns_is_refused(source):
  tokenizer = local_tokenizer(corpus_of(OK_CHAT))
  template = ChatTemplate('rewrites.jinja', source)
  with pytest.raises(BadRecord) as error:
    encode_messages(OK_CHAT, tokenizer, template)
  message = str(error.value)
  assert isinstance(error.value, ValueError)
  assert 'assistant turn 1 (message 2)' in message
  assert 'renders earlier turns differently once later turns exist' in message
  assert '{% generation %} / {% endgeneration %}' in message and 'data.template' in message
  # One turn, or only the last turn, has prefixes that are the start of the conversation.
  single = OK_CHAT[:3]
  assert supervised_runs(tokenizer, encode_messages(single, tokenizer, template)) == [
      ('<think>\n\n</think>\n\n' if source == THINKS_ON_LAST_TURN else '') + 'OK<|im_end|>']
  last = encode_messages(OK_CHAT, tokenizer, template, train_on='last')
  assert supervised_runs(tokenizer, last)[-1].endswith('OK<|im_end|>')


def test_refused_record_does_not_affect_the_rest_of_the_batch():
  tokenizer = local_tokenizer(corpus_of(OK_CHAT))
  template = ChatTemplate('rewrites.jinja', THINKS_ON_LAST_TURN)
  results = render_examples([OK_CHAT[:3], OK_CHAT, [{'role': 'text', 'content': 'plain'}]],
                            template, tokenizer)
  assert isinstance(results[0], tuple) and isinstance(results[2], tuple)
  assert isinstance(results[1], BadRecord)


def test_boundary_inside_a_token_is_refused():
  """'[/INST]' + 'Hello' tokenizes as '[', '/', 'INST', ']Hello': the reply starts inside a
  token, so the rendered prompt's ids are not the start of the conversation's ids."""
  chats = [[{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}],
           [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': '42'}]]
  tokenizer = local_tokenizer(corpus_of(*chats) + [']Hello'])
  template = ChatTemplate('abutting', ABUTTING)
  merged, separate = render_examples(chats, template, tokenizer)
  assert isinstance(merged, BadRecord)
  assert 'a token spans the boundary of the turn' in str(merged)
  assert '{% generation %}' in str(merged)
  assert supervised_runs(tokenizer, encode_messages(chats[1], tokenizer, template)) == ['42</s>']


def test_template_failing_on_a_prefix_is_reported():
  tokenizer = local_tokenizer(corpus_of(OK_CHAT))
  starts_with_reply = [{'role': 'assistant', 'content': 'OK'}] + OK_CHAT[1:3]
  needs_a_message = "{{- messages[0]['role'] -}}" + BUILTIN_TEMPLATES['chatml'].strip()
  with pytest.raises(BadRecord, match='up to an assistant turn.*generation'):
    encode_messages(starts_with_reply, tokenizer, ChatTemplate('t', strip_markers(needs_a_message)))


# train_on and render() without markers.

def test_train_on_without_markers():
  tokenizer = local_tokenizer(corpus_of(OK_CHAT))
  template = ChatTemplate('chatml', strip_markers(BUILTIN_TEMPLATES['chatml']))
  assert supervised_runs(tokenizer, encode_messages(OK_CHAT, tokenizer, template)) == [
      'OK<|im_end|>', 'OK<|im_end|>']
  last = encode_messages(OK_CHAT, tokenizer, template, train_on='last')
  assert supervised_runs(tokenizer, last) == ['OK<|im_end|>']
  assert last['loss_mask'][-2:] == [1, 0]  # the reply's <|im_end|>, then the template's '\n'
  assert all(encode_messages(OK_CHAT, tokenizer, template, train_on='all')['loss_mask'])


def test_render_without_markers_for_generation_prompts():
  tokenizer = local_tokenizer(corpus_of(OK_CHAT))
  template = ChatTemplate('chatml', strip_markers(BUILTIN_TEMPLATES['chatml']))
  prompt = OK_CHAT[:4]
  text, spans = render(prompt, template, tokenizer, add_generation_prompt=True)
  assert text == tokenizer.apply_chat_template(prompt, chat_template=template.source,
                                               tokenize=False, add_generation_prompt=True)
  assert text.endswith('<|im_start|>assistant\n')
  assert [text[start:end] for start, end in spans] == ['OK<|im_end|>']
  rewrites = ChatTemplate('rewrites', THINKS_ON_LAST_TURN)
  with pytest.raises(BadRecord):
    render(prompt, rewrites, tokenizer, add_generation_prompt=True)
  assert render(prompt, rewrites, tokenizer, add_generation_prompt=True, spans=False) == (
      tokenizer.apply_chat_template(prompt, chat_template=rewrites.source, tokenize=False,
                                    add_generation_prompt=True), [])


def test_template_ignoring_add_generation_prompt():
  """LLaMA-2 ignores add_generation_prompt: the prompt prefix is the plain prefix, and the
  separating space before the reply is the first supervised character."""
  tokenizer = local_tokenizer(corpus_of(OK_CHAT))
  template = ChatTemplate('llama2', strip_markers(BUILTIN_TEMPLATES['llama2']))
  text, spans = render(OK_CHAT, template, tokenizer)
  assert [text[start:end] for start, end in spans] == [' OK </s>', ' OK </s>']


# 5. Built-in templates with their markers stripped, on every record of alpaca_en_demo.

@pytest.fixture(scope='module')
def alpaca_demo():
  return conversations('alpaca_en_demo.json')


@pytest.mark.parametrize('name', ['llama3', 'chatml', 'alpaca'])
def test_builtins_without_markers_match_markers(alpaca_demo, name):
  tokenizer = llama2_tokenizer()
  plain = ChatTemplate(name, strip_markers(BUILTIN_TEMPLATES[name]))
  assert not plain.has_generation_markers
  assert len(alpaca_demo) == 999
  results = render_examples(alpaca_demo, plain, tokenizer)
  assert [r for r in results if isinstance(r, BadRecord)] == []
  assert (encode_batch(alpaca_demo, tokenizer, plain) ==
          encode_batch(alpaca_demo, tokenizer, ChatTemplate(name, BUILTIN_TEMPLATES[name])))


def test_llama31_without_markers_matches_markers(alpaca_demo):
  """Searching for the reply would land before it (in the header or the user's text) on several
  of these records; the prefix rendering puts every mask where the markers do."""
  tokenizer = llama2_tokenizer()
  marked = ChatTemplate('llama31_marked', LLAMA31_MARKED)
  traps = 0
  for messages, (text, spans) in zip(alpaca_demo, render_examples(alpaca_demo, marked,
                                                                   tokenizer)):
    reply = messages[-1]['content'].strip()
    traps += text.find(reply) < spans[-1][0]
  assert traps >= 8
  assert (encode_batch(alpaca_demo, tokenizer, ChatTemplate('llama31', LLAMA31)) ==
          encode_batch(alpaca_demo, tokenizer, marked))
