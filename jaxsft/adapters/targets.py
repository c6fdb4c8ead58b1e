"""Which kernels an adaptation applies to: one matcher for LoRA (`lora.targets`) and 4-bit
quantization (`quant.targets`), so the two settings always read a target list the same way.

A target is matched against a kernel's module path (`layers/mlp/down_proj` for the path
`('layers', 'mlp', 'down_proj', 'kernel')`):
  - a plain name (`q_proj`, PEFT's `target_modules` style) matches that path component;
  - anything else is a regular expression searched in the module path (`self_attn/(q|v)_proj`);
  - `all-linear` is every projection but the LM head and a mixture-of-experts router. PEFT's
    `all-linear` is every `nn.Linear` but the LM head, which in transformers leaves out the
    experts (stored as one `[E, out, in]` parameter per projection) and the router (a bare
    weight) alike; jaxsft's includes the experts, and `gate` adapts the router.
Only `kernel` leaves are ever targets (embeddings, norms and biases are not), except for
`lora.modules_to_save`, which reads the same way over RMSNorm `scale` leaves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from jaxsft.errors import UserError

ALL_LINEAR = 'all-linear'
# The default of `lora.targets` and `quant.targets`: every linear projection of the decoder
# (embeddings, norms, the LM head and a router stay as they are); `gate_up_proj` is the experts'
# gate and up projections of a mixture-of-experts layer (`jaxsft.models.moe`).
DEFAULT_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj',
                   'gate_up_proj')
_PLAIN_NAME = re.compile(r'^[A-Za-z0-9_]+$')


def is_router(path: Sequence[str]) -> bool:
  """Whether `path` is a mixture-of-experts router's kernel (`.../mlp/gate/kernel`)."""
  return tuple(path[-3:]) == ('mlp', 'gate', 'kernel')


def is_expert(path: Sequence[str]) -> bool:
  """Whether `path` is an expert projection's kernel (`.../mlp/experts/down_proj/kernel`),
  one `[E, in, out]` array for every expert of the layer."""
  return len(path) >= 3 and path[-3] == 'experts'


def module_path(path: Sequence[str]) -> str:
  """`('layers', 'mlp', 'down_proj', 'kernel')` -> `'layers/mlp/down_proj'`."""
  return '/'.join(path[:-1])


def target_matcher(targets: Sequence[str] | str, setting: str = 'lora.targets',
                   leaf: str = 'kernel') -> Callable[[Sequence[str]], bool]:
  """A predicate over parameter paths (tuples of keys): True for the targeted `leaf`s
  (kernels, or norm scales). `setting` names the config entry in the error for an empty
  list."""
  if isinstance(targets, str):
    targets = [targets]
  if not targets:
    raise UserError(f'{setting} is empty; name the projections, e.g. '
                    f"['q_proj', 'v_proj'] or '{ALL_LINEAR}'.")
  patterns = []
  for target in targets:
    if target == ALL_LINEAR:
      patterns.append(lambda path: path[-2] != 'lm_head' and not is_router(path))
    elif _PLAIN_NAME.match(target):
      patterns.append(lambda path, t=target: t in path[:-1])
    else:
      try:
        regex = re.compile(target)
      except re.error as error:
        raise UserError(f'{setting}: {target!r} is neither a module name nor a valid regular '
                        f'expression ({error}).') from None
      patterns.append(lambda path, r=regex: bool(r.search(module_path(path))))

  def matches(path: Sequence[str]) -> bool:
    return path[-1] == leaf and any(p(path) for p in patterns)

  return matches
