"""Property tests of packing and the length policy."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsft.data import apply_length_policy, fit_length, pack, packing_efficiency

SEQ_LEN = 64


@st.composite
def example_lists(draw, max_len=SEQ_LEN + 1):
  lengths = draw(st.lists(st.integers(2, max_len), min_size=1, max_size=40))
  examples = []
  for n in lengths:
    ids = draw(st.lists(st.integers(1, 999), min_size=n, max_size=n))
    mask = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    examples.append({'input_ids': ids, 'loss_mask': mask})
  return examples


@settings(max_examples=150, deadline=None)
@given(example_lists(), st.sampled_from(['bfd', 'greedy', 'none']))
def test_every_example_appears_once_contiguously_and_alone(examples, strategy):
  rows = pack(examples, SEQ_LEN, strategy)
  assert set(rows) == {'inputs', 'targets', 'loss_mask', 'segment_ids', 'positions'}
  assert all(a.dtype == np.int32 and a.shape == rows['inputs'].shape for a in rows.values())
  found = []
  for r in range(rows['inputs'].shape[0]):
    seg = rows['segment_ids'][r]
    # Segments are contiguous, numbered 1.. in order, padding (0) only at the end.
    changes = np.flatnonzero(np.diff(seg)) + 1
    starts = np.concatenate([[0], changes])
    ends = np.concatenate([changes, [SEQ_LEN]])
    ids_in_row = [seg[s] for s in starts if seg[s] != 0]
    assert ids_in_row == list(range(1, len(ids_in_row) + 1))
    assert np.all(seg[np.argmax(seg == 0):] == 0) if (seg == 0).any() else True
    for s, e in zip(starts, ends):
      if seg[s] == 0:
        assert not rows['loss_mask'][r, s:e].any()  # no loss on padding
        continue
      assert np.array_equal(rows['positions'][r, s:e], np.arange(e - s))  # positions restart
      inputs, targets = rows['inputs'][r, s:e], rows['targets'][r, s:e]
      assert np.array_equal(inputs[1:], targets[:-1])  # targets are the next tokens
      found.append((list(inputs) + [targets[-1]], list(rows['loss_mask'][r, s:e])))
  expected = sorted((e['input_ids'], e['loss_mask'][1:]) for e in examples)
  assert sorted(found) == expected
  if strategy == 'none':
    assert rows['inputs'].shape[0] == len(examples)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 8), min_size=5, max_size=60),
       st.lists(st.integers(40, 64), min_size=1, max_size=20), st.randoms())
def test_bfd_is_at_least_as_efficient_as_greedy_on_skewed_lengths(short, long, rng):
  lengths = short + long
  rng.shuffle(lengths)
  examples = [{'input_ids': [1] * (n + 1), 'loss_mask': [1] * (n + 1)} for n in lengths]
  bfd, greedy = pack(examples, SEQ_LEN, 'bfd'), pack(examples, SEQ_LEN, 'greedy')
  assert packing_efficiency(bfd) >= packing_efficiency(greedy)
  assert bfd['inputs'].shape[0] <= greedy['inputs'].shape[0]


def test_bfd_packs_tightly():
  lengths = [60, 4, 30, 34, 50, 14, 64]  # sums to 4 full rows
  examples = [{'input_ids': [1] * (n + 1), 'loss_mask': [1] * (n + 1)} for n in lengths]
  rows = pack(examples, SEQ_LEN, 'bfd')
  assert rows['inputs'].shape[0] == 4 and packing_efficiency(rows) == 1.0


def test_overlong_example_is_refused_by_pack():
  with pytest.raises(ValueError, match='longer than the row'):
    pack([{'input_ids': [1] * 80, 'loss_mask': [1] * 80}], SEQ_LEN)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 60), st.integers(2, 60), st.integers(4, 40))
def test_truncation_keeps_supervised_tokens(prompt_len, response_len, max_tokens):
  example = {'input_ids': list(range(prompt_len + response_len)),
             'loss_mask': [0] * prompt_len + [1] * response_len}
  fitted = fit_length(example, max_tokens, 'truncate')
  assert len(fitted['input_ids']) == min(max_tokens, prompt_len + response_len)
  assert any(fitted['loss_mask'][1:])  # something is still trained
  ids = fitted['input_ids']
  assert ids == list(range(ids[0], ids[0] + len(ids)))  # one contiguous window
  if prompt_len < max_tokens - 1:
    assert ids[0] == 0  # the response side was cut first
  assert fit_length(example, max_tokens, 'drop') is (
      example if prompt_len + response_len <= max_tokens else None)


def test_length_policy_counts():
  examples = [{'input_ids': [1] * 10, 'loss_mask': [0] * 5 + [1] * 5},
              {'input_ids': [1] * 30, 'loss_mask': [0] * 5 + [1] * 25},
              {'input_ids': [1] * 8, 'loss_mask': [1] + [0] * 7}]  # nothing to predict
  kept, stats = apply_length_policy(examples, 16, 'truncate')
  assert (stats.kept, stats.truncated, stats.dropped, stats.dropped_unsupervised) == (2, 1, 0, 1)
  assert len(kept[1]['input_ids']) == 16
  kept, stats = apply_length_policy(examples, 16, 'drop')
  assert (stats.kept, stats.truncated, stats.dropped, stats.dropped_unsupervised) == (1, 0, 1, 1)
