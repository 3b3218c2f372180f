"""Spoofing attacks on Proof-of-Learning, against our verifier and the paper's.

  python -m experiments.attack --attack=infinitesimal-update --workdir=runs/attack
  python -m experiments.attack --all --workdir=runs/attack --out=attacks.json

Each attack starts from a victim: an honest run of ``--config`` recorded in
``WORKDIR/victim``, whose final model the attacker has "stolen". It writes a
spoofed proof claiming that model (or, for tampering, an edited copy of the
victim's proof) to ``WORKDIR/<attack>/proof``, and records its cost relative
to the victim's honest training. Every spoof is then verified by:

* ours (the default): exact replay, seed-derived init and data order, the
  progress check, and ``top-q+uniform``: top-q, the last segment and
  ``--segments`` others drawn from a fresh verifier seed; since one draw is
  luck, the table shows the probability that a draw catches the spoof,
  computed from which segments fail to replay or move no parameter bit;
* ours with a ``uniform`` draw of ``--segments`` (the last included: the old
  default, which ``splice-stolen`` slips past), with a ``fiat-shamir`` draw
  from the proof's root (non-interactive, and re-rollable: ``tamper-splice``
  grinds it), and with ``all`` segments;
* the paper's: tolerance replay with the paper code's default raw deltas,
  top-Q (Q=2) per epoch, the KS initialisation check, no order check, and
  the prover's own data where it forged some.

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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from tqdm import tqdm

from experiments import cli, forge
from pol_jax import build, challenge, distances, paper, proof, recorder, sampling, store, training, verifier
from pol_jax import data as data_lib

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")
FORGED_DATA = "forged_data.npz"
"""Beside a spoof's proof: the data an attacker presents as its own (adversarial-examples)."""


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
  config = _declared(v, learning_rate=1e-9, schedule="constant", weight_decay=0.0, seed=v.config.seed + 1)
  program = build.program(config, v.train)
  keys = training.derive_keys(build.plan(config).seed)
  fresh = training.to_host(program.init(keys.init))
  start = fresh.replace(params=forge.rank_match(fresh.params, v.stolen.params))
  total = distances.distances(start.params, v.stolen.params)
  delta = paper.PAPER_TOLERANCE.delta
  segments = max(2, *(math.ceil(total[m] / (0.5 * delta[m])) for m in ("l1", "l2", "linf")))
  config.steps = segments * config.k
  plan = build.plan(config)
  states = forge.interpolated(start, proof.segments(plan), params=v.stolen.params, model_state=v.stolen.model_state)
  log = forge.seed_order(plan, len(v.train))
  forge.write_proof(out, program, v.train, plan, states, log, config.to_dict())
  return {"segments": segments, "declared_learning_rate": config.learning_rate}


def blindfold_top_q(v: Victim, out: str, q: int = 2) -> dict:
  """Fang et al.: per epoch, Q honest segments first, the rest interpolated in smaller steps.

  Top-Q replays the Q largest updates per epoch, which are the honest ones;
  every other segment moves the weights towards the stolen ones by less.
  """
  per_epoch = sampling.steps_per_epoch(len(v.train), v.config.batch_size)
  k = max(1, per_epoch // (4 * q))
  epochs = max(1, math.ceil(v.config.steps / per_epoch))
  config = _declared(v, k=k, steps=epochs * per_epoch - (epochs * per_epoch) % k, schedule="constant")
  plan = build.plan(config)
  program = build.program(config, v.train)
  log = forge.seed_order(plan, len(v.train))
  bounds = proof.segments(plan)
  honest = {i for i, (s, _) in enumerate(bounds) if (s % per_epoch) // k < q}

  def honest_or_closer(i, state, end, train):
    if i in honest:
      return train()
    left = sum(j not in honest for j in range(i, len(bounds)))  # this and the later faked segments
    return state.replace(
      step=np.int32(end),
      params=forge.interpolate(state.params, v.stolen.params, 1.0 / left),
      model_state=forge.interpolate(state.model_state, v.stolen.model_state, 1.0 / left),
    )

  states = forge.checkpoints(program, v.train, plan, log, honest_or_closer)
  forge.write_proof(out, program, v.train, plan, states, log, config.to_dict())
  honest_steps = sum(e - s for i, (s, e) in enumerate(bounds) if i in honest)
  return {"segments": len(bounds), "honest_segments": len(honest), "honest_steps": honest_steps}


def forging(v: Victim, out: str, candidates: int = 4) -> dict:
  """Thudi et al.: every batch replaced by the best of M random others, checkpoints kept.

  For each step the forger runs M candidate batches from the honest state and
  keeps the one whose step lands closest (l2) to the honest next state; the
  proof claims those batches and keeps the victim's checkpoints.
  """
  plan = proof.Plan.from_manifest(v.manifest)
  keys = training.derive_keys(plan.seed)
  log = proof.read_npy(os.path.join(v.proof_dir, proof.INDICES), proof.INDICES, (plan.steps, plan.batch_size), "<i4")
  one = training.make_segment(v.program.step, "loop").compiled
  rng = np.random.default_rng(1)
  forged = log.copy()
  states = []
  for start, end in proof.segments(plan):
    state, _ = store.restore(v.proof_dir, start, v.stolen, v.manifest["checkpoints"][str(start)])
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
  final, _ = store.restore(v.proof_dir, plan.steps, v.stolen, v.manifest["checkpoints"][str(plan.steps)])
  states.append(final)
  forge.write_proof(out, v.program, v.train, plan, states, forged, v.manifest["config"])
  return {"candidates_per_step": candidates, "steps_forged": plan.steps}


def adversarial_examples(v: Victim, out: str, iterations: int = 30, step_size: float = 0.5) -> dict:
  """Zhang et al. (S&P 2022), their third attack: fabricated checkpoints, data perturbed to replay onto them.

  The checkpoints are the seed's genuine initialisation linearly interpolated
  to the stolen model over twice the victim's number of segments (at most 16)
  of at most 10 steps: close enough together that the paper's deltas can
  hold. Every step
  gets its own batch: the real examples the seed's order gives that step,
  perturbed by gradient matching (Adam on the inputs, minimising the squared
  distance between the state the step lands on and the interpolated target).
  The proof commits to the perturbed batches as its data (float32, one row
  per step and batch position, under the real dataset's name), which is what
  the paper's verifier, taking the prover's data, checks digests against. Our
  verifier uses its own copy of the data.
  """
  segments = min(16, 2 * (v.config.steps // v.config.k))
  k = min(10, v.config.k)
  config = _declared(v, k=k, steps=segments * k, schedule="constant")
  plan = build.plan(config)
  keys = training.derive_keys(build.plan(config).seed)
  source = forge.seed_order(plan, len(v.train))
  inputs = v.train.inputs[source.ravel()].astype(np.float32)
  labels = v.train.labels[source.ravel()]
  log = np.arange(inputs.shape[0], dtype=np.int32).reshape(source.shape)
  program = build.program(config, data_lib.Dataset(v.train.name, inputs, labels))
  one = training.make_segment(program.step, "loop").compiled
  start = training.to_host(program.init(keys.init))

  def mismatch(x, state, y, target):
    landed, _ = one(state, (x, y), keys.step)
    sq = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), (landed.params, landed.model_state), target)
    return sum(jax.tree.leaves(sq))

  grad = jax.jit(jax.value_and_grad(mismatch))
  adam = optax.adam(step_size)
  state, states, before, after = start, [start], [], []
  for i in range(segments):
    fraction = (i + 1) / segments
    goal = (
      forge.interpolate(start.params, v.stolen.params, fraction),
      forge.interpolate(start.model_state, v.stolen.model_state, fraction),
    )
    begin = (state.params, state.model_state)
    for j in range(k):
      rows = log[i * k + j]
      target = jax.tree.map(lambda a, b, f=(j + 1) / k: a + f * (b - a), begin, goal)
      x, y = jnp.asarray(inputs[rows]), labels[rows]
      opt = adam.init(x)
      for n in range(iterations + 1):
        loss, g = grad(x, state, y, target)
        if n == 0:
          before.append(float(loss) ** 0.5)
        if n == iterations:
          after.append(float(loss) ** 0.5)
          break
        u, opt = adam.update(g, opt)
        x = optax.apply_updates(x, u)
      inputs[rows] = np.asarray(x)
      state = training.to_host(one(state, (x, y), keys.step)[0])
    state = state.replace(params=goal[0], model_state=goal[1])
    states.append(state)
  forged = data_lib.Dataset(v.train.name, inputs, labels)
  forge.write_proof(out, program, forged, plan, states, log, config.to_dict())
  np.savez(os.path.join(os.path.dirname(out), FORGED_DATA), inputs=inputs, labels=labels)
  return {
    "segments": segments,
    "steps": plan.steps,
    "median_step_l2_before": float(np.median(before)),
    "median_step_l2_after": float(np.median(after)),
    "largest_input_change": float(np.abs(inputs - v.train.inputs[source.ravel()]).max()),
  }


def retrain_stolen(v: Victim, out: str) -> dict:
  """Fine-tunes the stolen model for two segments and presents an honest proof of that only."""
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
  _tampered_copy(v, out)
  proof.reseal(out, lambda b: b["config"].update(learning_rate=b["config"]["learning_rate"] * 2))
  return {}


def _edit_log(v: Victim, out: str, edit) -> None:
  _tampered_copy(v, out)
  path = os.path.join(out, proof.INDICES)
  log = np.load(path)
  edit(log)
  proof.write_npy_atomic(path, log)
  proof.reseal(out, lambda b: b.update(indices={"sha256": proof.leaf_digest("indices", log)}))


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


def tamper_splice(v: Victim, out: str, n: int = 8) -> dict:
  """A middle checkpoint replaced by a perturbed copy and resealed, re-rolled until Fiat-Shamir misses it.

  The two segments around the spliced checkpoint no longer replay. The root,
  and so a Fiat-Shamir draw of ``n`` segments, changes with every perturbation,
  so the forger perturbs again until the draw misses both: this is the
  grinding a non-interactive draw allows. A uniform draw from a verifier
  seed chosen after the proof is handed over catches the splice with
  probability ``1 - challenge.pass_probability``; ``all`` always does.
  """
  _tampered_copy(v, out)
  plan = proof.Plan.from_manifest(v.manifest)
  steps = proof.checkpoint_steps(plan.k, plan.steps)
  i = (len(steps) - 1) // 2
  faked = {i - 1, i}
  state, _ = store.restore(v.proof_dir, steps[i], v.stolen, v.manifest["checkpoints"][str(steps[i])])
  hopeless = challenge.pass_probability(len(steps) - 1, n, faked) == 0.0  # every draw includes a faked segment
  for tries in range(1, 2 if hopeless else 201):
    fraction = 0.01 * (1 + tries / 1000)
    sealed = forge.replace_checkpoint(
      out, state.replace(params=forge.interpolate(state.params, v.stolen.params, fraction))
    )
    drawn = challenge.including_last(len(steps) - 1, n, lambda c, m, r=sealed["root"]: challenge.fiat_shamir(c, m, r))
    if not faked & set(drawn):
      break
  return {"spliced_step": steps[i], "faked_segments": sorted(faked), "reseals": tries, "ground": not faked & set(drawn)}


def tamper_final(v: Victim, out: str) -> dict:
  """An honest proof of the attacker's own (other seed) run, its last checkpoint swapped for the stolen model."""
  config = _declared(v, seed=v.config.seed + 3)
  program = build.program(config, v.train)
  manifest = recorder.record(out, program, v.train, build.plan(config), config=config.to_dict())
  forge.replace_checkpoint(out, v.stolen.replace(step=np.int32(manifest["steps"])))
  return {}


def splice_stolen(v: Victim, out: str) -> dict:
  """The attacker's own honest run, but its middle checkpoint holds the stolen model; honest from there on.

  Only the segment ending on the swapped checkpoint fails to replay: a
  uniform draw of n of S misses it with probability (S - n) / (S - 1), so a
  forger who declares a small k (a large S) passes it almost surely. The
  jump is the largest update of its epoch, so top-q replays it.
  """
  config = _declared(v, seed=v.config.seed + 4)
  plan = build.plan(config)
  at = len(proof.segments(plan)) // 2
  forge.splice_stolen(out, build.program(config, v.train), v.train, plan, v.stolen, at, config.to_dict())
  return {"swapped_step": at * plan.k, "faked_segments": [at - 1]}


def splice_stolen_frozen(v: Victim, out: str, steps: int = 120) -> dict:
  """``splice-stolen`` declaring k = 1 and a constant learning rate of 1e-30 (at most ``steps`` steps).

  No float32 weight moves at that rate (unless it is exactly 0, as the
  biases of an MLP's dead ReLU units are), so every segment after the swap
  replays bit for bit from whatever it starts at, and the proof ends on the
  stolen weights bit for bit. The progress check rejects any draw that
  replays one of those segments (the last always is); top-q replays the jump.
  """
  config = _declared(
    v, seed=v.config.seed + 5, k=1, steps=min(steps, v.config.steps), learning_rate=1e-30, schedule="constant"
  )
  plan = build.plan(config)
  at = len(proof.segments(plan)) // 2
  forge.splice_stolen(out, build.program(config, v.train), v.train, plan, v.stolen, at, config.to_dict())
  return {"swapped_step": at, "faked_segments": [at - 1], "declared_learning_rate": config.learning_rate}


ATTACKS = {
  "infinitesimal-update": infinitesimal_update,
  "blindfold-top-q": blindfold_top_q,
  "adversarial-examples": adversarial_examples,
  "forging": forging,
  "retrain-stolen": retrain_stolen,
  "tamper-hyperparameters": tamper_hyperparameters,
  "tamper-reorder": tamper_reorder,
  "tamper-substitute": tamper_substitute,
  "tamper-splice": tamper_splice,
  "tamper-final": tamper_final,
  "splice-stolen": splice_stolen,
  "splice-stolen-frozen": splice_stolen_frozen,
}


TUNED_TO_N = {"tamper-splice"}
"""Attacks that tune themselves to the verifier's published sample size n."""


def spoof(name: str, v: Victim, workdir: str, segments: int = 8) -> dict:
  """Runs attack ``name`` against ``v``; returns where the spoof is and what it cost."""
  out = os.path.join(workdir, name, "proof")
  shutil.rmtree(os.path.dirname(out), ignore_errors=True)
  os.makedirs(os.path.dirname(out))
  t0 = time.perf_counter()
  details = ATTACKS[name](v, out, **({"n": segments} if name in TUNED_TO_N else {}))
  seconds = time.perf_counter() - t0
  return {"attack": name, "proof": out, "seconds": seconds, "cost": seconds / v.seconds, "details": details}


def _forged_data(proof_dir: str, manifest: dict):
  """The data the prover presents (beside the proof, if it forged its own), else None."""
  path = os.path.join(os.path.dirname(proof_dir), FORGED_DATA)
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    return data_lib.Dataset(manifest["dataset"]["name"], z["inputs"], z["labels"])


def _outcome(verdict) -> dict:
  failed = verdict.failed
  return {
    "accepted": verdict.accepted,
    "check": failed[0].name if failed else None,
    "detail": failed[0].detail if failed else verdict.summary(),
    "num_segments": verdict.num_segments,
    "segments": [r.index for r in verdict.segments],
    "false_segments": [r.index for r in verdict.segments if not (r.match or r.within)],
  }


def _drawn(verdict, bad: set[int]) -> dict:
  """A sampled verdict, and the probability that a draw like it catches a proof whose ``bad`` segments
  fail to replay or move no parameter bit (1 when a check that no draw escapes rejects it)."""
  out = {**_outcome(verdict), "seed": verdict.seed}
  by_draw = verdict.accepted or {c.name for c in verdict.failed} <= {"replay", "progress"}
  out["catch_probability"] = verdict.guarantee.catch_probability(bad) if by_draw and verdict.guarantee else 1.0
  if verdict.guarantee:
    out["guarantee"] = verdict.guarantee.describe()
  return out


def judge(proof_dir: str, segments: int = 8) -> dict:
  """Every verifier's verdict on a proof, each rebuilding the program from the proof.

  ``ours``: the default, top-q, the last and a uniform draw of ``segments``
  others from a fresh verifier seed; its ``catch_probability`` is the chance
  that such a draw rejects the proof, from the segments that ``ours-all``
  found false or unmoved (1 when a check other than replay and progress
  rejects it). ``ours-uniform``: ``segments`` drawn uniformly, the last
  included (the old default). ``ours-fiat-shamir``: the draw from the
  proof's root. ``paper``: :func:`pol_jax.paper.paper`, given the prover's own
  data when the prover forged some (the paper's threat model: digests are
  checked against what the prover hands over); ours use the verifier's copy.
  """
  program, train = build.rebuild(proof_dir)
  manifest = proof.read_manifest(proof_dir)
  everything = verifier.verify(proof_dir, program, train, challenge=challenge.All(), builder=build.BUILDER)
  unmoved = []
  if everything.checks[verifier.CHECKS.index("progress")].passed is False:
    unmoved = verifier.unmoved_segments(proof_dir, manifest, range(everything.num_segments))
  bad = {r.index for r in everything.segments if not r.match} | set(unmoved)
  # Every array of every checkpoint was checked by `everything`; the sampled verifiers check what they replay.
  ours = verifier.verify(proof_dir, program, train, challenge=challenge.TopQUniform(n=segments), builder=build.BUILDER)
  out = {"ours": _drawn(ours, bad)}
  out["ours-uniform"] = _drawn(
    verifier.verify(
      proof_dir, program, train, challenge=challenge.Uniform(n=segments), integrity="sampled", builder=build.BUILDER
    ),
    bad,
  )
  out["ours-fiat-shamir"] = _outcome(
    verifier.verify(
      proof_dir,
      program,
      train,
      challenge=challenge.FiatShamir(n=segments),
      integrity="sampled",
      builder=build.BUILDER,
    )
  )
  out["ours-all"] = {**_outcome(everything), "unmoved_segments": unmoved}
  forged = _forged_data(proof_dir, manifest)
  if forged is not None:
    program = build.program(ml_collections.ConfigDict(manifest["config"]), forged)
    # What exact replay alone says of the prover's own data (the data order check would reject it first:
    # its batches are not the seed's order of any dataset the verifier knows).
    out["ours-all"]["given_prover_data"] = _outcome(
      verifier.verify(proof_dir, program, forged, challenge=challenge.All(), order_check=False, builder=build.BUILDER)
    )
  out["paper"] = _outcome(paper.paper(proof_dir, program, forged or train, integrity="sampled", builder=build.BUILDER))
  return out


def run(config, workdir: str, names: list[str], segments: int = 8, progress: bool = False) -> dict:
  cli.bind_owner(config, os.path.join(workdir, "owner.key"))
  v = victim(config, workdir)
  rows = []
  for name in tqdm(names, desc="attacks", disable=not progress, leave=False):
    row = spoof(name, v, workdir, segments)
    row["verdicts"] = judge(row["proof"], segments)
    rows.append(row)
  honest = judge(v.proof_dir, segments)
  return {
    "config": config.to_dict(),
    "segments": segments,
    "honest_seconds": v.seconds,
    "honest": honest,
    "attacks": rows,
  }


def table(result: dict) -> str:
  def cell(verdict):
    if verdict["accepted"] and not verdict.get("catch_probability"):
      return "accepted"
    p = verdict.get("catch_probability", 1.0)
    return f"rejected: {verdict['check']}" if p == 1.0 else f"caught w.p. {p:.2f} (replay)"

  def line(name, cost, v):
    return (
      f"{name:<22} {cost:>6}  {cell(v['ours']):<26} {cell(v['ours-uniform']):<26} {cell(v['ours-fiat-shamir']):<26} "
      f"{cell(v['ours-all']):<22} {cell(v['paper']):<22}"
    )

  n = result.get("segments", 8)
  lines = [
    f"{'attack':<22} {'cost':>6}  {f'ours: top-q+uniform n={n}':<26} {f'uniform n={n}':<26} "
    f"{f'fiat-shamir n={n}':<26} {'ours: all segments':<22} {'paper: top-Q, delta, KS':<22}",
    line("(honest proof)", "1.00x", result["honest"]),
  ]
  for row in result["attacks"]:
    lines.append(line(row["attack"], f"{row['cost']:.2f}x", row["verdicts"]))
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  cli.set_deterministic_flags()  # before JAX starts a backend
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
    print(f"error: {cli.in_flags(str(e))}", file=sys.stderr)
    sys.exit(2)
  print(table(result))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  # Flags exist only when this module runs as a program, so the experiments modules can be
  # imported together as libraries.
  _CONFIG = cli.define_config(_DEFAULT, "The victim's training config.")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/attack", "Where the victim and the spoofs go.")
  _ATTACK = flags.DEFINE_string("attack", None, "One attack: " + ", ".join(ATTACKS) + ".")
  _ALL = flags.DEFINE_bool("all", False, "Run every attack and print the table.")
  _SEGMENTS = flags.DEFINE_integer(
    "segments", 8, "n for our verifier's sampled draws (top-q+uniform: beyond top-q and the last).", lower_bound=1
  )
  _OUT = flags.DEFINE_string("out", None, "Write the table as JSON to this file.")
  app.run(main, flags_parser=cli.parse_flags)
