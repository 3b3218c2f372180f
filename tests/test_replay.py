"""Replay across devices and processes (exact), and vmapped in chunks (tolerance mode)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, batch_path, load_manifest

from experiments import forge
from pol_jax import build, challenge, replay, store, tolerance, training, verifier

_FOUR_DEVICES = """
import json, os, sys
sys.path.insert(0, {tests!r})
import jax
from ml_collections import ConfigDict
from pol_jax import build, challenge, replay, verifier
from conftest import load_manifest
assert jax.local_device_count() == 4, jax.devices()
out = {{}}
for name, path in {proofs!r}.items():
  config = ConfigDict(load_manifest(path)["config"])
  train = build.dataset(config, "train")
  program = build.program(config, train)
  traces = []
  def counted(s, b, k, step=program.step):
    traces.append(1)
    return step(s, b, k)
  program = program._replace(step=counted)
  v = verifier.verify(path, program, train, challenge=challenge.All(), replay=replay.Exact(devices=4))
  out[name] = {{"accepted": v.accepted, "failed": [c.name for c in v.failed], "traces": len(traces),
               "segments": [(s.index, s.match, s.device) for s in v.segments],
               "mismatch": [s.mismatch for s in v.segments if not s.match]}}
print(json.dumps(out))
"""


_RECORD = """
import sys
sys.path.insert(0, {tests!r})
import jax
from conftest import record, smoke_config
assert jax.local_device_count() == {devices}, jax.devices()
for name, model, seed in (("mlp", "mlp", 0), ("cnn", "cnn", 0), ("other", "mlp", 1)):
  record(f"{{sys.argv[1]}}/{{name}}", smoke_config(model, steps=32, k=4, seed=seed))
"""


def _splice_state(proof_dir: str, source: str, step: int) -> None:
  """Copies ``source``'s recorded state at ``step`` into ``proof_dir`` (its batch rewritten) and reseals, as a
  forger would."""
  program, _ = build.rebuild(source)
  manifest = load_manifest(source)
  template = training.to_host(program.init(training.derive_keys(manifest["seed"]).init))
  state, meta = store.restore(source, step, template, manifest["checkpoints"][str(step)])
  forge.replace_checkpoint(proof_dir, state, meta.get("fingerprints"))


def _record_eight_segment_proofs(base, devices: int | None) -> dict:
  """Proofs of 8 segments for both runners and a spliced one, recorded in a fresh process.

  ``devices``: the forced host device count of the recording process (the
  verifier must match it: it changes float32 bits).
  """
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  code = _RECORD.format(tests=os.path.join(ROOT, "tests"), devices=devices or 1)
  done = subprocess.run([sys.executable, "-c", code, str(base)], cwd=ROOT, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  paths = {model: str(base / model) for model in ("mlp", "cnn")}
  other = str(base / "other")
  # A forger splices another run's state in at step 16, the end of segment 3.
  paths["tampered"] = str(base / "tampered")
  shutil.copytree(paths["mlp"], paths["tampered"])
  _splice_state(paths["tampered"], other, 16)
  return paths


@pytest.fixture(scope="module")
def eight_segments(tmp_path_factory):
  return _record_eight_segment_proofs(tmp_path_factory.mktemp("eight"), None)


def test_four_device_replay_is_bit_identical_and_catches_a_segment_on_device_3(tmp_path):
  # Recorded with the verifier's forced device count: that count changes float32 bits, so it is matched.
  proofs = _record_eight_segment_proofs(tmp_path, 4)
  code = _FOUR_DEVICES.format(tests=os.path.join(ROOT, "tests"), proofs=proofs)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for model in ("mlp", "cnn"):
    # Accepted means every replayed state has the digests the one-device prover recorded.
    assert out[model]["accepted"], out[model]
    devices = [d for _, _, d in out[model]["segments"]]
    assert devices == [f"cpu:{i % 4}" for i in range(8)], devices
    assert out[model]["traces"] == 1, "the segment function is traced once for all devices and segments"
  tampered = out["tampered"]
  assert not tampered["accepted"] and tampered["failed"] == ["replay"]
  # Step 16 ends segment 3 (on device 3) and starts segment 4, which cannot reproduce either.
  assert [(i, d) for i, match, d in tampered["segments"] if not match] == [(3, "cpu:3"), (4, "cpu:0")]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _verify_on_two_processes(path: str, report_dir, *extra: str) -> list[subprocess.CompletedProcess]:
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "experiments.verify",
        f"--proof={path}",
        "--strategy=all",
        f"--coordinator=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        f"--report={report_dir}/report{i}.json",
      ],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  return out


def test_two_process_distributed_verification(eight_segments, tmp_path):
  honest = _verify_on_two_processes(eight_segments["mlp"], tmp_path)
  for r in honest:
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.startswith("ACCEPTED: 8 of 8 segments")
    # Each process replayed half of the segments; the verdict gathered them all.
    assert r.stdout.count("process 0") == 4 and r.stdout.count("process 1") == 4, r.stdout
  report = json.loads((tmp_path / "report0.json").read_text())
  assert [s["index"] for s in report["segments"]] == list(range(8))
  assert not (tmp_path / "report1.json").exists(), "only process 0 writes the report"
  tampered = _verify_on_two_processes(eight_segments["tampered"], tmp_path)
  for r in tampered:
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert "REJECTED by the replay check: segment 3 (steps 12-16)" in r.stdout, r.stdout


def test_two_process_verification_reports_a_damaged_checkpoint_found_by_one_process(eight_segments, tmp_path):
  damaged = str(tmp_path / "damaged")
  shutil.copytree(eight_segments["mlp"], damaged)
  batch = batch_path(damaged, 20)
  data_dir = os.path.join(damaged, batch, "state", "ocdbt.process_0", "d")
  name = max(os.listdir(data_dir), key=lambda n: os.path.getsize(os.path.join(data_dir, n)))
  raw = bytearray(open(os.path.join(data_dir, name), "rb").read())
  raw[len(raw) // 2] ^= 0x01
  open(os.path.join(data_dir, name), "wb").write(bytes(raw))
  # Sampled integrity: every process checks every file's digest first; the verdict names the batch on both.
  for r in _verify_on_two_processes(damaged, tmp_path, "--integrity=sampled"):
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert f"REJECTED by the integrity check: checkpoint batch {batch.split('/')[1]}: {batch}/state/" in r.stdout, (
      r.stdout
    )


def test_batched_segment_compiles_once_for_every_chunk(cnn_proof):
  program, train = build.rebuild(cnn_proof)
  traces = []

  def counted(state, batch, key):
    traces.append(1)
    return program.step(state, batch, key)

  counted_program = training.Program(program.init, counted)
  loose = tolerance.Thresholds({"l2": 1.0})
  verdict = verifier.verify(
    cnn_proof, counted_program, train, challenge=challenge.All(), replay=replay.Tolerance(loose, chunk=2)
  )
  assert verdict.accepted and len(verdict.segments) == 6
  # One trace for the program check (the exact segment), one for the vmapped chunk program: 3 chunks, one compile.
  assert len(traces) == 2, len(traces)


def test_a_matching_replay_has_distance_zero_unless_a_parameter_is_not_finite():
  import math
  from typing import NamedTuple

  import numpy as np

  from pol_jax import proof, replay

  class State(NamedTuple):
    params: dict

  begin = State({"w": np.array([1.0, 2.0], np.float32)})
  end = State({"w": np.array([1.5, 2.5], np.float32)})
  matched = replay._compare(0, 0, 4, begin, end, (end, {"leaves": proof.leaf_digests(end)}), 0.1)
  assert matched.match and matched.distance == {"l1": 0.0, "l2": 0.0, "linf": 0.0, "cosine": 0.0}
  assert matched.update["l1"] == 1.0
  # Bytes reproduced, but a NaN parameter: the distance stays NaN (a tolerance judgement rejects it).
  broken = State({"w": np.array([np.nan, 2.5], np.float32)})
  result = replay._compare(0, 0, 4, begin, broken, (broken, {"leaves": proof.leaf_digests(broken)}), 0.1)
  assert result.match and math.isnan(result.distance["l1"]) and math.isnan(result.update["l1"])
