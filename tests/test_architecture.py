"""The layout shows the architecture, and its rules hold (docs/design.md, "The map"):
the import contracts of `pyproject.toml` pass `lint-imports` (layers, forbidden imports, no
cycles at any depth, imports inside functions included); no jaxsft module imports jaxsft inside
a function, except the CLI's per-command dispatch (kept lazy so `jaxsft --help` is fast); every
module is small; every package says what it owns and what it may import."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'jaxsft'
MODULES = sorted(PACKAGE.rglob('*.py'))
MAX_LINES = 400
PARTS = ('parallel', 'adapters', 'models', 'interop', 'data', 'train', 'eval')


def test_import_contracts_hold():
  lint_imports = pathlib.Path(sys.executable).parent / 'lint-imports'
  if not lint_imports.exists():
    pytest.skip('lint-imports is not installed (pip install -e ".[test]" brings it)')
  result = subprocess.run([str(lint_imports)], cwd=PACKAGE.parent, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert '0 broken' in result.stdout


def _function_level_jaxsft_imports(path: pathlib.Path) -> list[str]:
  found = []

  def visit(node, function):
    for child in ast.iter_child_nodes(node):
      inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else \
          function
      if function and isinstance(child, ast.ImportFrom) and (
          child.level or (child.module or '').split('.')[0] == 'jaxsft'):
        found.append(f'{path.relative_to(PACKAGE.parent)}:{child.lineno} in {function}()')
      if function and isinstance(child, ast.Import) and any(
          alias.name.split('.')[0] == 'jaxsft' for alias in child.names):
        found.append(f'{path.relative_to(PACKAGE.parent)}:{child.lineno} in {function}()')
      visit(child, inner)

  visit(ast.parse(path.read_text()), None)
  return found


def test_no_jaxsft_import_inside_a_function_outside_the_cli_dispatch():
  inside = [hit for path in MODULES if 'cli' not in path.relative_to(PACKAGE).parts
            for hit in _function_level_jaxsft_imports(path)]
  assert not inside, inside
  # The CLI's lazy imports are in its command modules, not in `main` and the parser.
  assert not _function_level_jaxsft_imports(PACKAGE / 'cli' / '__init__.py')


def test_every_module_is_small():
  long = {str(p.relative_to(PACKAGE.parent)): n for p in MODULES
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, long


@pytest.mark.parametrize('part', PARTS)
def test_each_part_says_what_it_owns_and_may_import(part):
  docstring = ast.get_docstring(ast.parse((PACKAGE / part / '__init__.py').read_text()))
  assert docstring and 'import' in docstring, part


def test_only_the_cli_reads_the_config_defaults():
  readers = [str(p.relative_to(PACKAGE.parent)) for p in MODULES
             if 'cli' not in p.relative_to(PACKAGE).parts and any(
                 isinstance(node, ast.ImportFrom) and node.module == 'jaxsft.config'
                 for node in ast.walk(ast.parse(p.read_text())))]
  assert not readers, readers
