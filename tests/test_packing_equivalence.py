"""A packed row computes, for each segment, exactly what that segment computes alone."""

import numpy as np
import pytest

from jaxsft.interop import hf
from jaxsft.models import Llama

from hf_reference import random_tokens, save_model, torch_logits

SEGMENT_LENGTHS = (7, 11, 5)
ROW_LENGTH = 28  # 23 real tokens + 5 padding


def packed_row(tokens_per_segment):
  tokens = np.zeros((1, ROW_LENGTH), np.int32)
  positions = np.zeros((1, ROW_LENGTH), np.int32)
  segment_ids = np.zeros((1, ROW_LENGTH), np.int32)
  start = 0
  for segment, seg_tokens in enumerate(tokens_per_segment, start=1):
    end = start + len(seg_tokens)
    tokens[0, start:end] = seg_tokens
    positions[0, start:end] = np.arange(len(seg_tokens))
    segment_ids[0, start:end] = segment
    start = end
  tokens[0, start:] = 3  # padding tokens: arbitrary ids, segment 0
  return tokens, positions, segment_ids


@pytest.mark.parametrize('variant', ['llama3_gqa', 'mistral_window5', 'qwen2_bias', 'qwen3'])
@pytest.mark.parametrize('scan_layers', [True, False])
def test_each_segment_equals_running_it_alone(tmp_path, variant, scan_layers):
  torch_model = save_model(variant, tmp_path)
  config, params = hf.load_checkpoint(tmp_path, config_overrides={'scan_layers': scan_layers})
  model = Llama(config)
  segments = [random_tokens(1, n, seed=10 + i)[0] for i, n in enumerate(SEGMENT_LENGTHS)]
  tokens, positions, segment_ids = packed_row(segments)
  packed = np.asarray(model.apply({'params': params}, tokens, positions=positions,
                                  segment_ids=segment_ids))
  start = 0
  for seg_tokens in segments:
    end = start + len(seg_tokens)
    alone = np.asarray(model.apply({'params': params}, seg_tokens[None]))
    assert np.abs(packed[:, start:end] - alone).max() <= 1e-5
    assert np.abs(packed[:, start:end] - torch_logits(torch_model, seg_tokens[None])).max() <= 1e-4
    start = end


def test_padding_does_not_change_real_tokens(tmp_path):
  save_model('llama2_mha', tmp_path)
  config, params = hf.load_checkpoint(tmp_path)
  model = Llama(config)
  tokens = random_tokens(1, 10, seed=4)
  padded = np.concatenate([tokens, np.full((1, 6), 9, np.int32)], axis=1)
  segment_ids = np.array([[1] * 10 + [0] * 6], np.int32)
  alone = np.asarray(model.apply({'params': params}, tokens))
  with_padding = np.asarray(model.apply({'params': params}, padded, segment_ids=segment_ids))
  assert np.all(np.isfinite(with_padding))
  assert np.abs(with_padding[:, :10] - alone).max() <= 1e-5
