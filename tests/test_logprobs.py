"""Per-token log-probabilities for custom objectives: `token_logprobs` (chunked head) and
`batch_logprobs` (a packed batch through the model) against transformers and the full logits,
values, gradients and the memory of the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsft.interop import hf
from jaxsft.models import Llama
from jaxsft.models.llama import head_kernel
from jaxsft.train import loss as loss_lib

from hf_reference import random_tokens, save_model

# Two rows of 32 positions; each segment is (tokens, supervised from this position on).
ROW_LENGTH = 32
ROWS = (((9, 4), (12, 6), (6, 1)),      # three segments, 3 padding positions
        ((14, 0), (8, 3), (10, 9)))     # three segments filling the row


def packed_batch():
  """The rows of `data.packing`: inputs ids[:-1], targets ids[1:], positions restarting at 0
  per segment, segment ids 1.. (0: padding), loss mask of the targets; and each segment's ids
  with its (row, start) for the reference."""
  batch = {key: np.zeros((len(ROWS), ROW_LENGTH), np.int32) for key in
           ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')}
  segments = []
  for r, row in enumerate(ROWS):
    start = 0
    for s, (length, supervised_from) in enumerate(row, start=1):
      ids = random_tokens(1, length + 1, seed=100 * r + s)[0]
      end = start + length
      batch['inputs'][r, start:end], batch['targets'][r, start:end] = ids[:-1], ids[1:]
      batch['positions'][r, start:end] = np.arange(length)
      batch['segment_ids'][r, start:end] = s
      batch['loss_mask'][r, start + supervised_from:end] = 1
      segments.append((r, start, ids))
      start = end
    batch['inputs'][r, start:] = 5  # padding: arbitrary tokens, segment 0, unsupervised
  return batch, segments


def reference_logprobs(torch_model, segments):
  """`[B, T]` log_softmax(transformers' logits)[target] of each segment run alone (0 where no
  segment is), and the mask of the positions a segment covers."""
  want = np.zeros((len(ROWS), ROW_LENGTH), np.float32)
  covered = np.zeros(want.shape, bool)
  for r, start, ids in segments:
    with torch.no_grad():
      logits = torch_model(torch.as_tensor(ids[None, :-1], dtype=torch.long)).logits[0]
      logprobs = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.as_tensor(ids[1:], dtype=torch.long)
    end = start + len(ids) - 1
    want[r, start:end] = logprobs.gather(-1, targets[:, None])[:, 0].numpy()
    covered[r, start:end] = True
  return want, covered


@pytest.mark.parametrize('variant', ['llama3_gqa', 'llama_tied'])
def test_logprobs_equal_transformers_on_packed_rows(tmp_path, variant, monkeypatch):
  torch_model = save_model(variant, tmp_path)
  config, params = hf.load_checkpoint(tmp_path)
  model, variables = Llama(config), {'params': params}
  batch, segments = packed_batch()
  want, covered = reference_logprobs(torch_model, segments)

  # Every position of every segment, from the hidden states and head (4 chunks per row).
  hidden = model.apply(variables, batch['inputs'], batch['positions'], batch['segment_ids'],
                       return_hidden=True)
  got = loss_lib.token_logprobs(hidden, head_kernel(config, variables), batch['targets'], 8)
  assert got.shape == (len(ROWS), ROW_LENGTH) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got)[covered], want[covered], rtol=0, atol=1e-5)

  # The packed batch straight through the model: the supervised ones, 0 elsewhere.
  mask = batch['loss_mask'] != 0
  assert 0 < mask.sum() < covered.sum()
  chunked = np.asarray(loss_lib.batch_logprobs(model, variables, batch, chunk=8))
  np.testing.assert_allclose(chunked[mask], want[mask], rtol=0, atol=1e-5)
  assert not np.any(chunked[~mask])
  # With LoRA on the head there is no head kernel: the model's own logits give the same.
  monkeypatch.setattr(loss_lib, 'head_kernel', lambda *_: None)
  whole = np.asarray(loss_lib.batch_logprobs(model, variables, batch, chunk=8))
  np.testing.assert_allclose(whole, chunked, rtol=0, atol=1e-5)


def random_inputs(seed=0, b=2, t=48, d=16, v=300):
  keys = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(keys[0], (b, t, d))
  kernel = jax.random.normal(keys[1], (d, v)) * 0.5
  targets = jax.random.randint(keys[2], (b, t), 0, v)
  # Token weights of an objective: some zero, some negative (a preference loss's rejected side).
  weights = jax.random.uniform(keys[3], (b, t), minval=-1.0, maxval=2.0)
  weights = weights.at[:, ::5].set(0.0)
  return hidden, kernel, targets, weights


def full_logprobs(hidden, kernel, targets):
  logits = jnp.einsum('btd,dv->btv', hidden, kernel, preferred_element_type=jnp.float32)
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None],
                             axis=-1)[..., 0]


@pytest.mark.parametrize('chunk', [8, 10, 0])  # 10 -> 8, the largest divisor of 48; 0: one
def test_gradients_equal_those_of_the_full_logits(chunk):
  hidden, kernel, targets, weights = random_inputs()
  np.testing.assert_allclose(loss_lib.token_logprobs(hidden, kernel, targets, chunk),
                             full_logprobs(hidden, kernel, targets), rtol=1e-6, atol=1e-5)

  def objective(logprobs_fn):
    # Nonlinear in the log-probabilities, so the cotangent differs at every position.
    return lambda h, k: jnp.sum(weights * logprobs_fn(h, k, targets)) + jnp.sum(
        jnp.exp(logprobs_fn(h, k, targets)))

  chunked = lambda h, k, tg: loss_lib.token_logprobs(h, k, tg, chunk)  # noqa: E731
  got = jax.jit(jax.grad(objective(chunked), argnums=(0, 1)))(hidden, kernel)
  want = jax.grad(objective(full_logprobs), argnums=(0, 1))(hidden, kernel)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype and g.shape == w.shape
    scale = np.abs(np.asarray(w)).max()
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale)


def test_bf16_gradients_come_back_in_the_input_dtypes():
  hidden, kernel, targets, weights = random_inputs(seed=1)
  hidden, kernel = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  values, grads = jax.value_and_grad(
      lambda h, k: jnp.sum(weights * loss_lib.token_logprobs(h, k, targets, 16)),
      argnums=(0, 1))(hidden, kernel)
  assert values.dtype == jnp.float32
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
  want = jax.grad(lambda h, k: jnp.sum(weights * full_logprobs(h, k, targets)),
                  argnums=(0, 1))(hidden, kernel)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=0, atol=0.02 * float(jnp.abs(w.astype(jnp.float32)).max()))


def test_neither_pass_holds_the_whole_logits():
  b, t, d, v, chunk = 2, 256, 16, 8192, 16  # 16 chunks per row
  full_bytes = b * t * v * 4  # the [B, T, V] float32 logits: 16 MiB
  hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  kernel = jax.ShapeDtypeStruct((d, v), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp_bytes(logprobs_fn):
    def value_and_grad(h, k, tg):
      return jax.value_and_grad(lambda h, k: jnp.sum(logprobs_fn(h, k, tg) ** 2),
                                argnums=(0, 1))(h, k)
    compiled = jax.jit(value_and_grad).lower(hidden, kernel, targets).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  chunked = temp_bytes(lambda h, k, tg: loss_lib.token_logprobs(h, k, tg, chunk))
  assert temp_bytes(full_logprobs) >= full_bytes  # the measure sees whole logits when they exist
  assert chunked < full_bytes / 4, (chunked, full_bytes)
