"""Runs one function in a child process under a wall-clock and a memory limit; JSON in, JSON out.

``pol_jax.distributed`` judges every worker's proof this way: whatever an
upload makes a judgement do (raise, block on a FIFO, recurse without end,
allocate without bound, crash the interpreter) ends that child, and the
caller gets a one-line reason instead of a dead or hung process.

The parent names the function (``"module:function"``, importable in the
child: the parent's choice, never the input's) and writes the job as JSON
to a file in a private scratch directory. The child is ``python -c`` of a
launcher that sets ``RLIMIT_AS`` before anything else runs (in the child's
own code, not through ``preexec_fn``, which is unsafe in a parent that runs
threads, as JAX's does), then runs :func:`main`, which calls
``target(job, ready)`` and prints one line ``POL-JAX-RESULT <json>`` on
standard output. ``ready()`` marks the end of the target's own set-up
(imports, building a program, loading the caller's state): a failure before
it is the caller's (:class:`SetupFailed`), after it the input's
(:class:`Failed`). The child runs in a session of its own, so a timeout
kills it with everything it started. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable

_RESULT = "POL-JAX-RESULT "
_ERROR = "POL-JAX-ERROR "
_READY = "POL-JAX-READY"
_OUT_OF_MEMORY = 3  # the child's exit status after a MemoryError
_MAX_OUTPUT = 64 << 20  # bytes of the child's standard output read back
_MEMORY_SIGNS = ("memoryerror", "bad_alloc", "out of memory", "cannot allocate memory", "unable to allocate")

# Caps the address space before anything is imported, then runs this module's main().
_LAUNCH = (
  "import resource, runpy, sys; n = int(sys.argv[1]); hard = resource.getrlimit(resource.RLIMIT_AS)[1]; "
  "n = n if hard == resource.RLIM_INFINITY or 0 < n <= hard else hard; "
  "n and resource.setrlimit(resource.RLIMIT_AS, (n, hard)); "
  "sys.argv = sys.argv[:1] + sys.argv[2:]; runpy.run_module('pol_jax.isolation', run_name='__main__', alter_sys=True)"
)


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one child may use.

  Attributes:
    seconds: wall-clock seconds, start-up included; then the child and
      everything it started are killed.
    memory_bytes: the child's address space (``RLIMIT_AS``); 0 for no limit.
      Virtual, not resident, memory: JAX's CPU runtime maps about 1 GiB it
      does not touch, and CUDA reserves address space beyond any limit that
      leaves it usable, so on GPU give 0 and rely on the time limit.
  """

  seconds: float = 600.0
  memory_bytes: int = 8 << 30

  def __post_init__(self):
    if not self.seconds > 0:
      raise ValueError(f"Expected seconds > 0, got seconds={self.seconds}.")
    if self.memory_bytes < 0:
      raise ValueError(f"Expected memory_bytes >= 0, got memory_bytes={self.memory_bytes}.")


class Failed(Exception):
  """The child failed after ``ready()``: the input's doing. The message is one line."""


class SetupFailed(Exception):
  """The child failed before ``ready()``: the caller's doing (a target that cannot build, limits too small)."""


def run(
  target: str,
  job: dict,
  limits: Limits,
  scratch: str,
  *,
  env: dict[str, str] | None = None,
  label: str = "child",
) -> dict:
  """Runs ``target(job, ready)`` in a child process; returns the dict it returned.

  Args:
    target: ``"module:function"``, importable in the child.
    job: its argument, JSON-serialisable.
    limits: time and memory.
    scratch: a directory only the caller writes, for the job and the output.
    env: the child's environment (default: this process's).
    label: what the reasons call the child: ``"judgement timed out after 5 s"``.

  Raises:
    Failed: after ``ready()``: ``"<label> timed out after N s"``,
      ``"<label> ran out of memory (...)"``, ``"<label> failed: <last line>"``.
    SetupFailed: the same reasons, before ``ready()``.
  """
  job_path = os.path.join(scratch, "job.json")
  with open(job_path, "w") as f:
    json.dump({"target": target, "job": job}, f, allow_nan=False)
  out_path, err_path = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
  with open(out_path, "wb") as out, open(err_path, "wb") as err:
    proc = subprocess.Popen(
      [sys.executable, "-c", _LAUNCH, str(limits.memory_bytes), job_path],
      stdin=subprocess.DEVNULL,
      stdout=out,
      stderr=err,
      env=env,
      start_new_session=True,  # its own process group: a timeout kills whatever it started too
    )
    try:
      code = proc.wait(timeout=limits.seconds)
      timed_out = False
    except subprocess.TimeoutExpired:
      code, timed_out = None, True
    finally:
      _kill_group(proc)
  lines = _read_lines(out_path, _MAX_OUTPUT)
  ready = _READY in lines
  fail = Failed if ready else SetupFailed
  if timed_out:
    raise fail(f"{label} timed out after {limits.seconds:g} s")
  result = next((line[len(_RESULT) :] for line in lines if line.startswith(_RESULT)), None)
  if code == 0 and result is not None:
    try:
      return json.loads(result)
    except ValueError as e:
      raise fail(f"{label} returned an unreadable result ({e})") from None
  error = next((line[len(_ERROR) :] for line in lines if line.startswith(_ERROR)), None)
  stderr = _read_lines(err_path, 1 << 16, tail=True)
  last = error or next((s for s in reversed(stderr) if s.strip()), None) or "no output"
  last = last.strip()[:300]
  if code == _OUT_OF_MEMORY or any(sign in last.lower() for sign in _MEMORY_SIGNS):
    raise fail(f"{label} ran out of memory (limit {_gib(limits.memory_bytes)}): {last}")
  if code == -signal.SIGKILL:  # not ours (we kill only on timeout): the kernel's OOM killer, most likely
    raise fail(f"{label} ran out of memory (killed by SIGKILL)")
  if code is not None and code < 0:
    raise fail(f"{label} died of signal {signal.Signals(-code).name}: {last}")
  raise fail(f"{label} failed (exit status {code}): {last}")


def _gib(n: int) -> str:
  return f"{n / (1 << 30):g} GiB" if n else "none"


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  try:
    proc.wait(timeout=30)
  except subprocess.TimeoutExpired:  # stuck in the kernel (a dead network filesystem): leave it
    pass


def _read_lines(path: str, limit: int, tail: bool = False) -> list[str]:
  with open(path, "rb") as f:
    if tail:
      f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
    data = f.read(limit)
  return data.decode("utf-8", "replace").splitlines()


def _load(target: str) -> Callable:
  module, sep, name = target.partition(":")
  if not sep or not module or not name.isidentifier():
    raise ValueError(f"target {target!r}: expected 'package.module:function'")
  fn = getattr(importlib.import_module(module), name, None)
  if not callable(fn):
    raise ValueError(f"target {target!r}: no such function")
  return fn


def _ready() -> None:
  print(_READY, flush=True)


def main() -> None:
  """The child: runs the job in ``sys.argv[1]`` and prints its result as one JSON line."""
  try:
    with open(sys.argv[1]) as f:
      request = json.load(f)
    result = _load(request["target"])(request["job"], _ready)
    line = json.dumps(result, allow_nan=False)
  except MemoryError as e:
    print(_ERROR + f"MemoryError: {str(e).splitlines()[0] if str(e) else ''}"[:500], flush=True)
    os._exit(_OUT_OF_MEMORY)  # no clean-up that could allocate
  except Exception as e:  # noqa: BLE001 - reported to the parent as one line.
    traceback.print_exc()
    print(_ERROR + f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500], flush=True)
    sys.exit(1)
  print(_RESULT + line, flush=True)


if __name__ == "__main__":
  main()
