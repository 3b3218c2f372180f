"""Untrusted workers on a local Ray cluster: wrong updates rejected, honest ones accepted, the run replayable.

One Ray cluster and four worker actors serve every test (the behaviour is
chosen per run). Runs are tiny: an MLP, 2 rounds of 4 local steps.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, smoke_config

from experiments import distributed as experiment
from pol_jax import distributed, proof

ROUNDS, STEPS, K, WORKERS = 2, 4, 2, 4


@pytest.fixture(scope="module")
def cluster():
  import ray

  ray.init(num_cpus=2, object_store_memory=100 << 20, include_dashboard=False, log_to_driver=False)
  config = smoke_config("mlp")
  config.steps = ROUNDS * STEPS
  make = functools.partial(experiment.build_worker, config.to_dict())
  engine = distributed.RayEngine(["honest"] * WORKERS, make, config.to_dict(), timeout=60)
  program, train = make()
  yield {"engine": engine, "config": config, "program": program, "train": train, "ray": ray}
  engine.shutdown()
  ray.shutdown()


def coordinate(cluster, workdir, behaviour="honest", defence="pol", dispatch=None, **setup):
  engine = cluster["engine"]
  engine.behaviours = [behaviour] + ["honest"] * (WORKERS - 1)
  engine.reset()
  s = distributed.Setup(
    seed=0, workers=WORKERS, rounds=ROUNDS, steps=STEPS, k=K, batch_size=cluster["config"].batch_size,
    runner="scan", defence=defence, **setup,
  )  # fmt: skip
  return distributed.coordinate(str(workdir), s, cluster["program"], cluster["train"], dispatch or engine)


def same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def honest_only(cluster, tmp_path_factory):
  """The run with only the honest workers 1..3 (worker 0 never submits)."""
  engine = cluster["engine"]

  def without_worker_0(r, state, assignments, dirs):
    out = engine(r, state, {w: a for w, a in assignments.items() if w}, dirs)
    return {**out, 0: "not in this run"}

  return coordinate(cluster, tmp_path_factory.mktemp("honest-only"), dispatch=without_worker_0)["state"]


# The check that must reject worker 0's submission, per behaviour (stale submits nothing in its first round).
REJECTED_BY = {
  "random": "replay",
  "sign-flip": "replay",
  "scale": "replay",
  "lazy": "replay",
  "free-rider": "assignment",
  "stale": "assignment",
  "wrong-data": "data order",
  "spoof": "replay",
}


def test_every_byzantine_behaviour_has_an_expected_check():
  assert set(REJECTED_BY) == set(distributed.BEHAVIOURS) - {"honest"}


@pytest.mark.parametrize("behaviour", list(REJECTED_BY))
def test_each_byzantine_update_is_rejected_and_the_run_equals_the_honest_workers_run(
  cluster, honest_only, tmp_path, behaviour
):
  result = coordinate(cluster, tmp_path, behaviour)
  for r in result["rounds"]:
    byzantine, *honest = r["judgements"]
    assert all(j["status"] == "accepted" for j in honest), r
    if behaviour == "stale" and r["round"] == 0:
      assert byzantine["status"] == "dropped", r
    else:
      assert byzantine["status"] == "rejected" and byzantine["check"] == REJECTED_BY[behaviour], byzantine
    assert r["aggregated"] == [1, 2, 3]
  assert same(result["state"], honest_only), "the final state differs from the run with only the honest workers"


def test_without_verification_a_byzantine_worker_hurts_accuracy(cluster, tmp_path):
  from experiments import build

  config = cluster["config"]
  test = build.dataset(config, "test")
  accuracy = {}
  for defence in ("pol", "none"):
    state = coordinate(cluster, tmp_path / defence, "random", defence)["state"]
    accuracy[defence] = build.evaluate(config, state, test)
  assert accuracy["none"] < accuracy["pol"] - 0.1, accuracy


def test_a_crashed_worker_is_dropped_and_the_round_completes(cluster, honest_only, tmp_path):
  t0 = time.perf_counter()
  result = coordinate(cluster, tmp_path, "crash")
  assert all(r["judgements"][0]["status"] == "dropped" for r in result["rounds"])
  assert "crashed" in result["rounds"][0]["judgements"][0]["detail"]
  assert same(result["state"], honest_only)
  # The coordinator's record re-aggregates to its states; a record naming other proofs does not.
  setup = distributed.Setup(seed=0, workers=WORKERS, rounds=ROUNDS, steps=STEPS, k=K, batch_size=32, runner="scan")
  assert distributed.audit(str(tmp_path), setup, cluster["program"]) == []
  path = tmp_path / distributed.COORDINATOR / distributed.ROUNDS
  rounds = json.loads(path.read_text())
  rounds[1]["aggregated"] = [1, 2]
  path.write_text(json.dumps(rounds))
  assert distributed.audit(str(tmp_path), setup, cluster["program"]) == [
    "round 1: the recorded state is not the aggregate of the proofs the round names"
  ]
  assert time.perf_counter() - t0 < 120


def test_a_worker_past_the_deadline_is_dropped(cluster, honest_only, tmp_path):
  engine = cluster["engine"]
  engine.timeout, engine.slow_seconds = 5.0, 60.0
  try:
    result = coordinate(cluster, tmp_path, "slow")
  finally:
    engine.timeout, engine.slow_seconds = 60.0, 0.0
  assert all("timed out" in r["judgements"][0]["detail"] for r in result["rounds"])
  assert same(result["state"], honest_only)


def test_malformed_and_oversized_proofs_are_rejected_without_harm(cluster, tmp_path):
  honest = coordinate(cluster, tmp_path / "run")
  s = distributed.Setup(seed=0, workers=WORKERS, rounds=ROUNDS, steps=STEPS, k=K, batch_size=32, runner="scan")
  assignment = s.assignment(0, 1)
  good = distributed.worker_dir(str(tmp_path / "run" / "rounds"), 0, 1)
  start = distributed.starting_at(cluster["program"].init(jax.random.key(0)))(None)
  args = (assignment, start, cluster["program"].step, cluster["train"])
  judgement, _ = distributed.judge(good, *args, max_bytes=1000)
  assert judgement.status == "rejected" and judgement.check == "size", judgement
  bad = tmp_path / "garbage"
  bad.mkdir()
  (bad / proof.MANIFEST).write_text('{"schema": 1, "steps": 1e309}')
  judgement, _ = distributed.judge(str(bad), *args, max_bytes=1 << 20)
  assert judgement.status == "rejected" and judgement.check == "integrity", judgement
  assert "manifest.json" in judgement.detail
  assert len(honest["rounds"]) == ROUNDS


def test_a_killed_coordinator_resumes_to_the_same_final_state(tmp_path):
  """SIGKILL after the first round; --nofresh resumes. Workers in-process (--local), so the test owns no cluster."""
  args = [
    sys.executable, "-m", "experiments.distributed", "--config=experiments/configs/digits_mlp.py:smoke",
    "--local", "--defences=pol", "--rounds=2", "--steps=4", "--k=2", "--workers=2", "--behaviour=sign-flip",
  ]  # fmt: skip
  whole = tmp_path / "whole"  # the uninterrupted run, in this process
  kwargs = dict(workers=2, byzantine=1, behaviour="sign-flip", rounds=2, steps=4, k=2, defences=("pol",), local=True)
  experiment.run(smoke_config("mlp"), str(whole), **kwargs)
  killed = tmp_path / "killed"
  proc = subprocess.Popen([*args, f"--workdir={killed}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  rounds = killed / "pol" / distributed.COORDINATOR / distributed.ROUNDS
  deadline = time.monotonic() + 240
  while not (rounds.exists() and len(json.loads(rounds.read_text())) >= 1) and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert len(json.loads(rounds.read_text())) < 2, "the coordinator finished before it could be killed"
  resumed = subprocess.run(
    [*args, "--nofresh", f"--workdir={killed}"], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  digests = [
    [r["state_digest"] for r in json.loads((d / "pol" / distributed.COORDINATOR / distributed.ROUNDS).read_text())]
    for d in (whole, killed)
  ]
  assert digests[0] == digests[1]


def test_a_rejected_worker_can_be_excluded_from_later_rounds(cluster, honest_only, tmp_path):
  result = coordinate(cluster, tmp_path, "sign-flip", exclude=True)
  first, second = result["rounds"]
  assert first["judgements"][0]["status"] == "rejected" and first["excluded"] == [0]
  assert [j["worker"] for j in second["judgements"]] == [1, 2, 3]
  assert same(result["state"], honest_only)
