"""Commits to a finished proof: ``python -m experiments.commit --proof=DIR [--key=KEYFILE]``.

Writes a small signed record (``--out``, default ``DIR/../commitment.json``):
the proof's root digest, the digest of its final model, the time and an
Ed25519 signature by the prover's key, to publish where a later dispute can
point to it (a transparency log, a git tag, an email). The key must be the
proof's owner key (``experiments.train --key``; default ``owner.key`` beside
the proof directory, where ``experiments.train`` creates it): a proof is bound
to it, and no other key can commit to it. ``--challenge=TEXT`` answers an arbitrator's challenge in a dispute.
Exit status 0, or 2 with a one-line error.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from experiments import cli
from pol_jax import ownership, proof


def main(argv) -> None:
  del argv
  out = _OUT.value or os.path.join(os.path.dirname(os.path.abspath(_PROOF.value)), "commitment.json")
  try:
    key = _KEY.value or os.path.join(os.path.dirname(os.path.abspath(_PROOF.value)), "owner.key")
    record = ownership.commit(_PROOF.value, ownership.load_key(key), challenge=_CHALLENGE.value)
    if os.path.exists(out):
      raise ownership.DisputeError(f"{out}: a commitment is already there; it is never overwritten (pass --out)")
    proof.write_json_atomic(out, record)
  except (ownership.DisputeError, proof.ProofError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"commitment: {out}")
  print(json.dumps(record, indent=1))


if __name__ == "__main__":
  _PROOF = flags.DEFINE_string("proof", None, "The finished proof directory.", required=True)
  _KEY = flags.DEFINE_string("key", None, "The proof's owner key, Ed25519 PEM (default: owner.key beside the proof).")
  _CHALLENGE = flags.DEFINE_string("challenge", None, "An arbitrator's challenge to answer (a dispute's --challenge).")
  _OUT = flags.DEFINE_string("out", None, "Where to write the record (default: commitment.json beside the proof).")
  app.run(main, flags_parser=cli.parse_flags)
