"""Calibrates the tolerance mode: ``python -m experiments.calibrate --proof=DIR [--out=FILE]``.

Replays every segment of a proof (or ``--segments`` Fiat-Shamir ones) exactly
(they must match) and with the vmapped tolerance replay, measures the honest
reproduction noise per metric, and writes delta = max(noise x margin, floor)
and the rejection bounds (``tolerance.HONEST_RANGE``) to a JSON file for
``experiments.verify --mode=tolerance --calibration=FILE``. Beyond delta and
inside those bounds a segment is undecided, never rejected.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from experiments import cli
from pol_jax import build, distances, proof, tolerance


def run(
  proof_dir: str, segments: int | None = None, margin: float = 10.0, chunk: int = 16, devices: int | None = None
) -> dict:
  program, train = build.rebuild(proof_dir)
  return tolerance.calibrate(
    proof_dir, program, train, num_segments=segments, margin=margin, chunk=chunk, devices=devices
  )


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  cli.set_deterministic_flags()  # before JAX starts a backend
  out = _OUT.value or os.path.join(os.path.dirname(os.path.abspath(_PROOF.value)), "calibration.json")
  try:
    record = run(_PROOF.value, _SEGMENTS.value, _MARGIN.value, _CHUNK.value, _DEVICES.value)
  except (proof.ProofError, ValueError, cli.UsageError) as e:
    print(f"error: {cli.in_flags(str(e), {'n': '--segments'})}", file=sys.stderr)
    sys.exit(2)
  with open(out, "w") as f:
    json.dump(record, f, indent=1)
  bitwise = sum(s["bitwise"] for s in record["segments"])
  print(
    f"calibrated on {len(record['segments'])} segments of proof {record['proof_root'][:16]}... "
    f"({bitwise} reproduced bit for bit by the vmapped replay)"
  )
  print(f"{'metric':<7} {'noise':>10} {'delta':>10}")
  for m in distances.METRICS:
    print(f"{m:<7} {record['noise'][m]:>10.3g} {record['delta'][m]:>10.3g}")
  print(f"margin {record['margin']}x, floor {record['floor']}; written to {out}")


if __name__ == "__main__":
  # Flags exist only when this module runs as a program, so the experiments modules can be
  # imported together as libraries (the notebook does).
  _PROOF = flags.DEFINE_string("proof", None, "Proof directory (an honest proof).", required=True)
  _SEGMENTS = flags.DEFINE_integer(
    "segments", None, "Measure this many Fiat-Shamir segments (default: every segment).", lower_bound=1
  )
  _MARGIN = flags.DEFINE_float("margin", 10.0, "delta = noise x margin (at least the floor).", lower_bound=1.0)
  _CHUNK = flags.DEFINE_integer("chunk", 16, "Segments per vmapped call.", lower_bound=1)
  _DEVICES = flags.DEFINE_integer("devices", None, "Local devices to use (default: all).")
  _OUT = flags.DEFINE_string("out", None, "Where to write the calibration (default: beside the proof).")
  app.run(main, flags_parser=cli.parse_flags)
