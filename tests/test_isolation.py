"""A child that hangs, raises, exhausts its memory or dies is reported in one line; the parent goes on.

A server's child that fails a job costs that job only: the next runs in a fresh child.

The targets below run in the child (``python -m`` imports this file there,
with the tests directory on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time

import numpy as np
import pytest

from pol_jax import isolation

TESTS = os.path.dirname(os.path.abspath(__file__))


def _echo(job, ready):
  ready()
  return {"got": job["x"] + 1}


def _hang(job, ready):
  """Starts a grandchild that would outlive it, records its pid, then blocks forever."""
  sleeper = subprocess.Popen(["sleep", "3600"])
  with open(job["pid_file"], "w") as f:
    f.write(str(sleeper.pid))
  ready()
  time.sleep(3600)


def _raise(job, ready):
  ready()
  raise KeyError("checkpoints/4")


def _allocate(job, ready):
  ready()
  return {"sum": int(np.ones(job["bytes"], np.uint8).sum())}


def _abort(job, ready):
  ready()
  os.abort()


def _fail_before_ready(job, ready):
  raise ValueError("cannot build the program")


@pytest.fixture
def child(monkeypatch, tmp_path):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))

  def run(target, job=None, seconds=60.0, memory=4 << 30):
    scratch = tmp_path / f"scratch{len(os.listdir(tmp_path))}"
    scratch.mkdir()
    limits = isolation.Limits(seconds, memory)
    return isolation.run(f"test_isolation:{target}", job or {}, limits, str(scratch), label="judgement")

  return run


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(") ")[1][0] != "Z"
  except FileNotFoundError:
    return False


def test_a_result_comes_back_as_json(child):
  assert child("_echo", {"x": 41}) == {"got": 42}


def test_a_hanging_child_is_killed_with_everything_it_started(child, tmp_path):
  pid_file = tmp_path / "pid"
  t0 = time.perf_counter()
  with pytest.raises(isolation.Failed, match=r"^judgement timed out after 3 s$"):
    child("_hang", {"pid_file": str(pid_file)}, seconds=3)
  assert time.perf_counter() - t0 < 30
  pid = int(pid_file.read_text())
  deadline = time.monotonic() + 10
  while _alive(pid) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not _alive(pid), "the child's own child survived the timeout"


def test_an_exception_is_reported_by_its_last_line(child):
  with pytest.raises(isolation.Failed, match=r"^judgement failed \(exit status 1\): KeyError: 'checkpoints/4'$"):
    child("_raise")


def test_a_memory_blow_up_is_stopped_by_the_limit(child):
  assert child("_allocate", {"bytes": 64 << 20}, memory=2 << 30) == {"sum": 64 << 20}
  with pytest.raises(isolation.Failed, match=r"^judgement ran out of memory \(limit 2 GiB\): MemoryError"):
    child("_allocate", {"bytes": 16 << 30}, memory=2 << 30)


def test_a_child_killed_by_a_signal_says_which(child):
  with pytest.raises(isolation.Failed, match=r"^judgement died of signal SIGABRT"):
    child("_abort")


def test_a_failure_before_ready_is_the_callers(child):
  with pytest.raises(isolation.SetupFailed, match="ValueError: cannot build the program"):
    child("_fail_before_ready")


def test_limits_are_validated():
  with pytest.raises(ValueError, match="seconds > 0"):
    isolation.Limits(0, 1)
  with pytest.raises(ValueError, match="memory_bytes >= 0"):
    isolation.Limits(1, -1)


# A server's jobs: each does what its "do" names (the targets run in the child, as above).
_KEPT = []


def _serving(common):
  """The server's set-up: fails if told to; the handler does what each job says."""
  if common.get("fail"):
    raise ValueError("cannot build the program")
  base = isolation._address_space()

  def handler(job, ready):
    if job["do"] == "before ready":
      raise ValueError("cannot read the start state")
    ready()
    if job["do"] == "keep":  # leaves more than half the room the set-up left mapped (untouched) after it returns
      limit = resource.getrlimit(resource.RLIMIT_AS)[0]
      _KEPT.append(np.empty((limit - base) // 2 + (64 << 20), np.uint8))
    elif job["do"] == "exit after":  # returns, then its child dies between this job and the next
      threading.Timer(0.2, os._exit, (1,)).start()
    elif job["do"] != "echo":
      {"hang": _hang, "raise": _raise, "allocate": _allocate, "abort": _abort}[job["do"]](job, lambda: None)
    return {"pid": os.getpid(), "got": job.get("x", 0) + 1}

  return handler


@pytest.fixture
def server(monkeypatch, tmp_path):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
  servers = []

  def make(common=None, seconds=60.0, memory=4 << 30):
    scratch = tmp_path / f"server{len(servers)}"
    scratch.mkdir()
    limits = isolation.Limits(seconds, memory)
    servers.append(isolation.Server("test_isolation:_serving", common or {}, limits, str(scratch), label="judgement"))
    return servers[-1]

  yield make
  for s in servers:
    s.close()


def test_a_server_sets_up_once_and_a_failed_job_costs_only_itself(server, tmp_path):
  """Jobs that hang, raise, exhaust the memory or die each get their one-line reason; every job after runs."""
  serve = server(seconds=5, memory=2 << 30)
  pid_file = tmp_path / "pid"
  failures = [
    ({"do": "hang", "pid_file": str(pid_file)}, r"^judgement timed out after 5 s$"),
    ({"do": "raise"}, r"^judgement failed \(exit status 1\): KeyError: 'checkpoints/4'$"),
    ({"do": "allocate", "bytes": 16 << 30}, r"^judgement ran out of memory \(limit 2 GiB\): MemoryError"),
    ({"do": "abort"}, r"^judgement died of signal SIGABRT"),
  ]
  first = serve({"do": "echo", "x": 1})
  assert first["got"] == 2
  assert serve({"do": "allocate", "bytes": 64 << 20})["pid"] == first["pid"]  # one child while every job succeeds
  pids = {first["pid"]}
  for x, (job, reason) in enumerate(failures):
    t0 = time.perf_counter()
    with pytest.raises(isolation.Failed, match=reason):
      serve(job)
    assert time.perf_counter() - t0 < 30
    after = serve({"do": "echo", "x": x})  # a fresh child, with the whole time limit
    assert after["got"] == x + 1 and after["pid"] not in pids, (job, after)
    pids.add(after["pid"])
  assert serve.starts == 1 + len(failures)
  pid = int(pid_file.read_text())
  deadline = time.monotonic() + 10
  while _alive(pid) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not _alive(pid), "the hung job's own child survived the timeout"
  assert not any(_alive(p) for p in pids - {after["pid"]}), "a failed job's child survived it"
  serve.close()
  assert not _alive(after["pid"])


def test_a_server_job_that_keeps_its_memory_gets_the_next_job_a_fresh_child(server):
  serve = server(memory=4 << 30)
  first = serve({"do": "echo"})
  assert serve({"do": "keep"})["pid"] == first["pid"]  # it succeeds, in the same child, which then retires
  assert serve({"do": "echo"})["pid"] != first["pid"]
  assert serve.starts == 2


def test_a_server_that_cannot_set_up_is_the_callers(server):
  with pytest.raises(isolation.SetupFailed, match="ValueError: cannot build the program"):
    server({"fail": True})({"do": "echo"})
  serve = server()
  with pytest.raises(isolation.SetupFailed, match="ValueError: cannot read the start state"):
    serve({"do": "before ready"})
  assert serve({"do": "echo", "x": 41})["got"] == 42


def test_a_server_child_that_dies_between_jobs_fails_no_job(server):
  serve = server()
  first = serve({"do": "exit after"})
  deadline = time.monotonic() + 10
  while _alive(first["pid"]) and time.monotonic() < deadline:
    time.sleep(0.05)
  after = serve({"do": "echo", "x": 1})
  assert after["got"] == 2 and after["pid"] != first["pid"] and serve.starts == 2
