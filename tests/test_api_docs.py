"""`scripts/api_docs.py`, the API reference `.ci/run` builds (issue 25): it flags every public
name (a package's `__all__`) without a docstring of its own, a dataclass's generated signature
not counting, and every jaxsft package passes it (one test per package, so a failure names the
package and lists its names at fault, one per line)."""

import importlib.util
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'scripts' / 'api_docs.py'


def _load_script():
  spec = importlib.util.spec_from_file_location('api_docs', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


api_docs = _load_script()

# A package with every kind of public name, documented and not.
_SYNTHETIC = '''
"""A package for the checker's test."""

import dataclasses
import functools

from {name}.inner import Documented, documented_function, inherits_its_docstring

__all__ = ['Documented', 'documented_function', 'inherits_its_docstring', 'undocumented_function',
           'NoDocstring', 'Fields', 'FieldsDocumented', 'LIMIT', 'UNDOCUMENTED_LIMIT', 'partial',
           'inner', 'missing']

LIMIT = 3
"""A constant with a variable docstring."""

UNDOCUMENTED_LIMIT = 4  # a comment is no docstring

partial = functools.partial(int, base=2)


def undocumented_function(x):
  return x


class NoDocstring:
  pass


@dataclasses.dataclass
class Fields:
  a: int
  b: str = ''


@dataclasses.dataclass
class FieldsDocumented:
  """Fields, documented."""
  a: int
'''

_INNER = '''
"""The submodule."""


class Documented(ValueError):
  """A documented class."""


class inherits_its_docstring(Documented):
  pass


def documented_function():
  """Does nothing."""
'''


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
  """Two packages on sys.path: `<name>` (names at fault and not) and `<name>_bare` (no
  `__all__`); unique names, dropped from sys.modules afterwards."""
  name = f'apidocs_synthetic_{tmp_path.name.replace("-", "_")}'
  package = tmp_path / name
  package.mkdir()
  (package / '__init__.py').write_text(textwrap.dedent(_SYNTHETIC.format(name=name)))
  (package / 'inner.py').write_text(textwrap.dedent(_INNER))
  (tmp_path / f'{name}_bare').mkdir()
  (tmp_path / f'{name}_bare' / '__init__.py').write_text('"""No __all__."""\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  yield name
  for module in [m for m in sys.modules if m.startswith(name)]:
    del sys.modules[module]


def test_the_checker_flags_every_undocumented_public_name(synthetic):
  faults = api_docs.find_undocumented([synthetic, f'{synthetic}_bare'])
  assert set(faults) == {f'{synthetic}.{name}' for name in (
    'inherits_its_docstring', 'undocumented_function', 'NoDocstring', 'Fields',
    'UNDOCUMENTED_LIMIT', 'partial', 'missing')} | {f'{synthetic}_bare'}, faults
  assert 'generated' in faults[f'{synthetic}.Fields']  # its `Fields(a: int, b: str = '')`
  assert faults[f'{synthetic}_bare'] == 'no __all__'


def test_the_command_lists_the_names_at_fault_and_fails(synthetic, tmp_path):
  done = subprocess.run([sys.executable, str(SCRIPT), '--out', str(tmp_path / 'api'), synthetic],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
                        env={'PYTHONPATH': str(tmp_path), 'PATH': '/usr/bin:/bin'})
  assert done.returncode == 1, done.stdout + done.stderr
  lines = done.stderr.splitlines()
  assert f'{synthetic}.Fields: class without a docstring (only the generated ' \
         "\"Fields(a: int, b: str = '')\")" in lines, done.stderr
  assert f'{synthetic}.undocumented_function: function without a docstring' in lines
  assert not (tmp_path / 'api').exists()  # nothing is built


def test_a_documented_package_is_rendered(tmp_path, monkeypatch):
  pytest.importorskip('pdoc', reason='pdoc is in the test extra: pip install -e ".[test]"')
  name = f'apidocs_documented_{tmp_path.name.replace("-", "_")}'
  (tmp_path / name).mkdir()
  (tmp_path / name / '__init__.py').write_text(textwrap.dedent('''
    """A documented package."""

    __all__ = ['answer']


    def answer():
      """Returns `42`.

      Returns:
        The answer.
      """
      return 42
  '''))
  done = subprocess.run([sys.executable, str(SCRIPT), '--out', str(tmp_path / 'api'), name],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
                        env={'PYTHONPATH': str(tmp_path), 'PATH': '/usr/bin:/bin'})
  assert done.returncode == 0, done.stdout + done.stderr
  assert f'api docs: 1 documented names in 1 packages -> {tmp_path / "api"}' in done.stdout
  page = (tmp_path / 'api' / f'{name}.html').read_text()
  assert 'Returns <code>42</code>' in page


@pytest.mark.parametrize('package', api_docs.PACKAGES)
def test_every_public_name_of_jaxsft_has_a_docstring(package):
  faults = api_docs.find_undocumented([package])
  assert not faults, (f'{package}: public names without a docstring (the rule is in '
                      'scripts/api_docs.py):\n' + '\n'.join(f'  {name}: {reason}'
                                                            for name, reason in faults.items()))
