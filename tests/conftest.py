"""Shared test setup: 8 fake CPU devices, tiny HF reference models, the shared data folder."""

import atexit
import os
import pathlib
import shutil
import tempfile

import jax

# Must happen before any JAX backend starts: sharding tests need 8 devices on one CPU.
jax.config.update('jax_num_cpu_devices', 8)

# In-process tests run tiny shapes whose time goes to XLA:CPU's compiles; LLVM at -O0 spends
# about a quarter less CPU time on them (test_generate + test_quant: 287 -> 223 user seconds,
# test_packing_equivalence + test_state: 100 -> 65). Codegen only: the HLO passes and
# floating-point semantics (no fast math) are those of -O2. The `jaxsft` processes the
# user-path tests start do not inherit it (`user_path.env` drops XLA_FLAGS): they run as users do.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

# One on-disk compilation cache for the session, shared by the xdist workers (they inherit the
# variable from the controller, which removes the folder at exit) and the `jaxsft` processes the
# user-path tests start: the README's commands compile the demo model's programs in several
# processes. Speed only: a hit loads the executable the same compile would have produced.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxsft-tests-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))

# Tokenizer folders converted once per session (see `llama2_tokenizer`), shared the same way.
if 'JAXSFT_TEST_TOKENIZERS' not in os.environ:
  os.environ['JAXSFT_TEST_TOKENIZERS'] = tempfile.mkdtemp(prefix='jaxsft-tests-tokenizers-')
  atexit.register(shutil.rmtree, os.environ['JAXSFT_TEST_TOKENIZERS'], True)

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1] / '..' / 'shared' / 'data'


# The longest tests first: two xdist workers then finish together instead of one waiting on a
# long test that started last.
LONGEST_FIRST = ('test_readme.py::test_readme_commands', 'test_multiprocess.py',
                 'test_benchmark.py', 'test_device_check.py', 'test_checkpoint.py',
                 'test_humaneval.py')


def pytest_collection_modifyitems(items):
  def rank(item):
    return next((i for i, key in enumerate(LONGEST_FIRST) if key in item.nodeid),
                len(LONGEST_FIRST))
  items.sort(key=rank)


def shared_data(relative: str) -> pathlib.Path:
  """Path of a file under ../shared/data, or skip the test with a clear message."""
  path = (SHARED_DATA / relative).resolve()
  if not path.exists():
    pytest.skip(f'test data {relative} not found under {SHARED_DATA.resolve()} (the shared data '
                'folder sits beside the project checkout; see ../shared/data/README.md)')
  return path


def llama2_tokenizer() -> pathlib.Path:
  """LLaMA-2's tokenizer folder (../shared/data/tokenizers/llama2: `tokenizer.model` and its
  config) with the fast tokenizer's `tokenizer.json` beside them, as HF hub folders ship it.
  transformers converts `tokenizer.model` in about 10 s, in every process that loads a folder
  without `tokenizer.json` (the `jaxsft` runs tests start included); here once per session."""
  source = shared_data('tokenizers/llama2')
  folder = pathlib.Path(os.environ['JAXSFT_TEST_TOKENIZERS']) / 'llama2'
  if not (folder / 'tokenizer.json').exists():
    import transformers  # pylint: disable=import-outside-toplevel
    staging = folder.with_name(f'llama2.{os.getpid()}')
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(staging)
    # The folder's own files over what save_pretrained wrote (its tokenizer_config.json
    # drops `add_bos_token`): only tokenizer.json is new.
    for name in os.listdir(source):
      shutil.copy(source / name, staging / name)
    try:
      os.rename(staging, folder)
    except OSError:  # another xdist worker put its copy first
      shutil.rmtree(staging, ignore_errors=True)
  return folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('TRANSFORMERS_OFFLINE', '1')
