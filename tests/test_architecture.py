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


# Where the run's config (the CLI's ConfigDict) may be read section by section; everything
# below takes its part's settings (issue 25: 66 such reads before).
CONFIG_READERS = ('jaxsft/config.py', 'jaxsft/train/run.py', 'jaxsft/cli/', 'jaxsft/demo.py')
SECTIONS = ('model', 'lora', 'quant', 'optim', 'train', 'checkpoint', 'distributed', 'mesh',
            'demo', 'data')


def _config_section_reads(source: str) -> list[tuple[int, str]]:
  """`(line, expression)` of every `<...config>.<section>` attribute read: `config.lora`,
  `run.config.train`, `self.model.config.data`."""
  reads = []
  for node in ast.walk(ast.parse(source)):
    if not (isinstance(node, ast.Attribute) and node.attr in SECTIONS):
      continue
    owner = node.value
    name = owner.id if isinstance(owner, ast.Name) else \
        owner.attr if isinstance(owner, ast.Attribute) else ''
    if name == 'config' or name.endswith('_config') and name != 'model_config':
      reads.append((node.lineno, ast.unparse(node)))
  return reads


def test_the_detector_of_config_section_reads_finds_them():
  source = ('def f(config, run, data_config, model_config):\n'
            '  return (config.lora.rank, run.config.train.seed, data_config.max_seq_len,\n'
            '          model_config.hidden_size, self.model.config.data)\n')
  assert sorted(expr for _, expr in _config_section_reads(source)) == [
      'config.lora', 'run.config.train', 'self.model.config.data']


def test_only_the_run_and_the_cli_read_run_config_sections():
  offenders = []
  for path in MODULES:
    relative = str(path.relative_to(PACKAGE.parent))
    if relative.startswith(CONFIG_READERS):
      continue
    offenders += [f'{relative}:{line}: {expr}'
                  for line, expr in _config_section_reads(path.read_text())]
  assert not offenders, '\n'.join(offenders)
