"""No false rejections: honest proofs over several seeds and both small models are accepted
in a fresh process by every verification mode that applies.

``POL_HONEST_SEEDS`` sets the number of seeds per model (default 1; more for a long run).
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
from experiments import build
from pol_jax import tolerance, verify
out = {}
for p in sys.argv[1:]:
  program, train = build.rebuild(p)
  loose = tolerance.Tolerance({"l2": 1e-3, "linf": 1e-3}, source="test: honest vmapped noise is far below")
  out[p] = {
    "exact, all": verify.verify(p, program, train, strategy="all").accepted,
    "exact, fiat-shamir": verify.verify(p, program, train, strategy="fiat-shamir", num_segments=2).accepted,
    "exact, uniform (default, OS seed)": verify.verify(p, program, train, num_segments=2).accepted,
    "exact, uniform": verify.verify(p, program, train, strategy="uniform", num_segments=2, seed=7).accepted,
    "exact, top-q": verify.verify(p, program, train, strategy="top-q").accepted,
    "tolerance, all": verify.verify(p, program, train, strategy="all", mode="tolerance", tolerance=loose).accepted,
    "paper": verify.paper(p, program, train).accepted,
  }
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
