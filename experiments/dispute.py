"""Settles who trained a model: ``python -m experiments.dispute --model=PATH --claim=NAME:PROOF_DIR[:COMMITMENT] ...``.

``--model`` is the disputed model: an Orbax checkpoint directory, a
safetensors file or a Flax msgpack file (the parameters, and optionally the
BatchNorm statistics). For every claim it reports whether the proof verifies
(``--strategy``, default ``all``: a dispute is worth a full replay), whether
its final state is the model (bit for bit, or after a cast to the file's
lower precision, stated as such), where its initial state comes from (its
seed, another claimant's final state, the disputed model) and what its
commitment shows; a claim that cannot be used is reported with the reason.
Every proof is replayed whole: a dispute is worth it.

A proof is bound to its owner's key (its seed derives from the public key),
so the dispute establishes the key that trained the model. Proofs and
commitments are public and can be copied, so it names the claimant who
holds that key only with ``--challenge=TEXT`` (a fresh text the arbitrator
picks): every claimant answers with a commitment signed over it
(``experiments.commit --challenge=TEXT``), which only the key's holder can
make. Commitment times are self-claimed and decide nothing.
It ends with a verdict and exits 0 when the key is established (and, with
``--challenge``, one claimant), 1 when not, 2 when the model or the
arguments are unusable. ``--report``
writes everything as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

from absl import app, flags, logging

from experiments import cli
from pol_jax import build, ownership


def parse_claim(text: str):
  parts = text.split(":")
  if len(parts) not in (2, 3) or not all(parts[:2]):
    raise cli.UsageError(f"--claim={text!r}: expected NAME:PROOF_DIR or NAME:PROOF_DIR:COMMITMENT")
  return ownership.Claim(parts[0], parts[1], parts[2] if len(parts) == 3 and parts[2] else None)


def table(findings) -> str:
  lines = []
  for f in findings:
    lines.append(f"claimant {f.name}" + ("   <- ESTABLISHED" if f.established else ""))
    if not f.usable:
      lines.append(f"  unusable claim: {f.reason}")
      continue
    proof_line = "verifies" if f.verified else f"fails ({', '.join(f.failed_checks)})"
    lines += [
      f"  proof:       {proof_line}: {f.verdict}",
      f"  model:       {f.model}: {f.model_detail}",
      f"  init:        {f.origin}",
      f"  key:         {f.owner}",
      f"  commitment:  {f.commitment}" + (f", claims the time {f.committed_at}" if f.committed_at else ""),
    ]
    if f.note:
      lines.append(f"  note:        {f.note}")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  cli.set_deterministic_flags()
  try:
    claims = [parse_claim(c) for c in _CLAIM.value]
    names = [c.name for c in claims]
    if len(set(names)) != len(names):
      raise cli.UsageError("--claim: every claimant needs its own NAME")
    if _PROGRAM.value:
      build.user_builder(_PROGRAM.value)  # importable here, before any claim is examined
  except build.ProgramUnavailable as e:
    print(f"error: --program: {e}", file=sys.stderr)
    sys.exit(2)
  except cli.UsageError as e:
    print(f"error: {cli.in_flags(str(e))}", file=sys.stderr)
    sys.exit(2)
  findings, verdict, status = ownership.settle(
    _MODEL.value,
    claims,
    functools.partial(build.rebuild, program=_PROGRAM.value),
    challenge=_CHALLENGE.value,
    builder=_PROGRAM.value or build.BUILDER,
  )
  verdict = cli.in_flags(verdict)
  if status == 2:
    print(f"error: {verdict}", file=sys.stderr)
    sys.exit(2)
  print(table(findings))
  print()
  print(verdict)
  if _REPORT.value:
    with open(_REPORT.value, "w") as f:
      json.dump(
        {"verdict": verdict, "status": status, "claimants": [dataclasses.asdict(x) for x in findings]}, f, indent=1
      )
  sys.exit(status)


if __name__ == "__main__":
  _MODEL = flags.DEFINE_string("model", None, "The disputed model (Orbax dir, .safetensors, .msgpack).", required=True)
  _CLAIM = flags.DEFINE_multi_string("claim", None, "NAME:PROOF_DIR[:COMMITMENT], once per claimant.", required=True)
  _PROGRAM = flags.DEFINE_string("program", None, "package.module:build that made the proofs (a user's program).")
  _CHALLENGE = flags.DEFINE_string("challenge", None, "A fresh text every claimant's commitment must answer.")
  _REPORT = flags.DEFINE_string("report", None, "Write the findings and the verdict as JSON.")
  app.run(main, flags_parser=cli.parse_flags)
