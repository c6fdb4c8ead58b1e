"""jaxsft: supervised fine-tuning of LLaMA-family models in JAX/Flax.

The packages are the architecture's parts, each importing only the parts below it (the
contracts in `pyproject.toml`, checked by `lint-imports`; the map is in docs/design.md):

  cli, config, demo   the command line, the defaults it reads, the no-download demo
  eval                generation (KV cache), a model from a run or HF folder, metrics
  train               state, steps, optimizer, checkpoints, the run and its loop, plan, export
  data | interop      records -> packed rows | HF config, weights, PEFT adapters, presets
  models              the Linen LLaMA family, attention kernels, RoPE
  adapters            LoRA and 4-bit kernels, with one target matcher
  parallel            meshes, logical-axis rules, batch sharding, multi-host start-up
  errors | lazy       `UserError`, the one-line errors a user can fix | names imported on
                      first access
"""

import importlib
import warnings

__version__ = '0.1.0'

# The parts, each with its public API in its own `__all__` (imported when first asked for:
# `import jaxsft` alone loads none of them).
__all__ = ['adapters', 'data', 'errors', 'eval', 'interop', 'models', 'parallel', 'train']

# Import paths of jaxsft 0.1.0's README that moved into the parts above; they keep working
# for a while, with a warning that names the new path.
_MOVED = {'hf': 'jaxsft.interop.hf', 'sharding': 'jaxsft.parallel.mesh'}


def __getattr__(name: str):
  if name in __all__:
    return importlib.import_module(f'{__name__}.{name}')
  if name in _MOVED:
    warnings.warn(f'jaxsft.{name} moved to {_MOVED[name]}; import it from there.',
                  DeprecationWarning, stacklevel=2)
    module = globals()[name] = importlib.import_module(_MOVED[name])
    return module
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
