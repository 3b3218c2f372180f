"""No false rejections: honest proofs over several seeds and both small models are accepted
in a fresh process by every verification mode that applies, and tolerance mode never rejects one.

``POL_HONEST_SEEDS`` sets the number of seeds per model (default 1; 10 gives the 20 full-length
proofs of the tolerance measurement in ``tolerance.HONEST_RANGE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, record, smoke_config

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
