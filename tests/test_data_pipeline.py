"""The data pipeline: sources through `datasets`, mixtures, eval split, determinism, exact
resume, per-process sharding, streaming, and bad input that is reported, never lost."""

import collections
import json
import logging

import datasets
import numpy as np
import pytest

from jaxsft.config import default_config
from jaxsft.data import BadRecord, encode_batch, to_messages
from jaxsft.data.packing import ROW_KEYS, fit_length
from jaxsft.data.pipeline import Pipeline, mixture_counts
from jaxsft.data.tokenizer import load_tokenizer

from conftest import llama2_tokenizer, shared_data


@pytest.fixture(scope='module')
def tokenizer():
  return load_tokenizer(str(llama2_tokenizer()))


def records(name):
  with open(shared_data(f'instructions/{name}')) as f:
    return json.load(f)


def data_config(tmp_path, sources, **overrides):
  config = default_config().data
  config.datasets = sources
  config.max_seq_len = 256
  config.cache_dir = str(tmp_path / 'cache')
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def pipeline(tokenizer, config, batch_size=4, process_index=0, process_count=1):
  return Pipeline(config, tokenizer, batch_size=batch_size, process_index=process_index,
                  process_count=process_count)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in ROW_KEYS:
      np.testing.assert_array_equal(x[key], y[key])


def segments(batch):
  """Every packed example of a batch as (input tokens tuple, loss mask tuple)."""
  out = []
  for r in range(batch['inputs'].shape[0]):
    for s in range(1, batch['segment_ids'][r].max() + 1):
      where = batch['segment_ids'][r] == s
      out.append((tuple(batch['inputs'][r][where].tolist()),
                  tuple(batch['loss_mask'][r][where].tolist())))
  return out


def write_formats(tmp_path, rows):
  """The same records as json, jsonl, parquet, arrow and a save_to_disk folder."""
  paths = {'json': tmp_path / 'd.json', 'jsonl': tmp_path / 'd.jsonl'}
  paths['json'].write_text(json.dumps(rows))
  paths['jsonl'].write_text(''.join(json.dumps(r) + '\n' for r in rows))
  table = datasets.Dataset.from_list(rows)
  paths['parquet'] = tmp_path / 'd.parquet'
  table.to_parquet(str(paths['parquet']))
  paths['disk'] = tmp_path / 'saved'
  table.save_to_disk(str(paths['disk']))
  paths['arrow'] = next(paths['disk'].glob('*.arrow'))
  return paths


def test_every_file_kind_gives_the_examples_encode_batch_gives(tmp_path, tokenizer):
  rows = records('alpaca_tiny.json')[:40]
  expected = encode_batch([to_messages(r, 'alpaca') for r in rows], tokenizer, 'llama2')
  for kind, path in write_formats(tmp_path, rows).items():
    config = data_config(tmp_path / kind, [{'path': str(path), 'format': 'alpaca'}],
                         max_seq_len=4096)
    source = pipeline(tokenizer, config).sources[0]
    table = source.table
    assert table['input_ids'] == [e['input_ids'] for e in expected], kind
    assert table['loss_mask'] == [e['loss_mask'] for e in expected], kind


def test_hub_names_go_through_load_dataset(tmp_path, tokenizer, monkeypatch):
  rows = records('alpaca_tiny.json')[:10]
  calls = []

  def fake_load_dataset(path, **kwargs):
    calls.append((path, kwargs))
    return datasets.Dataset.from_list(rows)

  monkeypatch.setattr(datasets, 'load_dataset', fake_load_dataset)
  config = data_config(tmp_path, [{'path': 'someone/alpaca-cleaned', 'name': 'en',
                                   'split': 'train[:10]', 'data_files': 'part-*.parquet'}])
  assert len(pipeline(tokenizer, config).sources[0].train_rows) == 10
  path, kwargs = calls[0]
  assert path == 'someone/alpaca-cleaned'
  assert (kwargs['name'], kwargs['split'], kwargs['data_files'], kwargs['streaming']) == (
      'en', 'train[:10]', 'part-*.parquet', False)


def test_an_epoch_holds_every_example_once_shuffled_by_seed(tmp_path, tokenizer):
  path = str(shared_data('instructions/alpaca_tiny.json'))
  config = data_config(tmp_path, [{'path': path}])
  data = pipeline(tokenizer, config)
  rows = len(data._plan_window(0)[1])
  batches = take(data.train_batches(), -(-rows // 4))
  epoch = {key: np.concatenate([b[key] for b in batches])[:rows] for key in ROW_KEYS}
  expected = encode_batch([to_messages(r) for r in records('alpaca_tiny.json')], tokenizer,
                          'llama2')
  expected = [fit_length(e, 257) for e in expected]
  expected = sorted((tuple(e['input_ids'][:-1]), tuple(e['loss_mask'][1:])) for e in expected)
  assert sorted(segments(epoch)) == expected
  again = take(pipeline(tokenizer, config).train_batches(), 3)
  assert_same_batches(batches[:3], again)
  config.seed = 1
  other = take(pipeline(tokenizer, config).train_batches(), 3)
  assert any((x['inputs'] != y['inputs']).any() for x, y in zip(batches, other))


def test_mixture_weights_and_eval_split(tmp_path, tokenizer):
  a, b = str(shared_data('instructions/alpaca_tiny.json')), str(
      shared_data('instructions/identity_alpaca.json'))
  config = data_config(tmp_path, [{'path': a, 'weight': 3.0}, {'path': b, 'weight': 1.0}],
                       eval_size=0.1)
  data = pipeline(tokenizer, config)
  train_a, train_b = (len(s.train_rows) for s in data.sources)
  assert (train_a, train_b) == (90, 82)  # 10 % of 100 and of 91 held out
  assert list(data.window_counts) == list(mixture_counts([3, 1], train_a + train_b))
  assert list(data.window_counts) == [129, 43]
  for source in data.sources:  # train and eval are disjoint
    assert not set(source.train_rows) & set(source.eval_rows)
  refs, _ = data._plan_window(0)
  counts = np.bincount([s for s, _ in refs])
  assert list(counts) == [129, 43]
  # Up-weighted: source 0's 129 draws walk its shuffled stream, so every one of its 90 examples
  # appears before any repeats (one full cycle first): all 90 once, then 39 of them a second
  # time. The window shuffles refs, so count them; sampling with replacement would miss some
  # examples and draw others three times or more.
  counts_a = collections.Counter(row for s, row in refs if s == 0)
  assert set(counts_a) == set(data.sources[0].train_rows.tolist())
  assert sorted(counts_a.values()) == [1] * (2 * train_a - 129) + [2] * (129 - train_a)
  # Down-weighted: 43 draws of 82 examples, none repeated.
  rows_b = [row for s, row in refs if s == 1]
  assert len(set(rows_b)) == 43 and set(rows_b) <= set(data.sources[1].train_rows.tolist())
  eval_batches = list(data.eval_batches())
  eval_examples = [s for batch in eval_batches for s in segments(batch)]
  assert len(eval_examples) == 10 + 9
  assert eval_batches[-1]['inputs'].shape == (4, 256)
  assert_same_batches(eval_batches, list(pipeline(tokenizer, config).eval_batches()))


def test_separate_eval_datasets(tmp_path, tokenizer):
  a = str(shared_data('instructions/alpaca_tiny.json'))
  b = str(shared_data('instructions/sharegpt_tiny.json'))
  config = data_config(tmp_path, [{'path': a}], eval_datasets=[{'path': b}])
  batches = list(pipeline(tokenizer, config).eval_batches())
  assert len(batches) == 1 and batches[0]['segment_ids'].max() == 1
  assert (batches[0]['segment_ids'][1:] == 0).all()  # padding rows carry no loss
  assert (batches[0]['loss_mask'][1:] == 0).all()


@pytest.mark.parametrize('streaming', [False, True])
def test_resume_from_state_sees_the_same_batches(tmp_path, tokenizer, streaming):
  a = str(shared_data('instructions/alpaca_tiny.json'))
  b = str(shared_data('instructions/identity_alpaca.json'))
  config = data_config(tmp_path, [{'path': a}, {'path': b, 'weight': 0.5}], streaming=streaming,
                       pack_window=48, map_batch_size=16, eval_size=5)
  data = pipeline(tokenizer, config)
  iterator = data.train_batches()
  take(iterator, 7)
  state = json.loads(json.dumps(iterator.state()))  # a JSON round trip, as a checkpoint does
  expected = take(iterator, 30)  # crosses windows and epochs of the small source
  assert iterator.state()['window'] > state['window'] + 1
  resumed = pipeline(tokenizer, config).train_batches(state)
  assert_same_batches(take(resumed, 30), expected)


def test_resume_refuses_a_different_data_setup(tmp_path, tokenizer):
  a = str(shared_data('instructions/alpaca_tiny.json'))
  config = data_config(tmp_path, [{'path': a}])
  state = pipeline(tokenizer, config).train_batches().state()
  config.seed = 7
  with pytest.raises(ValueError, match='different data setup'):
    pipeline(tokenizer, config).train_batches(state)


def test_each_process_yields_its_slice_of_the_global_batch(tmp_path, tokenizer):
  a = str(shared_data('instructions/alpaca_tiny.json'))
  config = data_config(tmp_path, [{'path': a}])
  whole = take(pipeline(tokenizer, config, batch_size=8).train_batches(), 4)
  parts = [take(pipeline(tokenizer, config, 8, p, 4).train_batches(), 4) for p in range(4)]
  for step, batch in enumerate(whole):
    for key in ROW_KEYS:
      np.testing.assert_array_equal(
          batch[key], np.concatenate([parts[p][step][key] for p in range(4)]))
  with pytest.raises(ValueError, match='divisible'):
    pipeline(tokenizer, config, 6, 0, 4)


def test_streaming_processes_read_disjoint_records(tmp_path, tokenizer):
  a = str(shared_data('instructions/alpaca_tiny.json'))
  # Each process's shard of the 100 records is 50; a window of 50 is exactly one pass of it.
  config = data_config(tmp_path, [{'path': a}], streaming=True, pack_window=50,
                       map_batch_size=10)
  seen = []
  for process in range(2):
    data = pipeline(tokenizer, config, 4, process, 2)
    iterator = data.train_batches()
    examples = set()
    while iterator.state()['window'] == 0:
      examples |= set(segments(next(iterator)))
    seen.append(examples)
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert len(seen[0]) + len(seen[1]) == 100


def test_bad_records_name_file_and_index_or_are_skipped_and_counted(tmp_path, tokenizer, caplog):
  rows = [{'instruction': 'a', 'output': 'b'}, {'instruction': 'a', 'output': None},
          {'instruction': 'c', 'output': 'd'}, {'instruction': 'e', 'output': ''}]
  path = tmp_path / 'train.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  config = data_config(tmp_path, [{'path': str(path)}])
  with pytest.raises(BadRecord, match=r"train.jsonl, record 1: missing field 'output'"):
    pipeline(tokenizer, config)
  config.on_bad_record = 'skip'
  with caplog.at_level(logging.INFO):
    data = pipeline(tokenizer, config)
  stats = data.total_stats()
  assert (stats.kept, stats.bad_records) == (3, 1)
  assert '1 bad records skipped' in caplog.text


def test_length_policy_is_counted_and_logged(tmp_path, tokenizer, caplog):
  path = str(shared_data('instructions/alpaca_en_demo.json'))
  config = data_config(tmp_path, [{'path': path}], max_seq_len=128)
  with caplog.at_level(logging.INFO):
    stats = pipeline(tokenizer, config).total_stats()
  assert stats.truncated > 100 and stats.dropped_overlong == 0
  assert f'{stats.truncated} truncated' in caplog.text
  config.overlong = 'drop'
  dropped = pipeline(tokenizer, config).total_stats()
  assert dropped.dropped_overlong == stats.truncated
  assert dropped.kept == stats.kept and dropped.records == 999


def test_tokenization_workers_and_cache_give_the_same_table(tmp_path, tokenizer):
  path = str(shared_data('instructions/alpaca_tiny.json'))
  config = data_config(tmp_path, [{'path': path}])
  single = pipeline(tokenizer, config).sources[0].table
  cached = pipeline(tokenizer, config).sources[0].table
  assert cached.cache_files == single.cache_files  # the second run reads the cache
  config.num_proc = 2
  config.cache_dir = str(tmp_path / 'other')
  workers = pipeline(tokenizer, config).sources[0].table
  assert workers['input_ids'] == single['input_ids']
  assert workers['loss_mask'] == single['loss_mask']
