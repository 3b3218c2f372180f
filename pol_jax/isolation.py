"""Runs functions in a child process under a wall-clock and a memory limit; JSON in, JSON out.

Internal to pol-jax (no stability promise); the public API is in ``pol_jax/__init__.py``.

``pol_jax.distributed`` judges every worker's proof this way: whatever an
upload makes a judgement do (raise, block on a FIFO, recurse without end,
allocate without bound, crash the interpreter) ends that child, and the
caller gets a one-line reason instead of a dead or hung process.

:func:`run` starts a child for one call. :class:`Server` starts one that sets
up once (imports, building a program) and then serves many jobs in turn,
each under its own time limit: a job that fails ends the child, only that
job gets the reason, and the next job gets a fresh child.

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

A :class:`Server`'s child reads one job per line on its standard input and
answers on a pipe of its own (``POL-JAX-BEGIN`` when the job's own set-up
is done, as ``ready()`` does, then ``POL-JAX-RESULT <json>``); its standard
output and error go to a log file, read only for the reason of a failure.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

_RESULT = "POL-JAX-RESULT "
_ERROR = "POL-JAX-ERROR "
_READY = "POL-JAX-READY"
_BEGIN = "POL-JAX-BEGIN"
_RETIRE = "POL-JAX-RETIRE"
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
      everything it started are killed. A :class:`Server`'s start-up and
      each of its jobs have this much each.
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
  raise fail(_reason(label, limits, code, error, err_path))


def _reason(label: str, limits: Limits, code: int | None, error: str | None, log: str) -> str:
  """Why a child that exited with ``code`` failed: its error line, else the last line of its log, in one line."""
  last = error or next((s for s in reversed(_read_lines(log, 1 << 16, tail=True)) if s.strip()), None) or "no output"
  last = last.strip()[:300]
  if code == _OUT_OF_MEMORY or any(sign in last.lower() for sign in _MEMORY_SIGNS):
    return f"{label} ran out of memory (limit {_gib(limits.memory_bytes)}): {last}"
  if code == -signal.SIGKILL:  # not ours (we kill only on timeout): the kernel's OOM killer, most likely
    return f"{label} ran out of memory (killed by SIGKILL)"
  if code is not None and code < 0:
    return f"{label} died of signal {signal.Signals(-code).name}: {last}"
  return f"{label} failed (exit status {code}): {last}"


class Server:
  """A child process that sets up once, then runs jobs one at a time, each under its own time limit.

  The child runs ``target(common)`` once (imports, building a program: the
  caller's set-up), which returns ``handler``; then ``handler(job, ready)``
  for each job given to :meth:`__call__`, in this child while it lives.
  ``ready()`` marks the end of the job's own set-up, as in :func:`run`.

  Containment is that of :func:`run`, per job: a job gets ``limits.seconds``
  of wall-clock from when it is handed over, and the child's address space
  is capped at ``limits.memory_bytes`` from its start. A job that raises,
  exhausts the memory, kills the interpreter or runs past its time ends the
  child with everything it started, raises :class:`Failed` (or
  :class:`SetupFailed`, before its ``ready()``) with :func:`run`'s reasons,
  and the next job starts a fresh child, which sets up again under a limit
  of ``limits.seconds`` of its own (:class:`SetupFailed` if it cannot). A
  job that fails before its ``ready()`` in a child that served jobs before
  runs once more in a fresh child, so a child that an earlier job left
  broken fails no other job. A child whose address space grew, over a job
  that succeeded, by more than half the room its set-up left under the
  limit is replaced too, so no job runs with less than half the room the
  first had.

  Not thread-safe: one call at a time. Use it as a context manager, or call
  :meth:`close`.

  >>> with Server("mod:make_handler", {"model": "mlp"}, Limits(60), scratch) as serve:  # doctest: +SKIP
  ...   results = [serve(job) for job in jobs]
  """

  def __init__(
    self,
    target: str,
    common: dict,
    limits: Limits,
    scratch: str,
    *,
    env: dict[str, str] | None = None,
    label: str = "child",
  ):
    """Args: as :func:`run`; ``common``, JSON-serialisable, is ``target``'s argument. Starts no child yet."""
    self.target, self.limits, self.scratch, self.env, self.label = target, limits, scratch, env, label
    self.starts = 0
    """Children started so far: 1 for a server whose jobs all succeeded."""
    self._common_path = os.path.join(scratch, "common.json")
    with open(self._common_path, "w") as f:
      json.dump({"target": target, "common": common}, f, allow_nan=False)
    self._proc: subprocess.Popen | None = None
    self._results: _Lines | None = None
    self._log = ""

  def __enter__(self) -> Server:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __call__(self, job: dict) -> dict:
    """Runs ``handler(job, ready)`` in the child (started first if there is none); returns the dict it returned.

    Raises:
      Failed: after the job's ``ready()``, with :func:`run`'s reasons.
      SetupFailed: before it, or the child cannot start.
    """
    line = json.dumps(job, allow_nan=False).encode() + b"\n"
    while True:
      fresh = self._proc is None
      if fresh:
        self._start()
      try:
        return self._run(line)
      except SetupFailed:
        # Before the job's ready(): the caller's doing in a fresh child. A child that served jobs before may have
        # been left broken by one of them (it died or hung between jobs): the job runs once more in a fresh child.
        if fresh:
          raise

  def _run(self, line: bytes) -> dict:
    deadline = time.monotonic() + self.limits.seconds
    try:
      self._proc.stdin.write(line)
      self._proc.stdin.flush()
    except OSError:  # it died after its last answer
      self._fail(False, why=f"{self.label} exited before it read a job")
    began, retire = False, False
    while True:
      got = self._results.next(deadline)
      if got is None and self._results.overflow:
        self._fail(began, why=f"{self.label} returned an unreadable result (a line over {_MAX_OUTPUT} bytes)")
      elif got is None:  # the end of the pipe (the child died), or the deadline
        self._fail(began, timed_out=not self._results.eof)
      elif got == _BEGIN:
        began = True
      elif got == _RETIRE:
        retire = True
      elif got.startswith(_RESULT):
        break
      elif got.startswith(_ERROR):
        self._fail(began, error=got[len(_ERROR) :])
    if retire:
      self._stop()
    try:
      return json.loads(got[len(_RESULT) :])
    except ValueError as e:
      self._stop()
      raise (Failed if began else SetupFailed)(f"{self.label} returned an unreadable result ({e})") from None

  def close(self) -> None:
    """Ends the child, if one runs, with everything it started."""
    self._stop()

  def _start(self) -> None:
    self.starts += 1
    self._log = os.path.join(self.scratch, f"log{self.starts}")
    read, write = os.pipe()
    try:
      with open(self._log, "wb") as log:
        self._proc = subprocess.Popen(
          [sys.executable, "-c", _LAUNCH, str(self.limits.memory_bytes), "--serve", self._common_path, str(write)],
          stdin=subprocess.PIPE,
          stdout=log,
          stderr=log,
          env=self.env,
          pass_fds=(write,),
          start_new_session=True,  # its own process group: a failure kills whatever it started too
        )
    except BaseException:
      os.close(read)
      raise
    finally:
      os.close(write)
    self._results = _Lines(read)
    got = self._results.next(time.monotonic() + self.limits.seconds)
    if got != _READY:
      error = got[len(_ERROR) :] if got and got.startswith(_ERROR) else None
      self._fail(False, error=error, timed_out=got is None and not self._results.eof)

  def _fail(self, began: bool, *, error: str | None = None, timed_out: bool = False, why: str | None = None):
    """Ends the child and raises why it failed: ``Failed`` after the job's ``ready()``, else ``SetupFailed``."""
    fail = Failed if began else SetupFailed
    if timed_out:
      self._stop()
      raise fail(f"{self.label} timed out after {self.limits.seconds:g} s")
    if why is None:  # it is exiting (an error line, or the end of its pipe): its status tells a MemoryError or a signal
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        pass
    code = self._stop()
    raise fail(why or _reason(self.label, self.limits, code, error, self._log))

  def _stop(self) -> int | None:
    """Kills the child's process group; returns the child's exit status (None if it had to be killed)."""
    if self._proc is None:
      return None
    proc, self._proc = self._proc, None
    code = proc.poll()
    _kill_group(proc)
    try:
      proc.stdin.close()
    except OSError:
      pass
    self._results.close()
    return code


class _Lines:
  """Lines from a pipe, each read by a deadline; at most ``_MAX_OUTPUT`` bytes to a line."""

  def __init__(self, fd: int):
    self.fd, self.buffer, self.eof, self.overflow = fd, b"", False, False
    self.poll = select.poll()
    self.poll.register(fd, select.POLLIN)

  def next(self, deadline: float) -> str | None:
    """The next line, without its newline; None at the end of the pipe (``eof``), a line too long (``overflow``)
    or the deadline."""
    while b"\n" not in self.buffer:
      left = deadline - time.monotonic()
      self.overflow = len(self.buffer) > _MAX_OUTPUT
      if self.eof or self.overflow or left <= 0:
        return None
      if self.poll.poll(max(1, int(left * 1000))):
        chunk = os.read(self.fd, 1 << 16)
        self.eof = not chunk
        self.buffer += chunk
    line, _, self.buffer = self.buffer.partition(b"\n")
    return line.decode("utf-8", "replace")

  def close(self) -> None:
    if self.fd >= 0:
      os.close(self.fd)
      self.fd = -1


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


def _address_space() -> int:
  """This process's address space in bytes (0 where ``/proc`` does not say)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return 0


def _roomy(base: int, limit: int) -> bool:
  """Whether the address space is within half the room that ``base`` left under ``limit`` (after a collection)."""
  if _address_space() - base <= (limit - base) // 2:
    return True
  gc.collect()  # what the job left in reference cycles (about 50 ms with JAX loaded: only when it matters)
  return _address_space() - base <= (limit - base) // 2


def _serve(common_path: str, fd: int) -> None:
  """A :class:`Server`'s child: sets up, then answers each job line on standard input on the pipe ``fd``."""
  out = os.fdopen(fd, "wb")

  def send(line: str) -> None:
    out.write(line.encode() + b"\n")
    out.flush()

  try:
    with open(common_path) as f:
      request = json.load(f)
    handler = _load(request["target"])(request["common"])
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    gc.collect()
    base = _address_space()
    send(_READY)
    while line := sys.stdin.buffer.readline():
      result = json.dumps(handler(json.loads(line), lambda: send(_BEGIN)), allow_nan=False)
      if base and limit != resource.RLIM_INFINITY and not _roomy(base, limit):
        send(_RETIRE)  # the next job gets a fresh child, with all the room
      send(_RESULT + result)
  except MemoryError as e:
    _last_word(send, _ERROR + f"MemoryError: {str(e).splitlines()[0] if str(e) else ''}"[:500])
    os._exit(_OUT_OF_MEMORY)  # no clean-up that could allocate
  except Exception as e:  # noqa: BLE001 - reported to the parent as one line.
    traceback.print_exc()
    _last_word(send, _ERROR + f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])
    sys.stderr.flush()
    os._exit(1)  # no clean-up that could hang (threads the job started)


def _last_word(send: Callable[[str], None], line: str) -> None:
  try:
    send(line)
  except (OSError, ValueError):  # the parent is gone: nobody to tell
    pass


def main() -> None:
  """The child: runs the job in ``sys.argv[1]`` and prints its result as one JSON line (``--serve``: many jobs)."""
  if sys.argv[1] == "--serve":
    _serve(sys.argv[2], int(sys.argv[3]))
    return
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
