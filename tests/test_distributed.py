"""Untrusted workers on a local Ray cluster: wrong updates rejected, honest ones accepted, the run replayable.

One Ray cluster and four worker actors serve every test (the behaviour is
chosen per run). Runs are tiny: an MLP, 4 local steps per round, one round
where a second tests nothing more (two for a stale proof, an exclusion, a
resumption, the audit of a record, a record already on the storage), checked
against two module-scoped reference runs (``honest_only``,
``last_honest_only``). Most runs are judged by the cluster's two judging
children, started once (about 2 s each); a warm child judges an upload in
about 0.1 s.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import OWNER, OWNER_KEY, ROOT, smoke_config

from experiments import byzantine
from experiments import distributed as experiment
from pol_jax import build, distributed, isolation, proof, store, training

ROUNDS, STEPS, K, WORKERS = 2, 4, 2, 4
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def cluster():
  import ray

  ray.init(num_cpus=2, object_store_memory=100 << 20, include_dashboard=False, log_to_driver=False)
  config = smoke_config("mlp")
  config.steps = ROUNDS * STEPS
  make = functools.partial(experiment.build_worker, config.to_dict())
  engine = distributed.RayEngine(["honest"] * WORKERS, make, config.to_dict(), worker=byzantine.Worker, timeout=60)
  program, train = make()
  # Two judging children, started once for the runs that judge under the default limits.
  judges = [distributed.Judge(builder=build.BUILDER, config=config.to_dict(), limits=make_setup().limits) for _ in "ab"]
  yield {"engine": engine, "config": config, "program": program, "train": train, "ray": ray, "judges": judges}
  for j in judges:
    j.close()
  engine.shutdown()
  ray.shutdown()


def make_setup(**changes) -> distributed.Setup:
  fields = dict(seed=0, owner=OWNER, workers=WORKERS, rounds=ROUNDS, steps=STEPS, k=K, batch_size=32, runner="scan")
  return distributed.Setup(**{**fields, **changes})


def coordinate(
  cluster, workdir, behaviour="honest", defence="pol", dispatch=None, behaviours=None, parallel=2, own=False, key=None,
  **setup,
):  # fmt: skip
  """A run of ``setup``; judged by the cluster's two judging children, or (``own``) by ``parallel`` of its own."""
  engine = cluster["engine"]
  engine.behaviours = list(behaviours or [behaviour]) + ["honest"] * (WORKERS - len(behaviours or [behaviour]))
  engine.reset()
  s = make_setup(batch_size=cluster["config"].batch_size, defence=defence, **setup)
  return distributed.coordinate(
    str(workdir), s, cluster["program"], dispatch or engine, builder=build.BUILDER,
    config=cluster["config"].to_dict(), parallel=parallel, judges=None if own else cluster["judges"][:parallel],
    key=key,
  )  # fmt: skip


def same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _check_states(result, reference):
  """Every round of ``result`` ends on the state (its digest: every leaf's bytes) of that round of ``reference``."""
  digests = [r["state_digest"] for r in result["rounds"]]
  assert digests == [r["state_digest"] for r in reference["rounds"][: len(digests)]], "another state than the reference"


@pytest.fixture(scope="module")
def honest_only(cluster, tmp_path_factory):
  """The run (ROUNDS rounds) with only the honest workers 1..3 (worker 0 never submits), and its workdir.

  Judged by judging children of its own, the other runs by the cluster's: the same states either way.
  """
  engine = cluster["engine"]

  def without_worker_0(r, state, assignments, dirs):
    out = engine(r, state, {w: a for w, a in assignments.items() if w}, dirs)
    return {**out, 0: "not in this run"}

  workdir = tmp_path_factory.mktemp("honest-only")
  return {**coordinate(cluster, workdir, dispatch=without_worker_0, own=True), "workdir": workdir}


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
  "peek": "replay",
}


# Three Byzantine workers and one honest one per run (the free-rider copies its next worker, the honest one).
GROUPS = [("random", "sign-flip", "scale"), ("lazy", "stale", "free-rider"), ("wrong-data", "spoof", "peek")]


def test_every_byzantine_behaviour_has_an_expected_check():
  assert set(REJECTED_BY) == set(byzantine.BEHAVIOURS) - {"honest"}
  assert sorted(b for g in GROUPS for b in g) == sorted(REJECTED_BY)


@pytest.fixture(scope="module")
def last_honest_only(cluster, tmp_path_factory):
  """The run (ROUNDS rounds) with only the honest worker 3 (workers 0..2 never submit)."""
  engine = cluster["engine"]

  def only_worker_3(r, state, assignments, dirs):
    out = engine(r, state, {w: a for w, a in assignments.items() if w == WORKERS - 1}, dirs)
    return {**out, **{w: "not in this run" for w in range(WORKERS - 1)}}

  return coordinate(cluster, tmp_path_factory.mktemp("last-honest-only"), dispatch=only_worker_3)


@pytest.mark.parametrize("group", GROUPS, ids="+".join)
def test_each_byzantine_update_is_rejected_and_the_run_equals_the_honest_workers_run(
  cluster, last_honest_only, tmp_path, group
):
  rounds = 2 if "stale" in group else 1  # stale withholds its first round's proof and submits it in the second
  result = coordinate(cluster, tmp_path, behaviours=group, rounds=rounds)
  assert len(result["rounds"]) == rounds
  for r in result["rounds"]:
    *byzantine, honest = r["judgements"]
    assert honest["status"] == "accepted", r
    for behaviour, j in zip(group, byzantine, strict=True):
      if behaviour == "stale" and r["round"] == 0:
        assert j["status"] == "dropped", (behaviour, j)
      else:
        assert j["status"] == "rejected" and j["check"] == REJECTED_BY[behaviour], (behaviour, j)
    assert r["aggregated"] == [WORKERS - 1]
  _check_states(result, last_honest_only)  # the run with only the honest worker, bit for bit


def test_without_verification_a_byzantine_worker_hurts_accuracy(cluster, honest_only, tmp_path):
  config = cluster["config"]
  test = build.dataset(config, "test")
  # With PoL the run ends on the honest workers' state (the Byzantine tests show it, bit for bit): here, after round 0.
  own = str(honest_only["workdir"] / distributed.COORDINATOR)
  pol, _ = store.restore(own, STEPS, honest_only["state"], honest_only["rounds"][0]["state_digest"])
  accuracy = {"pol": build.evaluate(config, pol, test)}
  state = coordinate(cluster, tmp_path / "none", "random", "none", rounds=1)["state"]
  accuracy["none"] = build.evaluate(config, state, test)
  assert accuracy["none"] < accuracy["pol"] - 0.1, accuracy


def test_a_crashed_worker_is_dropped_and_the_round_completes(cluster, honest_only, tmp_path):
  t0 = time.perf_counter()
  result = coordinate(cluster, tmp_path, "crash", rounds=1)
  (r,) = result["rounds"]
  assert r["judgements"][0]["status"] == "dropped" and "crashed" in r["judgements"][0]["detail"], r
  _check_states(result, honest_only)
  assert time.perf_counter() - t0 < 120


def test_the_record_audits_and_a_record_naming_other_proofs_does_not(cluster, honest_only, tmp_path):
  """The coordinator's record re-aggregates to its states, round after round; a record naming other proofs does not."""
  shutil.copytree(honest_only["workdir"], tmp_path, dirs_exist_ok=True)
  setup = make_setup()
  assert len(honest_only["rounds"]) == 2 and distributed.audit(str(tmp_path), setup, cluster["program"]) == []
  path = tmp_path / distributed.COORDINATOR / distributed.ROUNDS
  rounds = json.loads(path.read_text())
  rounds[1]["aggregated"] = [1, 2]
  path.write_text(json.dumps(rounds))
  assert distributed.audit(str(tmp_path), setup, cluster["program"]) == [
    "round 1: the recorded state is not the aggregate of the proofs the round names"
  ]
  # A worker's upload swapped after its judgement for another's proof under its recorded root: the
  # audit blames that proof, not the coordinator's record.
  path.write_text(
    json.dumps(json.loads((honest_only["workdir"] / distributed.COORDINATOR / distributed.ROUNDS).read_text()))
  )
  one, other = (distributed.worker_dir(str(tmp_path / "rounds"), 0, w) for w in (1, 2))
  root = json.loads(open(os.path.join(one, proof.MANIFEST)).read())["root"]
  shutil.rmtree(one)
  shutil.copytree(other, one)
  swapped = json.loads(open(os.path.join(one, proof.MANIFEST)).read())
  with open(os.path.join(one, proof.MANIFEST), "w") as f:
    json.dump({**swapped, "root": root}, f)
  (problem,) = distributed.audit(str(tmp_path), setup, cluster["program"])
  assert problem.startswith("round 0: worker 1's proof is unusable: manifest.json: root "), problem
  assert problem.endswith("is not the digest of the manifest body (edited after sealing)"), problem


def test_a_worker_past_the_deadline_is_dropped(cluster, honest_only, tmp_path):
  engine = cluster["engine"]
  engine.timeout, engine.options = 5.0, {"slow_seconds": 60.0}
  try:
    result = coordinate(cluster, tmp_path, "slow", rounds=1)
  finally:
    engine.timeout, engine.options = 60.0, {}
  (r,) = result["rounds"]
  assert "timed out" in r["judgements"][0]["detail"], r
  _check_states(result, honest_only)


def test_malformed_and_oversized_proofs_are_rejected_without_harm(cluster, honest_only, tmp_path):
  assignment = make_setup().assignment(0, 1)
  good = distributed.worker_dir(str(honest_only["workdir"] / "rounds"), 0, 1)
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


def _key_file(d) -> str:
  """OWNER's private key as a PEM file in ``d``, as ``--key`` takes it."""
  from cryptography.hazmat.primitives import serialization

  path = os.path.join(d, "owner.key")
  pem = OWNER_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
  )
  with open(path, "wb") as f:
    f.write(pem)
  os.chmod(path, 0o600)
  return path


def test_a_killed_coordinator_resumes_to_the_same_final_state(tmp_path):
  """SIGKILL after the first round; --nofresh resumes, checking the signed record. Workers in-process (--local)."""
  args = [
    sys.executable, "-m", "experiments.distributed", "--config=experiments/configs/digits_mlp.py:smoke",
    "--local", "--defences=pol", "--rounds=2", "--steps=4", "--k=2", "--workers=2", "--behaviour=sign-flip",
    f"--key={_key_file(tmp_path)}",
  ]  # fmt: skip
  whole = tmp_path / "whole"  # the uninterrupted run, in this process
  kwargs = dict(workers=2, byzantine=1, behaviour="sign-flip", rounds=2, steps=4, k=2, defences=("pol",), local=True)
  experiment.run(smoke_config("mlp"), str(whole), **kwargs)
  killed = tmp_path / "killed"
  env = {**os.environ, "POL_JAX_NO_SPEED_FLAGS": "1"}  # the CLI computes as this process does (no YNNPACK fusion)
  proc = subprocess.Popen(
    [*args, f"--workdir={killed}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  rounds = killed / "pol" / distributed.COORDINATOR / distributed.ROUNDS
  deadline = time.monotonic() + 240
  while not (rounds.exists() and len(json.loads(rounds.read_text())) >= 1) and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert len(json.loads(rounds.read_text())) < 2, "the coordinator finished before it could be killed"
  resumed = subprocess.run(
    [*args, "--nofresh", f"--workdir={killed}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert all(isinstance(r["signature"], str) for r in json.loads(rounds.read_text()))
  digests = [
    [r["state_digest"] for r in json.loads((d / "pol" / distributed.COORDINATOR / distributed.ROUNDS).read_text())]
    for d in (whole, killed)
  ]
  assert digests[0] == digests[1]


def test_a_resumed_run_takes_its_owner_from_the_caller_not_from_the_shared_storage(tmp_path):
  """Every worker can write the workdir: the setup.json owner could be any worker's key by the time of a resume."""
  from experiments import cli

  own = tmp_path / "pol" / distributed.COORDINATOR
  own.mkdir(parents=True)
  (own / distributed.SETUP).write_text(json.dumps({"setup": {"owner": "ab" * 32}}))
  config = smoke_config("mlp")
  config.owner = ""
  with pytest.raises(cli.UsageError, match=r"setup\.json: a run to resume; pass its owner \(--key=FILE"):
    experiment.bind_owner(config, str(tmp_path), None)
  assert config.owner == ""
  config.owner = OWNER
  assert experiment.bind_owner(config, str(tmp_path), None) == f"owner:  {OWNER} (--config.owner)"


def test_a_signed_record_changed_on_the_shared_storage_is_refused_at_resume(cluster, tmp_path):
  """A worker that can write the workdir replaces the round's state digest: the resume refuses the record."""
  from cryptography.hazmat.primitives.asymmetric import ed25519

  result = coordinate(cluster, tmp_path, rounds=1, key=OWNER_KEY)
  assert coordinate(cluster, tmp_path, rounds=1, key=OWNER_KEY)["rounds"] == result["rounds"]  # resumes: all done
  path = tmp_path / distributed.COORDINATOR / distributed.ROUNDS
  honest = path.read_text()
  edits = {
    "a state of the worker's": lambda r: r[0].update(state_digest="0" * 64),
    "the signature removed": lambda r: r[0].pop("signature"),
    "a round appended": lambda r: r.append({**r[0], "round": 1}),
  }
  for edit in edits.values():
    rounds = json.loads(honest)
    edit(rounds)
    path.write_text(json.dumps(rounds))
    with pytest.raises(proof.ProofError, match=r"^rounds\.json: signature: round \d: "):
      coordinate(cluster, tmp_path, rounds=1, key=OWNER_KEY)
  path.write_text(honest)
  with pytest.raises(proof.ProofError, match=r"rounds\.json: signature: round 0: the signature is not the run key's"):
    coordinate(cluster, tmp_path, rounds=1, key=ed25519.Ed25519PrivateKey.generate())
  with pytest.raises(proof.ProofError, match=r"the rounds are signed: resume with the run's key"):
    coordinate(cluster, tmp_path, rounds=1)


def test_a_rejected_worker_can_be_excluded_from_later_rounds(cluster, honest_only, tmp_path):
  result = coordinate(cluster, tmp_path, "sign-flip", exclude=True)
  first, second = result["rounds"]
  assert first["judgements"][0]["status"] == "rejected" and first["excluded"] == [0]
  assert [j["worker"] for j in second["judgements"]] == [1, 2, 3]
  _check_states(result, honest_only)
  assert same(result["state"], honest_only["state"])


# A proof of 4 one-step segments judged by a draw of 2 (the last and one other): a worker that cannot predict the
# draw and trains only the last segment is caught whatever the draw; one that can predict it is not.
PEEK = dict(steps=STEPS, k=1, segments=2)


def _every_byte(root) -> bytes:
  """The contents of every regular file under ``root``: what a worker that reads the shared storage sees."""
  out = []
  for d, _, files in os.walk(root):
    for f in sorted(files):
      path = os.path.join(d, f)
      if os.path.isfile(path) and not os.path.islink(path):
        with open(path, "rb") as fh:
          out.append(fh.read())
  return b"\0".join(out)


def test_a_worker_that_reads_the_shared_storage_cannot_predict_the_draw(cluster, tmp_path, monkeypatch):
  engine = cluster["engine"]
  # Control: when the draw is readable before the workers run, peek trains exactly the segments replayed and passes.
  leaked, judge = 1234567, distributed.Judge.__call__
  monkeypatch.setattr(distributed.Judge, "__call__", lambda *args, **kwargs: judge(*args, **{**kwargs, "seed": leaked}))

  def leaking(r, state, assignments, dirs):
    note = [{"round": r, "judgements": [{"worker": 0, "verifier_seed": leaked}]}]
    (tmp_path / "control" / "leak.json").write_text(json.dumps(note))
    return engine(r, state, assignments, dirs)

  control = coordinate(cluster, tmp_path / "control", "peek", dispatch=leaking, rounds=1, **PEEK)
  assert control["rounds"][0]["judgements"][0]["status"] == "accepted", control["rounds"][0]["judgements"][0]
  monkeypatch.undo()

  # The coordinator as it runs: every byte under the workdir, while the workers train and when they submit.
  workdir, seen = tmp_path / "run", {}

  def watched(r, state, assignments, dirs):
    before = _every_byte(workdir)
    out = engine(r, state, assignments, dirs)
    seen[r] = before + _every_byte(workdir)
    return out

  result = coordinate(cluster, workdir, "peek", dispatch=watched, **PEEK)
  for r in result["rounds"]:
    peek, *honest = r["judgements"]
    assert peek["status"] == "rejected" and peek["check"] == "replay", peek
    assert all(j["status"] == "accepted" for j in honest), r
    assert r["aggregated"] == [1, 2, 3]
    seeds = [j["verifier_seed"] for j in r["judgements"]]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds), seeds
    before_judgement = seen[r["round"]]
    assert b"secret" not in before_judgement.lower()
    for s in seeds:  # recorded now, for audit; nowhere before the judgement, in any encoding
      for form in (str(s).encode(), f"{s:x}".encode(), s.to_bytes(8, "big"), s.to_bytes(8, "little")):
        assert form not in before_judgement, (r["round"], s)
  setup = json.loads((workdir / distributed.COORDINATOR / distributed.SETUP).read_text())
  assert set(setup) == {"setup"}, "setup.json holds more than the setup"


def _judge_or_hang(common):
  """A judging child's set-up (run by ``pol_jax.isolation`` with this directory on its path): worker 1's judgement
  never returns."""
  judge = distributed._judge_server(common)

  def judge_or_hang(job, ready):
    if job["assignment"]["worker"] == 1:
      ready()
      time.sleep(3600)
    return judge(job, ready)

  return judge_or_hang


def test_hostile_uploads_get_their_workers_rejected_and_the_round_goes_on(cluster, tmp_path, monkeypatch):
  """Worker 0 uploads a FIFO as its manifest (opening it blocks); worker 1's judgement hangs. Both rejected.

  One judging child: the hang ends it, and workers 2 and 3 are judged by the next.
  """
  engine = cluster["engine"]
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setattr(distributed, "_JUDGE", "test_distributed:_judge_or_hang")

  def hostile(r, state, assignments, dirs):
    out = engine(r, state, assignments, dirs)
    manifest = os.path.join(dirs[0], proof.MANIFEST)
    os.remove(manifest)
    os.mkfifo(manifest)
    return out

  t0 = time.perf_counter()
  result = coordinate(cluster, tmp_path, dispatch=hostile, rounds=1, judge_seconds=10, parallel=1, own=True)
  (r,) = result["rounds"]
  fifo, hung, *honest = r["judgements"]
  assert fifo["status"] == "rejected" and fifo["check"] == "integrity", fifo
  assert "manifest.json" in fifo["detail"] and "FIFO" in fifo["detail"], fifo
  assert hung["status"] == "rejected" and hung["check"] == "judgement", hung
  assert hung["detail"] == "judgement timed out after 10 s"
  assert all(j["status"] == "accepted" for j in honest), honest
  assert r["aggregated"] == [2, 3]
  assert json.loads((tmp_path / distributed.COORDINATOR / distributed.ROUNDS).read_text())[0]["aggregated"] == [2, 3]
  assert time.perf_counter() - t0 < 150


def test_judges_made_for_other_limits_are_refused(cluster, tmp_path):
  with pytest.raises(ValueError, match="judges made with this run's builder, config and setup.limits"):
    coordinate(cluster, tmp_path, judge_seconds=10)  # the cluster's judges judge under the default limits


def _deep_json(d):
  with open(os.path.join(d, proof.MANIFEST), "w") as f:
    f.write("[" * 100_000 + "]" * 100_000)


def _long_integer(d):
  with open(os.path.join(d, proof.MANIFEST), "w") as f:
    f.write('{"schema": 2, "steps": ' + "9" * 5000 + "}")


def _overflowing_float(d):
  with open(os.path.join(d, proof.MANIFEST), "w") as f:
    f.write('{"schema": 2, "steps": 1e400}')


def _symlink_to_dev_zero(d):
  os.remove(os.path.join(d, proof.MANIFEST))
  os.symlink("/dev/zero", os.path.join(d, proof.MANIFEST))


def _fifo_in_a_checkpoint(d):
  step = sorted(os.listdir(os.path.join(d, "checkpoints")), key=lambda s: (len(s), s))[-1]
  os.mkfifo(os.path.join(d, "checkpoints", step, "blocks"))


# How a judgement of each hostile upload ends: rejected in one line that says why.
HOSTILE = {
  "deep JSON": (_deep_json, r"manifest\.json: json: nested 100000 levels deep"),
  "5000-digit integer": (_long_integer, r"manifest\.json: json: an integer of 5000 digits"),
  "1e400": (_overflowing_float, r"manifest\.json: json: the number 1e400 is not finite"),
  "symlink to /dev/zero": (
    _symlink_to_dev_zero,
    r"manifest\.json: file: not a regular file or directory \(a symbolic link\)",
  ),
  "FIFO in a checkpoint": (
    _fifo_in_a_checkpoint,
    r"checkpoints/\d+/blocks: file: not a regular file or directory \(a FIFO\)",
  ),
}


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
  """The smoke proof, and a judge of its assignment from its start in a child process (one, for every test)."""
  from conftest import record

  config = smoke_config()
  path = str(tmp_path_factory.mktemp("judged") / "proof")
  record(path, config)
  assignment = distributed.Assignment(
    0, 0, OWNER, config.seed, config.steps, config.k, config.batch_size, config.runner
  )
  program, _ = build.from_config(config.to_dict())
  start = training.to_host(program.init(training.derive_keys(assignment.seed).init))
  limits = isolation.Limits(60, 8 << 30)
  with distributed.Judge(builder=build.BUILDER, config=config.to_dict(), limits=limits) as child:

    def judge(proof_dir, max_bytes=64 << 20):
      return child(proof_dir, assignment, start, max_bytes=max_bytes)

    yield path, judge


def test_an_honest_proof_judged_in_a_child_is_accepted_with_its_final_state(judged):
  from conftest import load_manifest

  path, judge = judged
  judgement, final = judge(path)
  assert judgement.status == "accepted", judgement
  manifest = load_manifest(path)
  assert judgement.root == manifest["root"] and isinstance(judgement.verifier_seed, int)
  assert proof.leaf_digests(final) == proof.leaf_digests(store.restore(path, manifest["steps"], final)[0])
  assert judgement.isolation_seconds > 0
  judgement, final = judge(path, max_bytes=1000)  # counted while it is copied, before anything is parsed
  assert (judgement.status, judgement.check, final) == ("rejected", "size", None), judgement


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_upload_is_rejected_in_one_line(judged, copy_of, name):
  path, judge = judged
  spoil, reason = HOSTILE[name]
  bad = copy_of(path)
  spoil(bad)
  t0 = time.perf_counter()
  judgement, final = judge(bad)
  assert judgement.status == "rejected" and final is None, judgement
  assert judgement.check in ("integrity", "judgement") and re.search(reason, judgement.detail), judgement
  assert "\n" not in judgement.detail
  assert time.perf_counter() - t0 < 60


def test_a_huge_value_in_an_upload_is_quoted_clipped(judged, copy_of):
  """A 4 MiB string in a resealed manifest is rejected in a short line (rounds.json keeps every detail)."""
  path, judge = judged
  bad = copy_of(path)
  proof.reseal(bad, lambda body: body["environment"].update(jax="x" * (4 << 20)))
  judgement, final = judge(bad)
  assert (judgement.status, judgement.check, final) == ("rejected", "integrity", None), judgement.detail[:300]
  assert "environment.jax" in judgement.detail and len(judgement.detail) <= 200, len(judgement.detail)
  assert "\n" not in judgement.detail
  long = distributed.Judgement(0, "rejected", "integrity", "y" * 10**6, root="z" * 10**6)
  assert long.root is None and len(long.detail) <= proof.MAX_MESSAGE + 40 and long.detail.endswith("characters)")


def test_a_judge_that_cannot_start_is_the_coordinators_error_not_the_workers(tmp_path):
  """A failure before the child touches the upload (here: no such builder) stops the coordinator, naming why."""
  (tmp_path / "proof").mkdir()
  with pytest.raises(distributed.CoordinatorError, match=r"cannot judge: .*pol_jax\.build:missing"):
    distributed.judge_isolated(
      str(tmp_path / "proof"), make_setup().assignment(0, 0), {"x": np.zeros(2)}, builder="pol_jax.build:missing",
      config={}, max_bytes=1 << 20,
    )  # fmt: skip


def test_the_assignment_check_names_a_proof_bound_to_another_key_or_nonce():
  a = make_setup().assignment(1, 2)
  assert a.seed == proof.bound_seed(OWNER, a.nonce) and a.nonce == distributed.round_seed(0, 1, 2)
  fields = {"seed": a.seed, "steps": a.steps, "k": a.k, "batch_size": a.batch_size, "runner": a.runner}
  manifest = {"owner": {"public_key": OWNER, "nonce": a.nonce}, **fields}
  assert distributed.check_assignment(manifest, a) is None
  other = "ab" * 32  # the worker's own key: its proof would be its, not the run's
  theirs = {**manifest, "owner": {"public_key": other, "nonce": a.nonce}, "seed": proof.bound_seed(other, a.nonce)}
  assert distributed.check_assignment(theirs, a).startswith(f"owner.public_key '{other}', assigned '{OWNER}'; seed ")
  stale = {**manifest, "owner": {"public_key": OWNER, "nonce": a.nonce + 1}}
  assert distributed.check_assignment(stale, a).startswith(f"owner.nonce {a.nonce + 1}, assigned {a.nonce}")
