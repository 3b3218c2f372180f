"""A child that hangs, raises, exhausts its memory or dies is reported in one line; the parent goes on.

The targets below run in the child (``python -m`` imports this file there,
with the tests directory on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import subprocess
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
