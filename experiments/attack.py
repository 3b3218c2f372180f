"""Spoofing attacks on Proof-of-Learning, against our verifier and the paper's.

  python -m experiments.attack --attack=infinitesimal-update --workdir=runs/attack
  python -m experiments.attack --all --workdir=runs/attack --out=attacks.json

Each attack starts from a victim: an honest run of ``--config`` recorded in
``WORKDIR/victim``, whose final model the attacker has "stolen". It writes a
spoofed proof claiming that model (or, for tampering, an edited copy of the
victim's proof) to ``WORKDIR/<attack>/proof``, and records its cost relative
to the victim's honest training. Every spoof is then verified twice:

* ours (the default): exact replay, seed-derived init and data order,
  ``fiat-shamir`` sampling of ``--segments`` segments (always with the last),
  and the same with every segment replayed (``all``);
* the paper's: tolerance replay with the paper code's default raw deltas,
  top-Q (Q=2) per epoch, the KS initialisation check, no order check.

``--all`` prints attack x verifier -> accepted / rejected, with the check that
caught it and the attack's cost, and writes the table as JSON to ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import build

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")


@dataclasses.dataclass
class Victim:
  """The honest run an attacker steals from."""

  config: object
  proof_dir: str
  train: object
  program: object
  manifest: dict
  stolen: object
  """The final state of the honest run: the stolen model (with its BatchNorm statistics)."""
  seconds: float
  """What recording the honest run cost (the denominator of every attack's cost)."""


def victim(config, workdir: str) -> Victim:
  """Records (or reuses) the honest run in ``workdir/victim``."""
  from pol_jax import proof, recorder

  proof_dir = os.path.join(workdir, "victim", "proof")
  summary = os.path.join(workdir, "victim", "summary.json")
  train = build.dataset(config, "train")
  program = build.program(config, train)
  if os.path.exists(os.path.join(proof_dir, proof.MANIFEST)) and os.path.exists(summary):
    manifest = proof.read_json(os.path.join(proof_dir, proof.MANIFEST), proof.MANIFEST)
    with open(summary) as f:
      seconds = json.load(f)["seconds"]
  else:
    shutil.rmtree(os.path.join(workdir, "victim"), ignore_errors=True)
    t0 = time.perf_counter()
    manifest = recorder.record(proof_dir, program, train, build.plan(config), config=config.to_dict())
    seconds = time.perf_counter() - t0
    with open(summary, "w") as f:
      json.dump({"seconds": seconds, "root": manifest["root"]}, f)
  stolen = recorder.final_state(proof_dir, program, manifest)
  return Victim(config, proof_dir, train, program, manifest, stolen, seconds)


def _declared(v: Victim, **fields):
  c = v.config.copy_and_resolve_references()
  for name, value in fields.items():
    c[name] = value
  return c


def infinitesimal_update(v: Victim, out: str) -> dict:
  """Fang et al.: a rank-matched fake init, interpolated to the stolen weights in sub-delta steps.

  Declares a tiny constant learning rate and no weight decay, so replaying a
  segment barely moves the weights, and takes enough segments that each
  interpolation step is below half the paper's default deltas.
  """
  from pol_jax import attacks, distances, sampling, training
  from pol_jax import verify as verify_lib

  config = _declared(v, learning_rate=1e-9, schedule="constant", weight_decay=0.0, seed=v.config.seed + 1)
  program = build.program(config, v.train)
  keys = training.derive_keys(config.seed)
  fresh = training.to_host(program.init(keys.init))
  start = fresh.replace(params=attacks.rank_match(fresh.params, v.stolen.params))
  total = distances.distances(start.params, v.stolen.params)
  delta = verify_lib.PAPER_TOLERANCE.delta
  segments = max(2, *(math.ceil(total[m] / (0.5 * delta[m])) for m in ("l1", "l2", "linf")))
  config.steps = segments * config.k
  plan = build.plan(config)
  states = [
    start.replace(
      step=np.int32(i * plan.k),
      params=attacks.interpolate(start.params, v.stolen.params, i / segments),
      model_state=attacks.interpolate(start.model_state, v.stolen.model_state, i / segments),
    )
    for i in range(segments + 1)
  ]
  log = sampling.index_log(keys.order, len(v.train), plan.batch_size, plan.steps)
  attacks.write_proof(out, program, v.train, plan, states, log, config.to_dict())
  return {"segments": segments, "declared_learning_rate": config.learning_rate}


def blindfold_top_q(v: Victim, out: str, q: int = 2) -> dict:
  """Fang et al.: per epoch, Q honest segments first, the rest interpolated in smaller steps.

  Top-Q replays the Q largest updates per epoch, which are the honest ones;
  every other segment moves the weights towards the stolen ones by less.
  """
  from pol_jax import attacks, sampling, training

  per_epoch = sampling.steps_per_epoch(len(v.train), v.config.batch_size)
  k = max(1, per_epoch // (4 * q))
  epochs = max(1, math.ceil(v.config.steps / per_epoch))
  config = _declared(v, k=k, steps=epochs * per_epoch - (epochs * per_epoch) % k, schedule="constant")
  plan = build.plan(config)
  program = build.program(config, v.train)
  keys = training.derive_keys(config.seed)
  log = sampling.index_log(keys.order, len(v.train), plan.batch_size, plan.steps)
  segment = training.make_segment(program.step, plan.runner)
  state = training.to_host(program.init(keys.init))
  bounds = [(s, min(s + k, plan.steps)) for s in range(0, plan.steps, k)]
  honest = {i for i, (s, _) in enumerate(bounds) if (s % per_epoch) // k < q}
  states, honest_steps, left = [state], 0, len(bounds) - len(honest)
  for i, (s, e) in enumerate(bounds):
    if i in honest:
      state, _ = segment.run(state, v.train.batch(log[s:e]), keys.step)
      state = training.to_host(state)
      honest_steps += e - s
    else:
      state = state.replace(
        step=np.int32(e),
        params=attacks.interpolate(state.params, v.stolen.params, 1.0 / left),
        model_state=attacks.interpolate(state.model_state, v.stolen.model_state, 1.0 / left),
      )
      left -= 1
    states.append(state)
  attacks.write_proof(out, program, v.train, plan, states, log, config.to_dict())
  return {"segments": len(bounds), "honest_segments": len(honest), "honest_steps": honest_steps}


def forging(v: Victim, out: str, candidates: int = 4) -> dict:
  """Thudi et al.: every batch replaced by the best of M random others, checkpoints kept.

  For each step the forger runs M candidate batches from the honest state and
  keeps the one whose step lands closest (l2) to the honest next state; the
  proof claims those batches and keeps the victim's checkpoints.
  """
  import jax

  from pol_jax import attacks, distances, proof, recorder, training

  plan = recorder.Plan.from_manifest(v.manifest)
  keys = training.derive_keys(plan.seed)
  log = proof.read_npy(os.path.join(v.proof_dir, proof.INDICES), proof.INDICES, (plan.steps, plan.batch_size), "<i4")
  one = training.make_segment(v.program.step, "loop").compiled
  rng = np.random.default_rng(1)
  forged = log.copy()
  states = []
  for start, end in recorder.segments(plan):
    state, _ = proof.restore(v.proof_dir, start, v.stolen, v.manifest["checkpoints"][str(start)])
    states.append(state)
    for t in range(start, end):
      target, _ = one(state, v.train.batch(log[t]), keys.step)
      best = None
      for _ in range(candidates):
        rows = rng.choice(len(v.train), plan.batch_size, replace=False).astype(np.int32)
        landed, _ = one(state, v.train.batch(rows), keys.step)
        d = distances.distances(landed.params, target.params)["l2"]
        if best is None or d < best[0]:
          best = (d, rows)
      forged[t] = best[1]
      state = jax.device_get(target)
  final, _ = proof.restore(v.proof_dir, plan.steps, v.stolen, v.manifest["checkpoints"][str(plan.steps)])
  states.append(final)
  attacks.write_proof(out, v.program, v.train, plan, states, forged, v.manifest["config"])
  return {"candidates_per_step": candidates, "steps_forged": plan.steps}


def retrain_stolen(v: Victim, out: str) -> dict:
  """Fine-tunes the stolen model for two segments and presents an honest proof of that only."""
  from pol_jax import recorder, training

  config = _declared(v, seed=v.config.seed + 2, steps=min(v.config.steps, 2 * v.config.k))
  program = build.program(config, v.train)
  stolen = v.stolen

  def init(key):  # The attacker's init: the stolen model, with a fresh optimizer state and step.
    fresh = program.init(key)
    return fresh.replace(params=stolen.params, model_state=stolen.model_state)

  recorder.record(out, training.Program(init, program.step), v.train, build.plan(config), config=config.to_dict())
  return {"fine_tune_steps": config.steps}


def _tampered_copy(v: Victim, out: str) -> None:
  shutil.copytree(v.proof_dir, out)


def tamper_hyperparameters(v: Victim, out: str) -> dict:
  """The victim's proof, claiming a doubled learning rate (manifest edited and resealed)."""
  from pol_jax import attacks

  _tampered_copy(v, out)
  attacks.reseal(out, lambda b: b["config"].update(learning_rate=b["config"]["learning_rate"] * 2))
  return {}


def _edit_log(v: Victim, out: str, edit) -> None:
  from pol_jax import attacks, proof

  _tampered_copy(v, out)
  path = os.path.join(out, proof.INDICES)
  log = np.load(path)
  edit(log)
  proof.write_npy_atomic(path, log)
  attacks.reseal(out, lambda b: b.update(indices={"sha256": proof.leaf_digest("indices", log)}))


def tamper_reorder(v: Victim, out: str) -> dict:
  """Two steps' batches swapped in the index log (resealed)."""
  _edit_log(v, out, lambda log: _swap(log, 0, -1))
  return {}


def _swap(log, a, b):
  log[[a, b]] = log[[b, a]]


def tamper_substitute(v: Victim, out: str) -> dict:
  """One step's batch replaced by other examples (resealed)."""

  def edit(log):
    log[len(log) // 2] = (log[len(log) // 2] + 1) % int(v.manifest["dataset"]["size"])

  _edit_log(v, out, edit)
  return {}


def tamper_splice(v: Victim, out: str) -> dict:
  """A middle checkpoint replaced by a perturbed copy (resealed); caught only if sampled."""
  from pol_jax import attacks, proof, recorder

  _tampered_copy(v, out)
  plan = recorder.Plan.from_manifest(v.manifest)
  steps = proof.checkpoint_steps(plan.k, plan.steps)
  step = steps[len(steps) // 2]
  state, _ = proof.restore(v.proof_dir, step, v.stolen, v.manifest["checkpoints"][str(step)])
  attacks.replace_checkpoint(out, state.replace(params=attacks.interpolate(state.params, v.stolen.params, 0.01)))
  return {"spliced_step": step}


def tamper_final(v: Victim, out: str) -> dict:
  """An honest proof of the attacker's own (other seed) run, its last checkpoint swapped for the stolen model."""
  from pol_jax import attacks, recorder

  config = _declared(v, seed=v.config.seed + 3)
  program = build.program(config, v.train)
  manifest = recorder.record(out, program, v.train, build.plan(config), config=config.to_dict())
  attacks.replace_checkpoint(out, v.stolen.replace(step=np.int32(manifest["steps"])))
  return {}


ATTACKS = {
  "infinitesimal-update": infinitesimal_update,
  "blindfold-top-q": blindfold_top_q,
  "forging": forging,
  "retrain-stolen": retrain_stolen,
  "tamper-hyperparameters": tamper_hyperparameters,
  "tamper-reorder": tamper_reorder,
  "tamper-substitute": tamper_substitute,
  "tamper-splice": tamper_splice,
  "tamper-final": tamper_final,
}


def spoof(name: str, v: Victim, workdir: str) -> dict:
  """Runs attack ``name`` against ``v``; returns where the spoof is and what it cost."""
  out = os.path.join(workdir, name, "proof")
  shutil.rmtree(os.path.dirname(out), ignore_errors=True)
  os.makedirs(os.path.dirname(out))
  t0 = time.perf_counter()
  details = ATTACKS[name](v, out)
  seconds = time.perf_counter() - t0
  return {"attack": name, "proof": out, "seconds": seconds, "cost": seconds / v.seconds, "details": details}


def judge(proof_dir: str, segments: int = 8) -> dict:
  """Both verifiers' verdicts on a proof, each verifier rebuilding the program from the proof."""
  from pol_jax import verify as verify_lib

  program, train = build.rebuild(proof_dir)
  out = {}
  for name, verdict in (
    ("ours", verify_lib.verify(proof_dir, program, train, strategy="fiat-shamir", num_segments=segments)),
    ("ours-all", verify_lib.verify(proof_dir, program, train, strategy="all")),
    ("paper", verify_lib.paper(proof_dir, program, train)),
  ):
    failed = verdict.failed
    out[name] = {
      "accepted": verdict.accepted,
      "check": failed[0].name if failed else None,
      "detail": failed[0].detail if failed else verdict.summary(),
      "segments_replayed": len(verdict.segments),
    }
  return out


def run(config, workdir: str, names: list[str], segments: int = 8, progress: bool = False) -> dict:
  from tqdm import tqdm

  v = victim(config, workdir)
  rows = []
  for name in tqdm(names, desc="attacks", disable=not progress, leave=False):
    row = spoof(name, v, workdir)
    row["verdicts"] = judge(row["proof"], segments)
    rows.append(row)
  honest = judge(v.proof_dir, segments)
  return {"config": config.to_dict(), "honest_seconds": v.seconds, "honest": honest, "attacks": rows}


def table(result: dict) -> str:
  def cell(verdict):
    return "accepted" if verdict["accepted"] else f"rejected: {verdict['check']}"

  def line(name, cost, v):
    return f"{name:<24} {cost:>7}  {cell(v['ours']):<24} {cell(v['ours-all']):<24} {cell(v['paper']):<24}"

  lines = [
    f"{'attack':<24} {'cost':>7}  {'ours (fiat-shamir n)':<24} {'ours (all segments)':<24} {'paper (top-Q, delta, KS)':<24}",
    line("(honest proof)", "1.00x", result["honest"]),
  ]
  for row in result["attacks"]:
    lines.append(line(row["attack"], f"{row['cost']:.2f}x", row["verdicts"]))
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  build.set_deterministic_flags()  # before JAX starts a backend
  from pol_jax import proof

  if _ALL.value == bool(_ATTACK.value):
    print("error: give --attack=NAME or --all", file=sys.stderr)
    sys.exit(2)
  if _ATTACK.value and _ATTACK.value not in ATTACKS:
    print(f"error: --attack: unknown attack {_ATTACK.value!r} (known: {', '.join(ATTACKS)})", file=sys.stderr)
    sys.exit(2)
  names = list(ATTACKS) if _ALL.value else [_ATTACK.value]
  try:
    result = run(_CONFIG.value, _WORKDIR.value, names, _SEGMENTS.value, progress=sys.stderr.isatty())
  except (build.ConfigError, proof.ProofError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(table(result))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  # Flags exist only when this module runs as a program, so the experiments modules can be
  # imported together as libraries.
  _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "The victim's training config.")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/attack", "Where the victim and the spoofs go.")
  _ATTACK = flags.DEFINE_string("attack", None, "One attack: " + ", ".join(ATTACKS) + ".")
  _ALL = flags.DEFINE_bool("all", False, "Run every attack and print the table.")
  _SEGMENTS = flags.DEFINE_integer("segments", 8, "n for our verifier's fiat-shamir sampling.", lower_bound=1)
  _OUT = flags.DEFINE_string("out", None, "Write the table as JSON to this file.")
  app.run(main, flags_parser=build.parse_flags)
