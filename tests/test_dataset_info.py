"""LLaMA-Factory's dataset descriptions: every local SFT description of its dataset_info.json
becomes a `data.datasets` entry, the rest are refused in one line that says why, and its glaive
tool-calling demo trains through the pipeline from its description."""

import json
import shutil

import numpy as np
import pytest

from jaxsft.config import default_config
from jaxsft.data.dataset_info import describe
from jaxsft.data.pipeline import Pipeline
from jaxsft.data.spec import dataset_spec
from jaxsft.data.tokenizer import load_tokenizer
from jaxsft.errors import UserError

from conftest import llama2_tokenizer, shared_data

LOCAL_SFT = {  # name -> (format, columns) each local-file SFT description maps to
    'identity': ('alpaca', {}), 'alpaca_en_demo': ('alpaca', {}),
    'alpaca_zh_demo': ('alpaca', {}), 'glaive_toolcall_en_demo': ('sharegpt', {}),
    'glaive_toolcall_zh_demo': ('sharegpt', {}),
    'wiki_demo': ('text', {'text': 'text'}), 'c4_demo': ('text', {'text': 'text'}),  # pre-training
}
WHY = {'hf_hub_url': 'Hugging Face hub', 'ms_hub_url': 'ModelScope', 'ranking': 'preference',
       'images': 'multimodal', 'videos': 'multimodal', 'audios': 'multimodal', 'kto_tag': 'KTO'}


def spec_of(info_path, name, **entry):
  return dataset_spec({'dataset_info': str(info_path), 'name': name, **entry}, 'data.datasets[0]')


def test_every_description_of_llamafactory_resolves_or_says_why():
  path = shared_data('dataset_info/llamafactory_dataset_info.json')
  info = json.loads(path.read_text())
  resolved = {}
  for name, description in info.items():
    try:
      resolved[name] = spec_of(path, name)
    except UserError as error:
      message = str(error)
      assert '\n' not in message and f': {name})' in message
      reason = next(k for k in WHY if k in description or k in description.get('columns', {}))
      assert WHY[reason] in message, message
  assert {name: (s['format'], s['columns']) for name, s in resolved.items()} == LOCAL_SFT
  for name, spec in resolved.items():
    assert spec['path'] == str(path.parent / info[name]['file_name'])


def test_columns_and_tags_map_onto_the_readers():
  tags = {'role_tag': 'role', 'content_tag': 'content', 'user_tag': 'user',
          'assistant_tag': 'assistant', 'system_tag': 'system'}
  assert describe({'file_name': 'u.json', 'formatting': 'sharegpt',
                   'columns': {'messages': 'messages', 'system': 'sys', 'tools': 'tools'},
                   'tags': tags}, 'x') == {
      'path': 'u.json', 'split': 'train', 'format': 'sharegpt',
      'columns': {'conversations': 'messages', 'system': 'sys', 'from': 'role',
                  'value': 'content', 'user_tag': 'user', 'assistant_tag': 'assistant',
                  'system_tag': 'system'}}
  assert describe({'file_name': 'o.jsonl', 'formatting': 'openai',
                   'columns': {'messages': 'chat', 'tools': 'functions'}, 'tags': tags}, 'x') == {
      'path': 'o.jsonl', 'split': 'train', 'format': 'messages',
      'columns': {'messages': 'chat', 'tools': 'functions'}}
  assert describe({'file_name': 'a.json', 'columns': {
      'prompt': 'q', 'query': 'ctx', 'response': 'a', 'history': 'h', 'system': 's'}},
      'x')['columns'] == {'instruction': 'q', 'input': 'ctx', 'output': 'a', 'history': 'h',
                          'system': 's'}


@pytest.mark.parametrize('description, problem', [
    ({'file_nam': 'a.json'}, "unknown key 'file_nam'. Did you mean 'file_name'"),
    ({'file_name': 'a.json', 'columns': {'promt': 'q'}}, "unknown column 'promt'. Did you mean "
     "'prompt'"),
    ({'file_name': 'a.json', 'formatting': 'sharegpt', 'tags': {'user': 'u'}},
     "unknown tag 'user'. Did you mean 'user_tag'"),
    ({'file_name': 'a.json', 'formatting': 'sharegpt', 'columns': {'prompt': 'q'}},
     "'prompt' does not apply to formatting 'sharegpt'"),
    ({'file_name': 'a.json', 'tags': {'role_tag': 'r'}},
     "'role_tag' does not apply to formatting 'alpaca'"),
    ({'file_name': 'a.json', 'formatting': 'openai', 'tags': {'role_tag': 'from'}},
     'use formatting "sharegpt" for other tags'),
    ({'file_name': 'a.json', 'formatting': 'chatml'}, "formatting 'chatml'"),
    ({'file_name': 'a.json', 'columns': {'prompt': 'q', 'query': 'i'}}, 'no "response" column'),
    ({'file_name': 'a.json', 'num_samples': 100}, '"num_samples" is a sample count'),
    ({'file_name': 'a.json', 'split': 'test'}, 'only the "train" split'),
    ({'script_url': 'my_script'}, 'script_url names a loading script'),
    ({'cloud_file_name': 's3://b/a.json'}, 'cloud_file_name names a cloud file'),
    ({'formatting': 'alpaca'}, '"file_name" .* is required'),
])
def test_bad_descriptions_say_what(description, problem):
  with pytest.raises(UserError, match=problem):
    describe(description, 'x')


def test_entries_naming_a_description(tmp_path):
  info = tmp_path / 'lf' / 'dataset_info.json'
  info.parent.mkdir()
  info.write_text(json.dumps({'mine': {'file_name': 'data/mine.jsonl', 'formatting': 'sharegpt'}}))
  spec = spec_of(info, 'mine', weight=2.0)
  assert spec['path'] == str(tmp_path / 'lf' / 'data' / 'mine.jsonl')
  assert (spec['format'], spec['weight'], spec['name']) == ('sharegpt', 2.0, None)
  with pytest.raises(UserError, match="must name a dataset of .* got 'mien'. Did you mean 'mine'"):
    spec_of(info, 'mien')
  with pytest.raises(UserError, match=r"\['format'\] cannot go with \"dataset_info\""):
    spec_of(info, 'mine', format='alpaca')
  with pytest.raises(UserError, match='does not exist'):
    spec_of(tmp_path / 'nope.json', 'mine')


def test_glaive_description_trains_through_the_pipeline(tmp_path):
  """LLaMA-Factory's own description of its glaive demo, with its file beside it: all 300
  records become training examples whose supervised tokens hold the calls."""
  shutil.copy(shared_data('dataset_info/llamafactory_dataset_info.json'),
              tmp_path / 'dataset_info.json')
  shutil.copy(shared_data('instructions/glaive_toolcall_zh_demo.json'), tmp_path)
  tokenizer = load_tokenizer(str(llama2_tokenizer()))
  config = default_config().data
  config.datasets = [{'dataset_info': str(tmp_path / 'dataset_info.json'),
                      'name': 'glaive_toolcall_zh_demo'}]
  config.template = str(shared_data('chat_templates/qwen2_5_training.jinja'))
  config.max_seq_len = 2048
  config.cache_dir = str(tmp_path / 'cache')
  data = Pipeline(config, tokenizer, batch_size=8, process_index=0, process_count=1)
  stats = data.total_stats()
  assert (stats.records, stats.kept + stats.truncated) == (300, 300)
  batch = next(data.train_batches())
  supervised = tokenizer.decode(batch['targets'][batch['loss_mask'] == 1])
  assert supervised.count('<tool_call>') >= 1 and '"arguments": {' in supervised
  unsupervised = tokenizer.decode(batch['targets'][(batch['loss_mask'] == 0) &
                                                   (batch['segment_ids'] > 0)])
  assert '<tool_response>' in unsupervised and '<tool_response>' not in supervised
  assert np.all(batch['loss_mask'][batch['segment_ids'] == 0] == 0)
