"""`jaxsft.data`'s public API: the light names import without `datasets` (and its pyarrow and
pandas) or transformers, `Pipeline` still imports on first access, and `pad_rows` pads packed
rows to a multiple of the batch axis with rows that add nothing."""

import copy
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import jaxsft.data
from jaxsft.data import pack, pad_rows
from jaxsft.data.packing import ROW_KEYS

REPO = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ('datasets', 'pyarrow', 'pandas', 'transformers')
LIGHT = [name for name in jaxsft.data.__all__ if name != 'Pipeline']

# A fresh interpreter: this test process has imported datasets long ago (other tests, conftest).
_PROBE = f'''
import json, sys
from jaxsft.data import {', '.join(LIGHT)}
light = sorted(m for m in {HEAVY!r} if m in sys.modules)
from jaxsft.data import Pipeline
from jaxsft.data.pipeline import Pipeline as home
print(json.dumps([light, Pipeline is home, 'datasets' in sys.modules]))
'''


def test_light_names_import_without_datasets_and_pipeline_still_imports():
  done = subprocess.run([sys.executable, '-c', _PROBE], cwd=REPO, capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  light, same_class, datasets_after = json.loads(done.stdout.splitlines()[-1])
  assert light == []
  assert same_class and datasets_after  # the lazy name is the real class, loaded on demand


def test_every_public_name_resolves_and_has_a_docstring():
  for name in jaxsft.data.__all__:
    assert (getattr(jaxsft.data, name).__doc__ or '').strip(), name
  with pytest.raises(AttributeError, match='no_such_name'):
    jaxsft.data.no_such_name  # noqa: B018  (an unknown name is no lazy import)


def _examples(rng, lengths):
  return [{'input_ids': rng.integers(1, 1000, n).tolist(),
           'loss_mask': rng.integers(0, 2, n).tolist()} for n in lengths]


@pytest.fixture(scope='module')
def rows():
  # Lengths that fill 5 rows of 8 positions under bfd: 5 is a multiple of 1 and 5 only.
  packed = pack(_examples(np.random.default_rng(0), [9, 9, 7, 5, 4, 3, 9, 2]), 8)
  assert packed['inputs'].shape == (5, 8)
  return packed


@pytest.mark.parametrize('multiple', [1, 2, 3, 4, 5, 8])
def test_pad_rows_reaches_the_next_multiple_and_keeps_the_real_rows(rows, multiple):
  before = copy.deepcopy(rows)
  padded = pad_rows(rows, multiple)
  count = padded['inputs'].shape[0]
  assert count % multiple == 0 and 5 <= count < 5 + multiple  # the fewest rows that divide
  assert set(padded) == set(ROW_KEYS)
  for key in ROW_KEYS:
    np.testing.assert_array_equal(rows[key], before[key])  # the input is never written to
    np.testing.assert_array_equal(padded[key][:5], before[key])
    assert padded[key].dtype == before[key].dtype and padded[key].shape[1:] == (8,)
    assert not padded[key][5:].any(), key  # segment 0, loss mask 0, ids and positions 0
  if count == 5:
    assert padded is rows  # already a multiple: returned as it is


def _masked_mean(rows, per_token):
  """A loss as the trainer takes it: per-position values [R, T] averaged over loss_mask."""
  mask = rows['loss_mask'].astype(np.float64)
  return float((per_token * mask).sum() / mask.sum())


def _visible(rows):
  """[R, T, T] bool: query position i of row r sees key j (same segment, j <= i), the mask the
  model's attention builds from segment ids."""
  seg = rows['segment_ids']
  causal = np.tril(np.ones((seg.shape[1],) * 2, bool))
  return (seg[:, :, None] == seg[:, None, :]) & causal


def test_pad_rows_add_nothing_to_the_loss_and_nothing_real_sees_them(rows):
  padded = pad_rows(rows, 4)
  assert padded['inputs'].shape[0] == 8
  # Any per-token loss, even one that is large on the padding rows' tokens.
  loss = np.random.default_rng(1).random(padded['inputs'].shape) + 100.0 * (
      padded['segment_ids'] == 0)
  assert _masked_mean(padded, loss) == pytest.approx(_masked_mean(rows, loss[:5]), rel=1e-12)
  # Attention is per row, so a padding row is out of every real token's sight; the real rows'
  # masks are those of the unpadded batch.
  np.testing.assert_array_equal(_visible(padded)[:5], _visible(rows))
  # The real rows are those with any segment: pack never makes an empty row.
  assert list((padded['segment_ids'] > 0).any(axis=1)) == [True] * 5 + [False] * 3


def test_pad_rows_refuses_a_zero_multiple_and_ragged_rows(rows):
  with pytest.raises(ValueError, match='multiple'):
    pad_rows(rows, 0)
  ragged = dict(rows, positions=rows['positions'][:4])
  with pytest.raises(ValueError, match='number of rows'):
    pad_rows(ragged, 2)
