"""GPU parity: cuDNN flash attention against the XLA reference, in bf16, through the model.

Logits of a small random LLaMA, then one train step (loss, gradient norm and the update, which
is proportional to the gradient here) for full fine-tuning, LoRA and QLoRA, each run once with
the kernel under test and once with the reference. Everything but the attention kernel is the
same program, so what differs is the kernel's rounding.

The kernel under test is `JAXSFT_GPU_TEST_KERNEL` (default `cudnn`), the reference
`JAXSFT_GPU_TEST_REFERENCE` (default `xla`). With the default kernel and no GPU the module is
skipped. `scripts/device_check.sh --dry-run` sets `blocked` on a CPU, so this comparison code
runs in CI even though the cuDNN kernel cannot.

  python -m pytest -q -n 0 tests/test_gpu.py                                       # on a GPU
  JAXSFT_GPU_TEST_KERNEL=blocked python -m pytest -q -n 0 tests/test_gpu.py        # anywhere
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.config import default_config
from jaxsft.models import Llama
from jaxsft.models import attention as attention_lib
from jaxsft.parallel import mesh as mesh_lib
from jaxsft.parallel.batch import batch_sharding, global_batch
from jaxsft.train import optim
from jaxsft.train.model_source import model_config_from
from jaxsft.train.run import run_settings
from jaxsft.train.state import init_train_state, state_shardings
from jaxsft.train.step import jit_train_step

KERNEL = os.environ.get('JAXSFT_GPU_TEST_KERNEL', 'cudnn')
REFERENCE = os.environ.get('JAXSFT_GPU_TEST_REFERENCE', 'xla')
DTYPE = 'bfloat16'  # cuDNN's flash attention serves bf16/fp16 only

if KERNEL == 'cudnn' and jax.default_backend() != 'gpu':
  pytestmark = pytest.mark.skip(
      reason=f'no GPU (the JAX backend is {jax.default_backend()!r}): cuDNN attention needs an '
             'NVIDIA GPU. scripts/device_check.sh runs this on a lent device; '
             'JAXSFT_GPU_TEST_KERNEL=blocked runs the same comparison on a CPU.')

# LLaMA-3.2-1B's head_dim (64) and GQA (2 queries per KV head); every kernel input a multiple
# of QLoRA's 64-input blocks.
ARCH = {'vocab_size': 512, 'hidden_size': 256, 'intermediate_size': 512, 'num_layers': 2,
        'num_heads': 4, 'num_kv_heads': 2, 'head_dim': 64, 'max_position_embeddings': 1024}
ROWS = 2
# 256 positions: several of cuDNN's 64/128-position tiles each way. The CPU dry run asks for
# fewer (the blocked kernel's compile grows with its block count).
SEQ = int(os.environ.get('JAXSFT_GPU_TEST_SEQ', '256'))

# bf16 tolerances, as relative L2 errors ||x - ref|| / ||ref||. Two correct bf16 kernels that
# round at different points land between 1e-3 and 1e-2; a wrong mask (attending across packed
# examples) is off by far more (the logits test checks that its tolerance would see one).
LOGITS_RTOL = 2e-2
LOSS_RTOL = 5e-3
UPDATE_RTOL = 5e-2      # the whole update tree
LEAF_RTOL = 0.15        # each leaf holding at least 1 % of the update's norm


def packed_batch(seed: int, rows: int = ROWS, length: int = SEQ) -> dict[str, np.ndarray]:
  """Rows of several packed examples of uneven lengths (16-89 tokens), padding at the end,
  the last two thirds of each example supervised."""
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros((rows, length), np.int32) for k in
           ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')}
  for r in range(rows):
    start, segment = 0, 1
    end_of_data = length - int(rng.integers(8, 40))
    while start < end_of_data:
      end = min(start + int(rng.integers(16, 90)), end_of_data)
      batch['segment_ids'][r, start:end] = segment
      batch['positions'][r, start:end] = np.arange(end - start)
      prompt = start + (end - start) // 3
      batch['loss_mask'][r, prompt:end] = 1
      start, segment = end, segment + 1
  batch['inputs'] = rng.integers(0, ARCH['vocab_size'], (rows, length), dtype=np.int32)
  batch['targets'] = rng.integers(0, ARCH['vocab_size'], (rows, length), dtype=np.int32)
  return batch


def relative_error(x, reference) -> float:
  x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
  assert np.isfinite(x).all() and np.isfinite(reference).all(), 'non-finite values'
  return float(np.linalg.norm(x - reference) / max(np.linalg.norm(reference), 1e-30))


def check_kernel_serves(implementation: str) -> None:
  """The model runs `implementation` itself: a kernel that cannot serve a call falls back to
  another with only a warning, and comparing the reference with itself would pass for
  nothing."""
  shape = (ROWS, SEQ, ARCH['num_heads'], ARCH['head_dim'])
  q = jax.ShapeDtypeStruct(shape, jnp.dtype(DTYPE))
  k = jax.ShapeDtypeStruct((*shape[:2], ARCH['num_kv_heads'], shape[3]), jnp.dtype(DTYPE))
  platform = attention_lib.host_platform()
  assert attention_lib.choose(implementation, platform, q, k) == (implementation, None)


def check_lowered(lowered, implementation: str) -> None:
  """cuDNN's fused attention is a custom call in the program for this device; no other
  kernel has one."""
  assert ('__cudnn$fmha' in lowered.as_text()) == (implementation == 'cudnn'), implementation


def run_config(method: str, implementation: str):
  config = default_config()
  config.model.architecture = dict(ARCH)
  config.model.dtype = DTYPE
  config.model.param_dtype = 'float32'
  config.model.attention_implementation = implementation
  config.lora.enabled = method in ('lora', 'qlora')
  config.lora.rank = 8
  config.lora.dropout = 0.0
  config.quant.kind = 'nf4' if method == 'qlora' else 'none'
  config.optim.learning_rate = 1e-2
  config.optim.warmup_steps = 0
  config.optim.weight_decay = 0.0
  config.optim.max_grad_norm = 0.0
  # Adam's first step is lr * g / (|g| + eps): with eps = 1 it is lr * g to first order, so
  # the update compares gradients (with the usual eps it would be lr * sign(g), all noise).
  config.optim.eps = 1.0
  config.batch_size = ROWS
  config.data.max_seq_len = SEQ
  return config


def train_steps(method: str, implementations: tuple[str, ...], batch: dict[str, np.ndarray]
                ) -> dict[str, tuple[dict, dict]]:
  """{implementation: (metrics, update of the trained params)} of one train step from the same
  initial state, built as the trainer builds it (`init_train_state`, `jit_train_step`, a
  one-device mesh)."""
  settings = run_settings(run_config(method, REFERENCE))
  model_config, _ = model_config_from(settings.model, settings.lora)
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = mesh_lib.DEFAULT_RULES
  optimizer, schedule = optim.make_optimizer(settings.optim, 10)
  parts = {'lora': settings.lora, 'quant': settings.quant}
  results = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # One init for both kernels (the attention kernel is no part of the state); each step
    # donates its input, so each starts from a fresh device copy of it.
    initial = init_train_state(model_config, optimizer, mesh, rules, seed=settings.seed,
                               **parts)
    initial_params = jax.device_get(initial.params)
    shardings = state_shardings(model_config, optimizer, mesh, rules, **parts)
    rows = batch_sharding(mesh)
    for implementation in implementations:
      step = jit_train_step(model_config.replace(attention_implementation=implementation),
                            optimizer, shardings, rows, settings.step, schedule)
      state = jax.device_put(initial, shardings, may_alias=False)
      device_batch = global_batch(batch, rows)
      lowered = step.lower(state, device_batch)
      check_lowered(lowered, implementation)
      state, metrics = lowered.compile()(state, device_batch)
      after, metrics = jax.device_get((state.params, metrics))
      update = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - b, after,
                                      initial_params)
      results[implementation] = metrics, update
  return results


@pytest.fixture(autouse=True)
def kernels_serve():
  for implementation in (KERNEL, REFERENCE):
    check_kernel_serves(implementation)


def test_logits_match_the_reference():
  batch = packed_batch(seed=1)
  settings = run_settings(run_config('full', REFERENCE))
  model_config, _ = model_config_from(settings.model, settings.lora)
  tokens = jnp.asarray(batch['inputs'])
  params = jax.jit(Llama(model_config).init)(jax.random.key(0), tokens)['params']
  logits = {}
  for implementation in (KERNEL, REFERENCE):
    model = Llama(model_config.replace(attention_implementation=implementation))
    lowered = jax.jit(model.apply).lower({'params': params}, tokens, batch['positions'],
                                         batch['segment_ids'])
    check_lowered(lowered, implementation)
    logits[implementation] = np.asarray(
        lowered.compile()({'params': params}, tokens, batch['positions'], batch['segment_ids']),
        np.float64)
  # Padding positions attend only to padding: defined, but no loss ever reads them.
  real = batch['segment_ids'] > 0
  error = relative_error(logits[KERNEL][real], logits[REFERENCE][real])
  print(f'logits {KERNEL} vs {REFERENCE}: relative L2 error {error:.2e}')
  assert error <= LOGITS_RTOL, error
  # The tolerance can see a mask mistake: packed examples attending to each other (the
  # reference over the same rows, each row taken as one example) are far outside it.
  unpacked = jax.jit(Llama(model_config).apply)({'params': params}, tokens,
                                                batch['positions'],
                                                np.minimum(batch['segment_ids'], 1))
  wrong_mask = relative_error(np.asarray(unpacked)[real], logits[REFERENCE][real])
  print(f'logits with a wrong mask (packed examples see each other): {wrong_mask:.2e}')
  assert wrong_mask > 5 * LOGITS_RTOL, wrong_mask


@pytest.mark.parametrize('method', ['full', 'lora', 'qlora'])
def test_train_step_matches_the_reference(method):
  batch = packed_batch(seed=2)
  results = train_steps(method, (KERNEL, REFERENCE), batch)
  (metrics, update), (ref_metrics, ref_update) = results[KERNEL], results[REFERENCE]
  loss_error = abs(float(metrics['loss']) - float(ref_metrics['loss'])) / float(
      ref_metrics['loss'])
  norm_error = abs(float(metrics['grad_norm']) - float(ref_metrics['grad_norm'])) / float(
      ref_metrics['grad_norm'])
  leaves = jax.tree_util.tree_leaves_with_path(update)
  ref_leaves = [leaf for _, leaf in jax.tree_util.tree_leaves_with_path(ref_update)]
  flat = np.concatenate([leaf.ravel() for _, leaf in leaves])
  ref_flat = np.concatenate([leaf.ravel() for leaf in ref_leaves])
  update_error = relative_error(flat, ref_flat)
  print(f'{method} {KERNEL} vs {REFERENCE}: loss {float(metrics["loss"]):.5f} vs '
        f'{float(ref_metrics["loss"]):.5f} (rel {loss_error:.1e}), grad norm rel '
        f'{norm_error:.1e}, update rel L2 {update_error:.2e}')
  assert np.linalg.norm(ref_flat) > 0, 'the reference step changed nothing'
  assert loss_error <= LOSS_RTOL, loss_error
  assert norm_error <= UPDATE_RTOL, norm_error
  assert update_error <= UPDATE_RTOL, update_error
  # LoRA's `a` gets no gradient on the first step (`b` starts at zero): those leaves are
  # zero on both sides and hold none of the norm.
  for (path, leaf), ref_leaf in zip(leaves, ref_leaves):
    if np.linalg.norm(ref_leaf) >= 0.01 * np.linalg.norm(ref_flat):
      error = relative_error(leaf, ref_leaf)
      assert error <= LEAF_RTOL, (jax.tree_util.keystr(path), error)
