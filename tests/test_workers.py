"""Reproducing the prover's CPU environment: pinned worker processes, flags, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, reseal

from pol_jax import build, challenge, proof, replay, training, verifier, workers

# Runs a module as a program with this process's CPU affinity set first (before JAX starts).
_PINNED = "import os, runpy, sys; os.sched_setaffinity(0, {0}); sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"


def _pinned_cli(cores: set[int], module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", _PINNED.format(repr(cores)), module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "experiments.verify", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
  )


@pytest.fixture(scope="module")
def one_thread_proof(tmp_path_factory):
  """The BatchNorm CNN (loop runner), recorded by the CLI pinned to one core."""
  assert len(os.sched_getaffinity(0)) >= 2, "these tests need a verifier with at least 2 cores"
  workdir = str(tmp_path_factory.mktemp("pinned"))
  done = _pinned_cli(
    {0},
    "experiments.train",
    f"--workdir={workdir}",
    "--config=experiments/configs/default.py:smoke",
    "--config.steps=16",
    "--config.batch_size=64",  # at batch 32 this CNN happens to give the same bits at 1 and 2 threads
  )
  assert done.returncode == 0, done.stderr[-2000:]
  path = os.path.join(workdir, "proof")
  with open(os.path.join(path, proof.MANIFEST)) as f:
    assert json.load(f)["environment"]["cpu_threads"] == 1
  return path


def test_one_thread_proof_verifies_in_two_pinned_workers_and_needs_them(one_thread_proof, tmp_path):
  parallel = _cli(f"--proof={one_thread_proof}", "--strategy=all", f"--report={tmp_path}/parallel.json")
  assert parallel.returncode == 0, parallel.stdout + parallel.stderr[-2000:]
  assert "2 worker processes pinned to 1 core each" in parallel.stdout, parallel.stdout
  report = json.loads((tmp_path / "parallel.json").read_text())
  assert report["status"] == "accepted" and len(report["segments"]) == 4
  assert {s["device"].split(" (")[0] for s in report["segments"]} == {"worker 0", "worker 1"}
  assert [r["field"] for r in report["reproduction"]][:1] == ["cpu_threads"]
  # One worker replays every segment in sequence: the same recorded digests.
  sequential = _cli(f"--proof={one_thread_proof}", "--strategy=all", "--workers=1")
  assert sequential.returncode == 0, sequential.stdout + sequential.stderr[-2000:]
  assert "1 worker process pinned to 1 core" in sequential.stdout
  # And the pinning is what makes it exact: replayed here, with two threads, no segment reproduces.
  program, train = build.rebuild(one_thread_proof)
  manifest = proof.read_manifest(one_thread_proof)
  plan = proof.Plan.from_manifest(manifest)
  keys = training.derive_keys(plan.seed)
  template = training.to_host(program.init(keys.init))
  log = proof.read_index_log(one_thread_proof, manifest)
  job = replay.Job(
    one_thread_proof, manifest, training.make_segment(program.step, "loop"), template, train, log, keys.step
  )
  unpinned = replay.replay(job, [(i, s, e) for i, (s, e) in enumerate(proof.segments(plan))])
  assert not any(r.match for r in unpinned), [r.mismatch for r in unpinned]
  assert all(r.diverged_step == r.start + 1 for r in unpinned), [r.mismatch for r in unpinned]


def test_library_without_a_builder_leaves_the_thread_mismatch_undecided(one_thread_proof):
  program, train = build.rebuild(one_thread_proof)
  verdict = verifier.verify(one_thread_proof, program, train, challenge=challenge.All())
  assert verdict.status == "undecided" and not verdict.segments
  assert "builder=" in verdict.checks[1].detail
  with_builder = verifier.verify(one_thread_proof, program, train, challenge=challenge.All(), builder=build.BUILDER)
  assert with_builder.status == "accepted", with_builder.summary()
  # The CLI recorded with its speed flags, which this process lacks: they change the initialisation's bits, so
  # step 0 is checked against the init a worker derives in the prover's environment, not this process's.
  init = with_builder.checks[verifier.CHECKS.index("init")]
  assert init.passed and "(in a worker with the prover's environment)" in init.detail, init.detail
  assert "step 0 differs from this process's initialisation" in verdict.checks[verifier.CHECKS.index("init")].detail


def test_two_thread_proof_on_one_core_is_refused_naming_the_cores(honest):
  done = _pinned_cli({0}, "experiments.verify", f"--proof={honest}", "--strategy=all")
  assert done.returncode == 2, done.stdout + done.stderr[-2000:]
  assert "REJECTED" not in done.stdout
  error = done.stderr.strip().splitlines()
  assert len(error) == 1 and "recorded with 2 CPU threads and exact replay needs 2 cores" in error[0], error


def test_forced_host_device_count_is_matched_not_rejected(honest):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  done = _cli(f"--proof={honest}", "--strategy=all", env=env)
  assert done.returncode == 0, done.stdout + done.stderr[-2000:]
  assert "host_devices" in done.stdout and "matched in 1 pinned worker process" in done.stdout, done.stdout


def test_the_worker_checks_that_its_environment_now_matches(honest, copy_of):
  p = copy_of(honest)
  reseal(p, lambda b: b["environment"].update(cpu_threads=1))
  settings = workers.plan(proof.read_manifest(p)["environment"]).settings
  wrong = workers.Pinning(2, ((0, 1),), settings)  # two cores for a one-thread proof
  with pytest.raises(workers.Unreproducible, match="still differs from the proof's: cpu_threads: proof 1, worker 2"):
    workers.replay(p, proof.read_manifest(p)["root"], build.BUILDER, [(0, 0, 4)], wrong)


@pytest.mark.parametrize(
  ("recorded", "words"),
  [
    ({"cpu_threads": 3}, "needs 3 cores; this process may run on 2"),
    ({"cpu_threads": "2"}, "environment.cpu_threads: expected a thread count"),
    ({"xla_flags": "--xla_dump_to=/tmp/x"}, "'--xla_dump_to=/tmp/x' is not a flag a verifier sets"),
    ({"xla_flags": "--xla_cpu_max_isa=$(reboot)"}, "names an ISA XLA does not know"),
    ({"xla_flags": "--xla_cpu_enable_fast_math=$(reboot)"}, "not a value XLA parses for --xla_cpu_enable_fast_math"),
    ({"host_devices": 10**9}, "environment.host_devices: expected an integer"),
    ({"x64": "yes"}, "environment.x64: expected true or false"),
  ],
)
def test_worker_plans_refuse_what_they_cannot_reproduce(recorded, words):
  env = {"cpu_threads": 1, "xla_flags": "", "host_devices": None, "x64": False, **recorded}
  with pytest.raises(workers.Unreproducible, match=words.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
    workers.plan(env, cores=[0, 1])


def test_worker_plans_split_the_cores():
  env = {"cpu_threads": 2, "xla_flags": "--xla_cpu_max_isa=AVX2", "host_devices": 4, "x64": False}
  pinning = workers.plan(env, cores=list(range(7)))
  assert pinning.cores == ((0, 1), (2, 3), (4, 5))
  settings = dict(pinning.settings)
  assert settings["XLA_FLAGS"] == "--xla_cpu_max_isa=AVX2 --xla_force_host_platform_device_count=4"
  assert settings["JAX_ENABLE_X64"] == "0"
  assert workers.plan(env, cores=list(range(7)), max_workers=1).cores == ((0, 1),)


def test_builders_are_named_by_the_verifier_and_must_import():
  assert workers.load_builder(build.BUILDER) is build.from_config
  for bad in ("pol_jax.build", "os:system;x", "no_such_module_xyz:f"):
    with pytest.raises(ValueError, match="builder"):
      workers.load_builder(bad)
