"""LLaMA-Factory's dataset descriptions (`dataset_info.json`) as `data.datasets` entries.

An entry `{'dataset_info': 'data/dataset_info.json', 'name': 'glaive_toolcall_zh_demo'}` (plus
`weight`) becomes the entry that dataset's description means: `file_name` (relative to the json's
folder) is the path; `formatting` alpaca / sharegpt / openai picks the reader (`alpaca`,
`sharegpt`, `messages`); `columns` and `tags` become the reader's `columns`. An alpaca
description with only a `prompt` column is LLaMA-Factory's pre-training text: the `text` format.

What jaxsft cannot train on is refused in one line rather than read wrong: hub, script and cloud
sources (there is no hub access through dataset_info.json; jaxsft's own `path` takes hub names),
preference and KTO data, images, videos and audio. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from jaxsft.errors import UserError, did_you_mean

# The keys of one description (LLaMA-Factory's data/README.md and its DatasetAttr).
_REMOTE = {'hf_hub_url': 'a Hugging Face hub dataset', 'ms_hub_url': 'a ModelScope dataset',
           'om_hub_url': 'a Modelers (OpenMind) dataset', 'script_url': 'a loading script',
           'cloud_file_name': 'a cloud file'}
_KEYS = ('file_name', *_REMOTE, 'formatting', 'ranking', 'subset', 'split', 'folder',
         'num_samples', 'columns', 'tags')
_COLUMNS = ('prompt', 'query', 'response', 'history', 'messages', 'system', 'tools', 'images',
            'videos', 'audios', 'chosen', 'rejected', 'kto_tag')
_TAGS = ('role_tag', 'content_tag', 'user_tag', 'assistant_tag', 'observation_tag',
         'function_tag', 'system_tag')
FORMATTINGS = ('alpaca', 'sharegpt', 'openai')
# jaxsft's name for each LLaMA-Factory column / tag, by formatting.
_ALPACA = {'prompt': 'instruction', 'query': 'input', 'response': 'output', 'history': 'history',
           'system': 'system', 'tools': 'tools'}
_SHAREGPT = {'messages': 'conversations', 'system': 'system', 'tools': 'tools',
             'role_tag': 'from', 'content_tag': 'value', 'user_tag': 'user_tag',
             'assistant_tag': 'assistant_tag', 'observation_tag': 'observation_tag',
             'function_tag': 'function_tag', 'system_tag': 'system_tag'}
# The openai formatting is read by the `messages` reader, whose fields are OpenAI's own.
_OPENAI = {'messages': 'messages', 'tools': 'tools'}
_OPENAI_TAGS = {'role_tag': 'role', 'content_tag': 'content', 'user_tag': 'user',
                'assistant_tag': 'assistant', 'observation_tag': 'tool', 'system_tag': 'system'}
# Keys of the `data.datasets` entry itself besides `dataset_info`.
ENTRY_KEYS = ('dataset_info', 'name', 'weight')


def read_dataset_info(path: str, where: str) -> dict[str, Any]:
  """The descriptions of a dataset_info.json, by dataset name."""
  try:
    with open(os.path.expanduser(path), encoding='utf-8') as f:
      info = json.load(f)
  except FileNotFoundError:
    raise UserError(f'{where}: dataset_info file {path!r} does not exist; fix "dataset_info".'
                    ) from None
  except json.JSONDecodeError as error:
    raise UserError(f'{where}: {path}, line {error.lineno} column {error.colno}: invalid JSON '
                    f'({error.msg}); fix that line.') from None
  if not isinstance(info, dict):
    raise UserError(f'{where}: {path} must hold a JSON object of dataset descriptions by name.')
  return info


def dataset_info_entry(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
  """A `data.datasets` entry naming a dataset of a dataset_info.json -> the plain entry (`path`,
  `format`, `columns`, `weight`) its description means. Raises `UserError` saying why a
  description cannot be trained on, or naming an unknown key."""
  extra = sorted(set(entry) - set(ENTRY_KEYS))
  if extra:
    raise UserError(f'{where}: {extra} cannot go with "dataset_info" (the description gives the '
                    f'file, format and columns); keep only {list(ENTRY_KEYS)}.')
  path, name = entry['dataset_info'], entry.get('name')
  info = read_dataset_info(path, where)
  if not isinstance(name, str) or name not in info:
    hint = did_you_mean(name, list(info)) if isinstance(name, str) else ''
    raise UserError(f'{where}: "name" must name a dataset of {path}, got {name!r}.{hint}')
  where = f'{where} ({path}: {name})'
  description = info[name]
  if not isinstance(description, Mapping):
    raise UserError(f'{where}: the description must be a JSON object.')
  spec = describe(description, where)
  spec['path'] = os.path.join(os.path.dirname(path), spec['path'])
  if 'weight' in entry:
    spec['weight'] = entry['weight']
  return spec


def describe(description: Mapping[str, Any], where: str) -> dict[str, Any]:
  """One LLaMA-Factory description -> `{'path': file_name, 'format', 'columns'}`."""
  _check_keys(description, _KEYS, 'key', where)
  for key, what in _REMOTE.items():
    if key in description:
      other = (f', or use {{"path": {json.dumps(description[key])}}} in data.datasets (jaxsft '
               'loads hub datasets itself)' if key == 'hf_hub_url' else '')
      raise UserError(f'{where}: {key} names {what}, which is not fetched through '
                      f'dataset_info.json; download it and give its "file_name"{other}.')
  if description.get('ranking'):
    raise UserError(f'{where}: "ranking" marks preference data (chosen/rejected answers) for '
                    'reward modelling or DPO, not supervised fine-tuning.')
  if not isinstance(description.get('file_name'), str) or not description['file_name']:
    raise UserError(f'{where}: "file_name" (a file or folder next to the dataset_info.json) is '
                    'required.')
  for key, fix in (('subset', 'a hub config; a local file has none'),
                   ('folder', 'a folder of a hub repository'),
                   ('num_samples', 'a sample count; set the entry\'s "weight" for its share of '
                    'the mixture instead')):
    if description.get(key) is not None:
      raise UserError(f'{where}: "{key}" is {fix}; remove it.')
  if description.get('split', 'train') != 'train':
    raise UserError(f'{where}: split {description["split"]!r}: a local file has only the '
                    '"train" split.')
  columns = description.get('columns') or {}
  tags = description.get('tags') or {}
  _check_keys(columns, _COLUMNS, 'column', where)
  _check_keys(tags, _TAGS, 'tag', where)
  for key in ('images', 'videos', 'audios'):
    if key in columns:
      raise UserError(f'{where}: column "{key}": multimodal data; jaxsft trains text-only '
                      'models.')
  if 'kto_tag' in columns:
    raise UserError(f'{where}: column "kto_tag": KTO data labels answers good or bad; supervised '
                    'fine-tuning would learn the bad ones too.')
  for key in ('chosen', 'rejected'):
    if key in columns:
      raise UserError(f'{where}: column "{key}": preference data, not supervised fine-tuning.')
  formatting = description.get('formatting', 'alpaca')
  if formatting not in FORMATTINGS:
    raise UserError(f'{where}: formatting {formatting!r}; LLaMA-Factory\'s are {FORMATTINGS}.')
  spec = {'path': description['file_name'], 'split': 'train'}
  spec.update(_reader(formatting, 'columns' in description, columns, tags, where))
  return spec


def _check_keys(mapping: Any, known: tuple[str, ...], what: str, where: str) -> None:
  if not isinstance(mapping, Mapping):
    raise UserError(f'{where}: expected an object of {what}s, got {str(mapping)[:60]!r}.')
  for key, value in mapping.items():
    if key not in known:
      raise UserError(f'{where}: unknown {what} {key!r}.{did_you_mean(key, known)} Known: '
                      f'{list(known)}.')
    if what != 'key' and (not isinstance(value, str) or not value):
      raise UserError(f'{where}: {what} {key!r} must be a non-empty string, got {value!r}.')


def _reader(formatting: str, has_columns: bool, columns: Mapping[str, str],
            tags: Mapping[str, str], where: str) -> dict[str, Any]:
  """jaxsft's format and `columns` for a formatting and its columns and tags."""
  names = {'alpaca': _ALPACA, 'sharegpt': _SHAREGPT, 'openai': _OPENAI}[formatting]
  for key in (*columns, *tags):
    if key not in names and not (formatting == 'openai' and key in _TAGS):
      raise UserError(f'{where}: {key!r} does not apply to formatting {formatting!r}.')
  if formatting == 'alpaca':
    # LLaMA-Factory leaves out every column a description does not name; one with a prompt
    # and nothing else is its pre-training text.
    if has_columns and 'response' not in columns:
      if set(columns) - {'prompt'}:
        raise UserError(f'{where}: no "response" column: nothing to train on (an alpaca '
                        'description needs one, or only "prompt" for pre-training text).')
      return {'format': 'text', 'columns': {'text': columns.get('prompt', 'instruction')}}
  if formatting == 'openai':
    # The messages reader reads OpenAI's names only; its calls are `tool_calls` of assistant
    # messages, so a function_tag names nothing it reads.
    for tag, value in tags.items():
      if tag in _OPENAI_TAGS and value != _OPENAI_TAGS[tag]:
        raise UserError(f'{where}: tag {tag}={value!r}: the openai formatting is read with '
                        f'OpenAI\'s names ({tag}={_OPENAI_TAGS[tag]!r}); use formatting '
                        '"sharegpt" for other tags.')
    tags = {}
  out = {names[k]: v for k, v in {**columns, **tags}.items() if names[k] != v}
  return {'format': {'openai': 'messages'}.get(formatting, formatting), 'columns': out}
