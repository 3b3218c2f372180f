"""The vmapped tolerance mode and its calibration."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from conftest import load_manifest, record, reseal, run_cli, smoke_config

from experiments import forge
from pol_jax import build, challenge, proof, replay, tolerance, training, verifier


@pytest.fixture(scope="module")
def cnn_proof(tmp_path_factory):
  """A BatchNorm CNN proof: vmapped replay does not reproduce its bits."""
  path = str(tmp_path_factory.mktemp("cnn") / "proof")
  record(path, smoke_config("cnn", steps=24, k=4))
  return path


@pytest.fixture(scope="module")
def calibration(cnn_proof):
  program, train = build.rebuild(cnn_proof)
  record_ = tolerance.calibrate(cnn_proof, program, train, num_segments=6, chunk=6)
  path = os.path.join(os.path.dirname(cnn_proof), "calibration.json")
  with open(path, "w") as f:
    json.dump(record_, f)
  return path, record_


def test_calibration_measures_real_noise_and_proposes_delta_with_margin(calibration):
  _, record_ = calibration
  assert len(record_["segments"]) == 6
  assert not any(s["bitwise"] for s in record_["segments"]), "vmapped BatchNorm CNN replay is not bit-exact"
  for m, noise in record_["noise"].items():
    assert record_["delta"][m] == max(noise * record_["margin"], tolerance.FLOOR[m])
  assert 0 < record_["noise"]["l2"] < 1e-4


def test_tolerance_mode_accepts_the_honest_proof_with_the_calibrated_delta(cnn_proof, calibration):
  path, _ = calibration
  result = run_cli(
    "experiments.verify",
    f"--proof={cnn_proof}",
    "--mode=tolerance",
    f"--calibration={path}",
    "--strategy=all",
    "--chunk=3",
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.startswith("ACCEPTED in tolerance mode: 6 of 6 segments within delta")
  assert f"calibrated in {path}: 10.0x the honest noise of 6 segments" in result.stdout


def _perturb_end_of_segment(p: str, end: int, scale: float) -> None:
  """Rewrites checkpoint ``end`` with params moved by ``scale`` x its segment's l2 update, and reseals."""
  program, _ = build.rebuild(p)
  manifest = load_manifest(p)
  template = training.to_host(program.init(training.derive_keys(manifest["seed"]).init))
  k = manifest["k"]
  start_state, _ = proof.restore(p, end - k, template)
  end_state, _ = proof.restore(p, end, template)
  leaves = jax.tree.leaves(end_state.params)
  update = np.sqrt(
    sum(
      np.sum((np.asarray(a, np.float64) - b) ** 2)
      for a, b in zip(jax.tree.leaves(start_state.params), leaves, strict=True)
    )
  )
  direction = [np.ones_like(a) for a in leaves]
  norm = np.sqrt(sum(d.size for d in direction))
  moved = [(a + (scale * update / norm) * d).astype(a.dtype) for a, d in zip(leaves, direction, strict=True)]
  state = end_state.replace(params=jax.tree.unflatten(jax.tree.structure(end_state.params), moved))
  forge.replace_checkpoint(p, state)


def test_tolerance_mode_rejects_a_checkpoint_perturbed_by_10x_delta(cnn_proof, calibration, copy_of):
  path, record_ = calibration
  p = copy_of(cnn_proof)
  _perturb_end_of_segment(p, 12, 10 * record_["delta"]["l2"])
  program, train = build.rebuild(p)
  verdict = verifier.verify(
    p, program, train, challenge=challenge.All(), replay=replay.Tolerance(tolerance.load(path), chunk=3)
  )
  assert not verdict.accepted
  assert [c.name for c in verdict.failed] == ["replay"], verdict.table()
  assert verdict.failed[0].detail.startswith("segment 2 (steps 8-12)"), verdict.failed[0].detail
  within = {s.index: s.within for s in verdict.segments}
  assert within[2] is False and within[0] and within[1], within
  l2 = next(s for s in verdict.segments if s.index == 2).normalised["l2"]
  assert l2 == pytest.approx(10 * record_["delta"]["l2"], rel=0.2)
  # The exact verifier rejects it too, by digest.
  exact = verifier.verify(p, program, train, challenge=challenge.All())
  assert [c.name for c in exact.failed] == ["replay"]


def test_tolerance_mode_serves_a_different_environment_when_asked(cnn_proof, calibration, copy_of):
  path, _ = calibration
  p = copy_of(cnn_proof)
  reseal(p, lambda b: b["environment"].update(jax="0.0.1"))
  assert run_cli("experiments.verify", f"--proof={p}").returncode == 2
  result = run_cli("experiments.verify", f"--proof={p}", "--mode=tolerance", f"--calibration={path}", "--chunk=4")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "differs (jax: proof '0.0.1'" in result.stdout and "tolerance mode decides by distance" in result.stdout


@pytest.mark.parametrize(
  "args, words",
  [
    (["--mode=tolerance"], "--mode=tolerance needs a delta"),
    (["--mode=tolerance", "--delta=l2=1e-3", "--chunk=1000000000"], "pass --chunk="),
    (["--mode=tolerance", "--delta=l7=1"], "Expected delta for metrics among"),
    (["--delta=l2=1"], "apply to --mode=tolerance only"),
    (["--devices=64"], "asked for 64 devices, this process has 1"),
  ],
)
def test_bad_tolerance_requests_get_one_line(cnn_proof, args, words):
  result = run_cli("experiments.verify", f"--proof={cnn_proof}", *args)
  assert result.returncode == 2, result.stdout + result.stderr
  assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


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
