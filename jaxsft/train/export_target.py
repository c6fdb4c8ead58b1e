"""Where `jaxsft export` may write, and writing there without harm: the rules of
`jaxsft.train.export` as checks on a folder (`check_target`), and the staging folder beside the
target whose files become the export (`Staging`).

Standard library only (numpy and JAX only for the multi-process broadcast of a refusal, once JAX
is loaded; `gguf` to recognise an earlier GGUF export), so the CLI checks `--out` before it
imports JAX: a refusal costs no model load. `--format gguf` writes one file (`check_file_target`),
staged beside it and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from jaxsft.errors import UserError

FORMATS = ('merged', 'peft', 'gguf')
MARKER = 'jaxsft_export.json'
GGUF_MARKER_KEY = 'jaxsft.export'  # a jaxsft GGUF export's record, in the file's metadata
# The files an export writes, and those that change how transformers or PEFT read a folder: one
# of these that no earlier export of the same format wrote would be overwritten or loaded with
# the export (a stale `tokenizer.model` beside a new `tokenizer.json`, an `adapter_config.json`
# beside merged weights, which makes `from_pretrained` load an adapter). Spelled out (they hold
# `interop.hf.TOKENIZER_FILES`) so that checking `--out` does not import JAX.
EXPORT_FILES = frozenset({
    MARKER, 'config.json', 'model.safetensors', 'model.safetensors.index.json',
    'adapter_config.json', 'adapter_model.safetensors', 'tokenizer.json', 'tokenizer_config.json',
    'special_tokens_map.json', 'tokenizer.model', 'vocab.json', 'merges.txt', 'added_tokens.json',
    'chat_template.jinja', 'chat_template.json', 'generation_config.json'})
_SHARD = re.compile(r'model-\d{5}-of-\d{5}\.safetensors')
# What a run writes in its work directory; an export goes into none of them.
RUN_FILES = ('checkpoints', 'checkpoints_bad', 'config.json', 'metrics.jsonl', 'tensorboard',
             'summary.json', 'samples.jsonl', 'benchmarks', 'demo', '.jaxsft.lock',
             'trackers.json', 'wandb', 'mlruns')

_T = TypeVar('_T')


# ---------------------------------------------------------------------------------------------
# Where an export may write


def owned_name(name: str) -> bool:
  """Whether `name` is a file an export writes or one that changes how its folder loads."""
  return name in EXPORT_FILES or bool(_SHARD.fullmatch(name))


def check_target(out: str, fmt: str, workdir: str,
                 protected: Sequence[tuple[str | None, str]] = ()) -> list[str]:
  """Refuses (`UserError`) an `out` a `fmt` export may not write to; returns the files of the
  earlier export of that format it replaces (none for a new or foreign folder).

  Args:
    out: the `--out` folder.
    workdir: the run's work directory (its own files are refused).
    protected: `(folder, what it is)` that `out` may be neither equal to nor inside.
  """
  target = os.path.realpath(out)
  suggestion = os.path.join(workdir, 'export', fmt)
  if os.path.lexists(out) and not os.path.isdir(out):
    raise UserError(f'--out {out} is a file, not a folder; pass a new folder (or an earlier '
                    f'jaxsft {fmt} export), e.g. {suggestion}.')
  _check_location(out, target, workdir, protected, suggestion)
  if not os.path.isdir(target):
    return []
  marker = _read_marker(target, out)
  if marker is not None and marker['format'] != fmt:
    raise UserError(f'--out {out} holds a jaxsft {marker["format"]} export, which a {fmt} '
                    'export there would mix with (the folder would load as neither); pass '
                    f'another folder, e.g. {out.rstrip(os.sep)}-{fmt}.')
  previous = marker['files'] if marker is not None else []
  try:
    present = os.listdir(target)
  except OSError as error:
    raise UserError(f'cannot read --out {out}: {error.strerror}; pass a folder you can read and '
                    'write.') from error
  clash = sorted(n for n in present if owned_name(n) and n != MARKER and n not in previous)
  if clash:
    more = f' and {len(clash) - 3} more' if len(clash) > 3 else ''
    raise UserError(f'--out {out} already holds {", ".join(clash[:3])}{more}, which no earlier '
                    f'jaxsft {fmt} export there wrote; pass a new or empty folder, or move '
                    'those files away.')
  return previous


def check_file_target(out: str, workdir: str,
                      protected: Sequence[tuple[str | None, str]] = ()) -> None:
  """`--format gguf`: refuses (`UserError`) an `out` that is not a `.gguf` path, lies where
  `check_target` refuses a folder, or names an existing file that no jaxsft GGUF export wrote
  (one that did is replaced)."""
  target = os.path.realpath(out)
  suggestion = os.path.join(workdir, 'export', 'model.gguf')
  if not out.endswith('.gguf') or os.path.isdir(target):
    raise UserError(f'--out {out}: --format gguf writes one file; pass a new path ending in '
                    f'.gguf, e.g. {suggestion}.')
  _check_location(out, target, workdir, protected, suggestion)
  if os.path.lexists(out) and not _is_gguf_export(target):
    raise UserError(f'--out {out} exists and is not a GGUF file that jaxsft exported; pass a '
                    f'new path, e.g. {suggestion}, or move it away.')


def _is_gguf_export(path: str) -> bool:
  """Whether `path` is a GGUF file carrying jaxsft's export record (`GGUF_MARKER_KEY`)."""
  try:
    import gguf  # pylint: disable=import-outside-toplevel
    return GGUF_MARKER_KEY in gguf.GGUFReader(path).fields
  except Exception:  # pylint: disable=broad-except  # not GGUF, unreadable: not ours
    return False


def _check_location(out: str, target: str, workdir: str,
                    protected: Sequence[tuple[str | None, str]], suggestion: str) -> None:
  """The rules shared by folders and files: under a folder, outside the run's own files and
  the `protected` folders."""
  ancestor = os.path.dirname(target)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise UserError(f'--out {out} lies under {ancestor}, which is a file, not a folder; pass a '
                    f'path, e.g. {suggestion}.')
  if '://' not in workdir:  # a bucket work directory holds no local folder
    run_dir = os.path.realpath(workdir)
    if target == run_dir:
      raise UserError(f'--out {out} is the work directory {workdir} itself, whose files are the '
                      f"run's; pass a new path, e.g. {suggestion}.")
    if _inside(target, run_dir):
      top = os.path.relpath(target, run_dir).split(os.sep)[0]
      if top in RUN_FILES:
        raise UserError(f'--out {out} lies in {os.path.join(workdir, top)}, which the run '
                        f'writes; pass a new path, e.g. {suggestion}.')
  for folder, what in protected:
    if folder and os.path.isdir(folder) and _inside(target, os.path.realpath(folder)):
      where = 'is' if target == os.path.realpath(folder) else 'lies inside'
      raise UserError(f'--out {out} {where} {what} {folder}, which an export must not change; '
                      f'pass a new path, e.g. {suggestion}.')


def _inside(path: str, folder: str) -> bool:
  """Whether resolved `path` is resolved `folder` or lies under it."""
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _read_marker(target: str, out: str) -> dict[str, Any] | None:
  """The marker of the earlier export in `target`, its `files` reduced to plain names of export
  files (a marker cannot make an export remove anything else), or None."""
  path = os.path.join(target, MARKER)
  if not os.path.lexists(path):
    return None
  try:
    with open(path) as f:
      marker = json.load(f)
    if marker['format'] not in FORMATS or not isinstance(marker['files'], list):
      raise ValueError('unexpected contents')
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise UserError(f'--out {out} holds a {MARKER} that is not a jaxsft export record '
                    f'({error}); move it away or pass another folder.') from error
  marker['files'] = [n for n in marker['files'] if isinstance(n, str)
                     and n == os.path.basename(n) and owned_name(n) and n != MARKER]
  return marker


def recorded_folders(workdir: str) -> list[tuple[str | None, str]]:
  """The base and tokenizer folders the work directory's config.json names (none if it has
  none): read without loading the run, so that the common mistake is refused at once."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    return [(config['model'].get('path'), "the run's base model folder"),
            (config['data'].get('tokenizer'), "the run's tokenizer folder")]
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return []


# ---------------------------------------------------------------------------------------------
# Writing beside the target, then into it


class Staging:
  """The folder an export is written to, beside its target (same file system: renames are
  atomic), and the move of its files into the target."""

  def __init__(self, out: str):
    self.out = out
    self.target = os.path.realpath(out)
    self.temp = staging_path(out)
    parent = os.path.dirname(self.target)
    self._created: list[str] = []  # parents this export made, removed again if it fails
    with write_errors(out):
      missing = parent
      while not os.path.lexists(missing):
        self._created.append(missing)
        missing = os.path.dirname(missing)
      os.makedirs(parent, exist_ok=True)
      shutil.rmtree(self.temp, ignore_errors=True)  # left by a killed export with this pid
      os.mkdir(self.temp)

  def commit(self, record: dict[str, Any], previous: list[str]) -> None:
    """Puts the written files in place; `previous`: the earlier export's, which they replace."""
    names = sorted(os.listdir(self.temp))
    unknown = [n for n in names if not owned_name(n) or n == MARKER]
    if unknown:  # the rules above would not recognise these as the export's
      raise RuntimeError(f'export wrote files it does not own: {unknown}')
    if os.path.isdir(self.target):  # the target changed while the run loaded?
      clash = [n for n in names if os.path.lexists(os.path.join(self.target, n))
               and n not in previous]
      if clash:
        raise UserError(f'--out {self.out} gained {", ".join(clash[:3])} during the export; '
                        'pass a new or empty folder, or move those files away.')
    _write_json(os.path.join(self.temp, MARKER), {**record, 'files': names})
    with write_errors(self.out):
      if not os.path.lexists(self.target) or not os.listdir(self.target):
        try:  # a new or empty target: one atomic rename
          os.rename(self.temp, self.target)
          self._created.clear()
          return
        except OSError:
          if not os.path.isdir(self.target):
            raise
      # Beside other files, one by one. First a marker listing the earlier export's files and
      # the new ones: an interrupted move leaves files that the next export still recognises.
      interim = os.path.join(self.temp, f'{MARKER}.interim')
      _write_json(interim, {**record, 'files': sorted(set(previous) | set(names)),
                            'complete': False})
      os.replace(interim, os.path.join(self.target, MARKER))
      for name in names:
        os.replace(os.path.join(self.temp, name), os.path.join(self.target, name))
      for name in sorted(set(previous) - set(names)):  # the earlier export's stale files
        if os.path.lexists(os.path.join(self.target, name)):
          os.remove(os.path.join(self.target, name))
      os.replace(os.path.join(self.temp, MARKER), os.path.join(self.target, MARKER))
      self._created.clear()

  def clean_up(self) -> None:
    """Removes the staging folder, and on failure the parents this export created."""
    shutil.rmtree(self.temp, ignore_errors=True)
    for folder in self._created:  # innermost first
      try:
        os.rmdir(folder)
      except OSError:
        break


def _write_json(path: str, value: Any) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)


def staging_path(out: str) -> str:
  """The folder an export to `out` is written to first: beside the resolved target."""
  parent, name = os.path.split(os.path.realpath(out))
  return os.path.join(parent, f'.{name}.jaxsft-tmp-{os.getpid()}')


@contextlib.contextmanager
def write_errors(out: str) -> Iterator[None]:
  """Turns an `OSError` while writing the export into a one-line `UserError` naming `out`."""
  try:
    yield
  except OSError as error:
    where = f' ({error.filename})' if error.filename else ''
    raise UserError(f'cannot write the export to {out}: {error.strerror or error}{where}; pass '
                    'a folder you can write to.') from error


def _process() -> tuple[int, int]:
  """(process index, process count); (0, 1) when JAX is not loaded yet, as a multi-process run
  loads it (`jax.distributed`) before it exports."""
  jax = sys.modules.get('jax')
  return (jax.process_index(), jax.process_count()) if jax is not None else (0, 1)


def on_writer(check: Callable[[], _T]) -> _T | None:
  """`check()` on process 0, the one that writes (None elsewhere); a refusal there is raised on
  every process, so none waits on the others in a gather."""
  index, count = _process()
  if count == 1:
    return check() if index == 0 else None
  problem, result = None, None
  if index == 0:
    try:
      result = check()
    except UserError as error:
      problem = error
  # pylint: disable=import-outside-toplevel
  import numpy as np
  from jax.experimental import multihost_utils
  refused = int(multihost_utils.broadcast_one_to_all(np.int32(problem is not None)))
  if problem is not None:
    raise problem
  if refused:
    raise UserError('process 0 refused the export target; its error says why.')
  return result
