"""Tolerance mode: its calibration, its acceptance rule, and no false rejections.

No false rejections: honest proofs over several seeds and both small models are accepted
in a fresh process by every verification mode that applies, and tolerance mode never rejects one.
``POL_HONEST_SEEDS`` sets the number of seeds per model (default 1; 10 gives the 20 full-length
proofs of the tolerance measurement in ``tolerance.HONEST_RANGE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, load_manifest, record, smoke_config

from experiments import forge
from pol_jax import build, challenge, replay, store, tolerance, training, verifier


def test_calibration_measures_real_noise_and_proposes_delta_with_margin(calibration):
  _, record_ = calibration
  assert len(record_["segments"]) == 6
  assert not any(s["bitwise"] for s in record_["segments"]), "vmapped BatchNorm CNN replay is not bit-exact"
  for m, noise in record_["noise"].items():
    assert record_["delta"][m] == max(noise * record_["margin"], tolerance.FLOOR[m])
  assert 0 < record_["noise"]["l2"] < 1e-4


def _perturb_end_of_segment(p: str, end: int, scale: float) -> None:
  """Rewrites checkpoint ``end`` with params moved by ``scale`` x its segment's l2 update, and reseals."""
  program, _ = build.rebuild(p)
  manifest = load_manifest(p)
  template = training.to_host(program.init(training.derive_keys(manifest["seed"]).init))
  k = manifest["k"]
  start_state, _ = store.restore(p, end - k, template)
  end_state, _ = store.restore(p, end, template)
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


# ------------------------------------------------------------------ no false rejections


SEEDS = int(os.environ.get("POL_HONEST_SEEDS", "1"))


_VERIFY_ALL = """
import json, sys
from pol_jax import build, challenge, paper, replay, tolerance, verifier
out = {}
for p in sys.argv[1:]:
  program, train = build.rebuild(p)
  loose = tolerance.Thresholds({"l2": 1e-3, "linf": 1e-3}, source="test: honest vmapped noise is far below")
  strategies = {
    "exact, all": challenge.All(),
    "exact, fiat-shamir": challenge.FiatShamir(n=2),
    "exact, top-q+uniform (default, OS seed)": challenge.TopQUniform(n=2),
    "exact, uniform": challenge.Uniform(n=2, seed=7),
    "exact, top-q": challenge.TopQ(),
  }
  out[p] = {name: verifier.verify(p, program, train, challenge=c).accepted for name, c in strategies.items()}
  out[p]["tolerance, all"] = verifier.verify(
    p, program, train, challenge=challenge.All(), replay=replay.Tolerance(loose)
  ).accepted
  out[p]["paper"] = paper.paper(p, program, train).accepted
print(json.dumps(out))
"""


def test_honest_proofs_are_accepted_by_every_mode_in_a_fresh_process(tmp_path):
  proofs = []
  for model in ("mlp", "cnn"):
    for seed in range(SEEDS):
      p = str(tmp_path / f"{model}-{seed}")
      record(p, smoke_config(model, seed=seed))
      proofs.append(p)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run(
    [sys.executable, "-c", _VERIFY_ALL, *proofs], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(done.stdout.strip().splitlines()[-1])
  rejected = {(os.path.basename(p), mode) for p, modes in results.items() for mode, ok in modes.items() if not ok}
  assert not rejected, rejected
  assert len(results) == 2 * SEEDS


_TOLERANCE_ALL = """
import json, sys
from pol_jax import build, challenge, distances, replay, tolerance, verifier
loose = tolerance.Thresholds({m: 1e300 for m in distances.METRICS}, source="test: distances only")
out = {}
for group in json.loads(sys.argv[1]):
  calibrated = None
  for p in group:
    program, train = build.rebuild(p)
    if calibrated is None:  # one proof's calibration, applied to the others of its config
      record = tolerance.calibrate(p, program, train, chunk=15)
      calibrated = tolerance.Thresholds(record["delta"], source="calibrated on " + p, reject=record["reject"])
    every = challenge.All()
    measured = verifier.verify(p, program, train, challenge=every, replay=replay.Tolerance(loose, chunk=15))
    judged = [calibrated.judge(s.distance, s.update) for s in measured.segments]
    verdict = verifier.verify(p, program, train, challenge=every, replay=replay.Tolerance(calibrated, chunk=15))
    out[p] = {
      "segments": len(judged),
      "rejected": judged.count(False),
      "undecided": judged.count(None),
      "worst_l2": max(s.normalised["l2"] for s in measured.segments),
      "status": verdict.status,
      "detail": verdict.checks[-1].detail,
    }
print(json.dumps(out))
"""


def test_tolerance_mode_never_rejects_an_honest_full_length_proof(tmp_path):
  """Full-length runs (660 steps, 30 segments), where the heavy tail of the vmapped noise shows.

  Each config's first proof calibrates delta; every segment of every proof is then judged by it as
  a verifier on another environment would (no exact replay to fall back on): never rejected; and
  the verdict, where exact replay decides what lies outside delta, accepts every proof.
  """
  from experiments.configs import default, digits_mlp

  groups = []
  for name, module in (("cnn", default), ("mlp", digits_mlp)):
    group = []
    for seed in range(SEEDS):
      p = str(tmp_path / f"{name}-{seed}")
      config = module.get_config()
      config.seed = seed
      record(p, config)
      group.append(p)
    groups.append(group)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run(
    [sys.executable, "-c", _TOLERANCE_ALL, json.dumps(groups)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(done.stdout.strip().splitlines()[-1])
  assert len(results) == 2 * SEEDS and all(r["segments"] == 30 for r in results.values()), results
  rejected = {os.path.basename(p): r for p, r in results.items() if r["rejected"]}
  assert not rejected, rejected
  not_accepted = {os.path.basename(p): r for p, r in results.items() if r["status"] != "accepted"}
  assert not not_accepted, not_accepted


@pytest.mark.parametrize(
  "text, words",
  [
    ('{"delta": {"cosine": 2}, "margin": 10, "segments": [], "proof_root": "x"}', "a bound for each of l1"),
    ('{"delta": {"l1": true, "l2": 1, "linf": 1, "cosine": 1}, "margin": 10, "segments": [], "proof_root": "x"}',
     "delta.l1: expected a number, got True"),
    ('{"delta": {"l1": 1' + "0" * 400 + ', "l2": 1, "linf": 1, "cosine": 1}, "margin": 1, "segments": [], "proof_root": "x"}',
     "delta: "),
    ("[" * 100_000 + "]" * 100_000, "unreadable calibration \\(RecursionError"),
    ('{"delta": {"l1": 1, "l2": 1, "linf": 1, "cosine": 1}, "margin": 1, "segments": {}, "proof_root": "x"}',
     "segments: expected a list"),
  ],
)  # fmt: skip
def test_a_malformed_calibration_file_is_one_line(tmp_path, text, words):
  """A delta naming only cosine left l1, l2 and linf unbounded: a forged proof passed within it."""
  path = tmp_path / "calibration.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=words) as e:
    tolerance.load(str(path))
  assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
