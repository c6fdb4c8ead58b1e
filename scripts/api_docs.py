"""The API reference: every public name of jaxsft's packages checked for a docstring, then HTML
pages rendered from the docstrings by pdoc.

  python scripts/api_docs.py [--out build/api] [PACKAGE ...]

The packages are jaxsft and its parts (`PACKAGES`; others may be named on the command line).
Their public names are those in each package's `__all__`, and only those: a package without
`__all__` is an error. A name is documented when:

* a class has a docstring of its own: not one inherited from a base class, nor the signature
  that `dataclasses` (also Flax's dataclasses and Linen modules) or `namedtuple` write into
  `__doc__` when the class has none (`Point(x: int, y: int)`);
* a function (or a wrapped one, such as a `jax.jit` function) has a docstring, not merely the
  docstring of its type;
* a module (a submodule named in `__all__`) has a module docstring;
* anything else (a constant, a type alias, a `functools.partial`, a callable instance) has a
  variable docstring: a string literal right after its assignment in the package's
  `__init__.py`, which is where pdoc reads it and the package's page shows it. At run time such
  a value carries only the docstring of its type, and a `# comment` cannot be read, so a
  constant documented only by a comment (or in the module it is imported from) fails.

Every name at fault is printed, one `package.name: reason` per line, and the exit status is 1;
nothing is built then. Otherwise pdoc renders one page per package (docstrings as Markdown with
Google-style `Args:` / `Returns:` sections, which is what jaxsft's docstrings are written in:
backticks for code, `*` lists) into `--out`, offline and on the CPU, in a few seconds.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import os
import re
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path

PACKAGES = ('jaxsft', 'jaxsft.models', 'jaxsft.adapters', 'jaxsft.interop', 'jaxsft.data',
            'jaxsft.parallel', 'jaxsft.train', 'jaxsft.eval')

# Python 3.12's `type X = ...` statement; absent before.
_TYPE_ALIAS = getattr(ast, 'TypeAlias', ())


def _quiet_offline_cpu() -> None:
  """Before JAX or `datasets` loads: the CPU backend (no accelerator memory taken), no network."""
  for key, value in (('JAX_PLATFORMS', 'cpu'), ('XLA_PYTHON_CLIENT_PREALLOCATE', 'false'),
                     ('HF_HUB_OFFLINE', '1'), ('HF_DATASETS_OFFLINE', '1'),
                     ('TRANSFORMERS_OFFLINE', '1'), ('TF_CPP_MIN_LOG_LEVEL', '2'),
                     ('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')):
    os.environ.setdefault(key, value)


def _text(doc: object) -> str:
  return doc.strip() if isinstance(doc, str) else ''


def _class_docstring(cls: type) -> str:
  """The class's own docstring; '' when it has none or only a generated one."""
  doc = _text(cls.__dict__.get('__doc__'))
  generated = dataclasses.is_dataclass(cls) or (issubclass(cls, tuple) and hasattr(cls, '_fields'))
  if generated and re.fullmatch(rf'{re.escape(cls.__name__)}(\(.*\))?', doc, re.S):
    return ''
  return doc


def _variable_docstrings(module: types.ModuleType) -> dict[str, str]:
  """The string literals right after a module-level assignment, by the assigned name (as pdoc
  reads them)."""
  try:
    source = inspect.getsource(module)
  except (OSError, TypeError):
    return {}
  body = ast.parse(source).body
  docstrings = {}
  for node, following in zip(body, body[1:]):
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
      target = node.targets[0]
    elif isinstance(node, ast.AnnAssign) and node.simple:
      target = node.target
    elif isinstance(node, _TYPE_ALIAS):
      target = node.name
    else:
      continue
    if (isinstance(target, ast.Name) and isinstance(following, ast.Expr)
        and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)
        and following.value.value.strip()):
      docstrings[target.id] = following.value.value
  return docstrings


def _fault(module: types.ModuleType, name: str, variable_docs: dict[str, str]) -> str | None:
  """Why `module.name` is not documented, or None when it is."""
  try:
    obj = getattr(module, name)
  except AttributeError:
    try:  # a submodule named in __all__ but not imported by the package
      obj = importlib.import_module(f'{module.__name__}.{name}')
    except ImportError:
      return 'in __all__ but not defined'
  if inspect.isclass(obj):
    if _class_docstring(obj):
      return None
    generated = _text(obj.__dict__.get('__doc__'))
    generated = generated if len(generated) <= 60 else generated[:57] + '...'
    return 'class without a docstring' + (f' (only the generated {generated!r})' if generated
                                          else '')
  if inspect.ismodule(obj):
    return None if _text(obj.__doc__) else 'module without a docstring'
  if inspect.isroutine(obj) or hasattr(obj, '__wrapped__'):
    doc = _text(getattr(obj, '__doc__', None))
    return None if doc and doc != _text(type(obj).__doc__) else 'function without a docstring'
  if name in variable_docs:
    return None
  return (f'{type(obj).__name__} value without a variable docstring (a string literal right '
          f'after `{name} = ...` in {module.__name__}/__init__.py)')


def find_undocumented(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
  """Every public name at fault in `packages`, as `package.name` -> reason (a package that
  cannot be imported or has no `__all__` as `package` -> reason), in the packages' order."""
  faults: dict[str, str] = {}
  for package in packages:
    try:
      module = importlib.import_module(package)
    except Exception as error:  # pylint: disable=broad-except
      faults[package] = f'cannot be imported: {type(error).__name__}: {error}'
      continue
    public = module.__dict__.get('__all__')
    if public is None:
      faults[package] = 'no __all__'
      continue
    if isinstance(public, str) or not all(isinstance(name, str) for name in public):
      faults[package] = '__all__ is not a list of names'
      continue
    variable_docs = _variable_docstrings(module)
    for name in public:
      fault = _fault(module, name, variable_docs)
      if fault:
        faults[f'{package}.{name}'] = fault
  return faults


def build(packages: Sequence[str], out: Path) -> None:
  """pdoc's HTML pages of `packages` (their submodules left out) into `out`."""
  import pdoc  # pylint: disable=import-outside-toplevel
  import pdoc.render  # pylint: disable=import-outside-toplevel

  pdoc.render.configure(docformat='google', show_source=False, search=True)
  # pdoc walks each package's subpackages; keep only the packages named.
  only = '!(?!(' + '|'.join(re.escape(package) for package in packages) + ')$)'
  out.mkdir(parents=True, exist_ok=True)
  # The packages name each other's modules (jaxsft.eval lists jaxsft.eval.generate's names):
  # pdoc warns that it documents each module once, which is what we want.
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='The module specification', category=UserWarning)
    pdoc.pdoc(*packages, only, output_directory=out)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0])
  parser.add_argument('--out', type=Path, default=Path('build/api'),
                      help='folder of the HTML pages (default: build/api)')
  parser.add_argument('packages', nargs='*', default=list(PACKAGES),
                      help=f'packages to check and render (default: {" ".join(PACKAGES)})')
  args = parser.parse_args(argv)
  _quiet_offline_cpu()
  faults = find_undocumented(args.packages)
  if faults:
    print(f'api docs: {len(faults)} undocumented public name(s) or package(s) (what counts: '
          'scripts/api_docs.py):', file=sys.stderr)
    for name, reason in faults.items():
      print(f'{name}: {reason}', file=sys.stderr)
    return 1
  build(args.packages, args.out)
  count = sum(len(importlib.import_module(package).__all__) for package in args.packages)
  print(f'api docs: {count} documented names in {len(args.packages)} packages -> '
        f'{args.out / "index.html"}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
