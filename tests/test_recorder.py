"""Recording: resume after SIGKILL, never overwrite a finished proof, the user's loop between segments."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, load_manifest, record, run_cli, smoke_config

from pol_jax import build, challenge, data, proof, recorder, store, verifier

_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import smoke_config
from pol_jax import build, recorder, store
store.FLUSH_STATES = 1  # every state its own batch, so that the kill comes after some are durable
config = smoke_config({model!r}, steps=24, k=4)
train = build.dataset(config, "train")

def on_segment(step, metrics):
  if step == {kill_at}:
    os.kill(os.getpid(), signal.SIGKILL)

recorder.record({path!r}, build.program(config, train), train, build.plan(config), config=config.to_dict(),
                on_segment=on_segment)
"""


_RECORD_RUN = """
import sys
sys.path.insert(0, {tests!r})
from conftest import smoke_config
from pol_jax import build, recorder
config = smoke_config({model!r}, steps=24, k=4)
train = build.dataset(config, "train")
program = build.program(config, train)
print("recording", flush=True)
recorder.record({path!r}, program, train, build.plan(config), config=config.to_dict())
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  roots = {}
  for model in ("mlp", "cnn"):
    path = str(tmp_path_factory.mktemp(f"full-{model}") / "proof")
    # Semantic roots: ``root`` also covers Orbax's bookkeeping, which holds timestamps and paths.
    roots[model] = proof.semantic_root(record(path, smoke_config(model, steps=24, k=4)))
  return roots


@pytest.mark.parametrize("model, kill_at", [("mlp", 4), ("cnn", 12)])
def test_resume_after_sigkill_is_bit_identical(uninterrupted, tmp_path, model, kill_at):
  path = str(tmp_path / "proof")
  code = _KILLED_RUN.format(tests=os.path.join(ROOT, "tests"), model=model, kill_at=kill_at, path=path)
  killed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -9, killed.stderr
  assert not os.path.exists(os.path.join(path, proof.MANIFEST))
  assert os.path.exists(os.path.join(path, proof.RUN))
  durable = [s for b in store.batches(path) for s in store.read_batch_meta(path, b)["states"]]
  assert kill_at < 8 or durable, "the resume starts from a recorded state, not from the init"
  # What a save killed midway leaves: ours, and Orbax's (a partial proof begun by an older pol-jax).
  leftovers = [
    os.path.join(path, proof.CHECKPOINTS, name) for name in ("16.pol-jax-tmp-99-0", "20.orbax-checkpoint-tmp")
  ]
  for leftover in leftovers:
    os.makedirs(os.path.join(leftover, "state"), exist_ok=True)
    open(os.path.join(leftover, "state", "_METADATA"), "w").write("{")
  # The partial proof is refused, not verified.
  result = run_cli("experiments.verify", f"--proof={path}")
  assert result.returncode == 2 and "partial proof" in result.stderr, result.stderr
  resumed = record(path, smoke_config(model, steps=24, k=4))
  assert proof.semantic_root(resumed) == uninterrupted[model]
  assert not any(os.path.exists(leftover) for leftover in leftovers) and proof.validate_manifest(resumed)
  assert not os.path.exists(os.path.join(path, proof.RUN))


@pytest.mark.parametrize("model", ["mlp", "cnn"] if os.environ.get("POL_CRASH_KILLS") else ["mlp"])
def test_sigkill_at_random_moments_never_yields_an_accepted_partial_proof_and_resumes_bit_identically(
  uninterrupted, tmp_path, model
):
  """SIGKILL at uniformly random moments of the recording, resuming after each, many times.

  ``POL_CRASH_KILLS`` kills per model (default: 3, of the MLP run only; set, both models), at moments drawn from
  ``POL_CRASH_SEED`` (default: random, printed on failure). After every kill
  the directory must be refused as partial, or be the finished proof, the
  same as an uninterrupted run's; a finished proof starts a fresh chain.
  """
  kills = int(os.environ.get("POL_CRASH_KILLS", "3"))
  seed = int(os.environ.get("POL_CRASH_SEED", secrets.randbits(32)))
  rng = np.random.default_rng(seed)
  path = str(tmp_path / "proof")
  code = _RECORD_RUN.format(tests=os.path.join(ROOT, "tests"), model=model, path=path)

  def start():
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"recording\n", proc.stderr.read().decode()[-2000:]
    return proc

  proc, t0 = start(), time.perf_counter()
  assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
  window = time.perf_counter() - t0  # how long recording takes, imports excluded
  assert proof.semantic_root(load_manifest(path)) == uninterrupted[model]
  outcomes = {"partial": 0, "finished": 0}
  for i in range(kills):
    if os.path.exists(os.path.join(path, proof.MANIFEST)):
      shutil.rmtree(path)  # A finished proof: start the next chain from nothing.
    proc = start()
    time.sleep(rng.uniform(0.0, window))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    where = f"kill {i} of {kills}, POL_CRASH_SEED={seed}"
    try:
      manifest = proof.read_manifest(path)
    except proof.ProofError:  # refused: partial, or killed before anything was written
      outcomes["partial"] += 1
      continue
    outcomes["finished"] += 1  # the kill came after the proof was sealed
    assert proof.semantic_root(manifest) == uninterrupted[model], where
  if not os.path.exists(os.path.join(path, proof.MANIFEST)):
    proc = start()
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
  assert proof.semantic_root(load_manifest(path)) == uninterrupted[model], f"{outcomes}, POL_CRASH_SEED={seed}"
  assert not os.path.exists(os.path.join(path, proof.RUN))
  assert verifier.verify(path, *_rebuilt(model), challenge=challenge.All()).accepted
  print(
    f"\n{model}: {kills} kills at random moments, refused as partial after {outcomes['partial']}, "
    f"finished before the kill {outcomes['finished']}; every proof identical; POL_CRASH_SEED={seed}"
  )


def _rebuilt(model):
  config = smoke_config(model, steps=24, k=4)
  train = build.dataset(config, "train")
  return build.program(config, train), train


def test_resume_refuses_a_partial_proof_of_another_run(tmp_path):
  path = str(tmp_path / "proof")
  code = _KILLED_RUN.format(tests=os.path.join(ROOT, "tests"), model="mlp", kill_at=8, path=path)
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=300)
  with pytest.raises(proof.ProofError, match=r"run.json: config,programs: the partial proof .* is of another run"):
    record(path, smoke_config("mlp", steps=24, k=4, learning_rate=0.3))


def test_run_json_and_programs_are_committed_before_any_checkpoint(tmp_path, monkeypatch):
  # A fresh recording commits its start on the saver thread while the step
  # compiles; a killed run must still find run.json before any batch is saved.
  # Every state is its own batch here, saved from the saver thread, and the
  # hashing is slowed down: a start committed late or alongside would show.
  import threading
  import time

  path = str(tmp_path / "proof")
  seen, hashed_on = [], []
  flush, digests = store.Writer.flush, data.Dataset.digests

  def checked_flush(self):
    if self._pending:
      seen.append(sorted(os.listdir(path)))
    flush(self)

  def slow_digests(self, indices=None):
    hashed_on.append(threading.current_thread().name)
    time.sleep(0.5)
    return digests(self, indices)

  monkeypatch.setattr(store, "FLUSH_STATES", 1)
  monkeypatch.setattr(store.Writer, "flush", checked_flush)
  monkeypatch.setattr(data.Dataset, "digests", slow_digests)
  manifest = record(path, smoke_config("mlp", steps=24, k=4))
  assert len(seen) == 7 and all({proof.RUN, proof.PROGRAMS} <= set(names) for names in seen), seen
  assert hashed_on == ["pol-jax-saver"]
  assert manifest["dataset"]["merkle_root"] == load_manifest(path)["dataset"]["merkle_root"] is not None


def test_a_users_source_is_read_from_one_thread_only(tmp_path, monkeypatch):
  import threading

  config = smoke_config("mlp", steps=8, k=4)
  examples = build.dataset(config, "train")
  rows = [(examples.inputs[i], examples.labels[i]) for i in range(len(examples))]
  source = data.Source(examples.name, rows)
  read_on = set()
  example = data.Source.example

  def recorded_example(self, index):
    read_on.add(threading.current_thread().name)
    return example(self, index)

  monkeypatch.setattr(data.Source, "example", recorded_example)
  recorder.record(str(tmp_path / "proof"), build.program(config, examples), source, build.plan(config))
  assert read_on == {threading.current_thread().name}


def test_a_start_that_fails_on_the_saver_thread_stops_the_recording(tmp_path, monkeypatch):
  config = smoke_config("mlp", steps=24, k=4)
  train = build.dataset(config, "train")

  def unreadable(*args, **kwargs):
    raise OSError("data: unreadable")

  monkeypatch.setattr(type(train), "digests", unreadable)
  path = str(tmp_path / "proof")
  with pytest.raises(OSError, match="unreadable"):
    recorder.record(path, build.program(config, train), train, build.plan(config), config=config.to_dict())
  assert not os.path.exists(os.path.join(path, proof.MANIFEST))
  assert not store.batches(path), "no state may be saved before the start is committed"


def test_finished_proof_is_never_overwritten(honest, copy_of):
  p = copy_of(honest)
  before = load_manifest(p)["root"]
  with pytest.raises(recorder.ProofExistsError, match="never overwritten"):
    record(p, smoke_config())
  workdir = os.path.dirname(p)
  os.rename(p, os.path.join(workdir, "proof"))
  result = run_cli("experiments.train", "--config=experiments/configs/digits_mlp.py:smoke", f"--workdir={workdir}")
  assert result.returncode == 2, result.stdout + result.stderr
  assert "a finished proof is already there" in result.stderr and "Traceback" not in result.stderr
  assert load_manifest(os.path.join(workdir, "proof"))["root"] == before


def test_a_short_last_segment_verifies_with_its_own_recorded_program(tmp_path):
  config = smoke_config("mlp", steps=10, k=4)  # segments 0-4, 4-8, 8-10
  path = str(tmp_path / "proof")
  manifest = record(path, config)
  assert sorted(manifest["checkpoints"], key=int) == ["0", "4", "8", "10"]
  assert set(manifest["programs"]) == {"segment", "tail"}
  train = build.dataset(config, "train")
  verdict = verifier.verify(path, build.program(config, train), train, challenge=challenge.All())
  assert verdict.accepted, verdict.table()
  assert [(s.start, s.end) for s in verdict.segments] == [(0, 4), (4, 8), (8, 10)]


def test_the_users_loop_stays_the_users_evaluation_between_segments_changes_nothing(honest, tmp_path):
  config = smoke_config()
  train, test = build.dataset(config, "train"), build.dataset(config, "test")
  seen = []

  def evaluate(step, state, metrics):  # what a user's loop did between epochs: held-out accuracy, logging
    seen.append((step, build.evaluate(config, state, test), {k: np.shape(v) for k, v in metrics.items()}))

  manifest = recorder.record(
    str(tmp_path / "proof"), build.program(config, train), train, build.plan(config), config=config.to_dict(),
    on_state=evaluate,
  )  # fmt: skip
  assert [s for s, _, _ in seen] == [4, 8, 12] and all(0.0 <= a <= 1.0 for _, a, _ in seen), seen
  assert all(shapes == {"loss": (4,), "accuracy": (4,)} for _, _, shapes in seen), seen
  assert proof.semantic_root(manifest) == proof.semantic_root(load_manifest(honest))


def test_early_stopping_in_the_users_loop_leaves_a_complete_proof_of_the_steps_trained(honest, tmp_path):
  config = smoke_config()
  train, test = build.dataset(config, "train"), build.dataset(config, "test")
  best = {"accuracy": -1.0}

  def evaluate(step, state, metrics):  # stop when held-out accuracy stops improving, or at step 8 at the latest
    accuracy = build.evaluate(config, state, test)
    worse, best["accuracy"] = accuracy <= best["accuracy"], max(accuracy, best["accuracy"])
    return recorder.STOP if worse or step == 8 else None

  path = str(tmp_path / "proof")
  manifest = recorder.record(
    path, build.program(config, train), train, build.plan(config), config=config.to_dict(), on_state=evaluate
  )
  stopped = manifest["steps"]
  assert stopped in (4, 8) and sorted(manifest["checkpoints"], key=int) == [str(s) for s in range(0, stopped + 1, 4)]
  # The same states as the run that went on, and a proof that verifies on its own.
  full = load_manifest(honest)["checkpoints"]
  assert all(manifest["checkpoints"][s] == full[s] for s in manifest["checkpoints"]), (manifest["checkpoints"], full)
  verdict = verifier.verify(path, build.program(config, train), train, challenge=challenge.All())
  assert verdict.accepted and len(verdict.segments) == stopped // 4, verdict.table()
  assert proof.read_index_log(path, manifest).shape == (stopped, config.batch_size)
