"""Byzantine workers: what a distributed run's workers play instead of training honestly.

:class:`Worker` is a :class:`pol_jax.distributed.Worker` that, told to, plays
one of :data:`BEHAVIOURS` or :data:`FAULTS`; an engine runs it when given it
(``distributed.RayEngine(behaviours, build, config, worker=byzantine.Worker)``),
and ``engine.behaviours[w]`` says what worker ``w`` plays in the next run.
The forged proofs are made of the same moves as the spoofing attacks
(:mod:`experiments.forge`).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time

import jax
import numpy as np

from experiments import forge
from pol_jax import challenge, distributed, proof, recorder, training

BEHAVIOURS = (
  "honest",
  "random",  # returns a random update
  "sign-flip",  # returns minus its honest update
  "scale",  # returns ten times its honest update
  "lazy",  # trains half its steps and claims all of them
  "free-rider",  # copies another worker's proof
  "stale",  # withholds its first round's proof, then submits it in every later round
  "wrong-data",  # trains on examples it was not assigned
  "spoof",  # the infinitesimal-update attack: interpolated checkpoints, a tiny declared learning rate
  "peek",  # reads the whole shared storage, trains only the segments it predicts will be replayed, poisons the rest
)
FAULTS = ("crash", "slow")
"""Not Byzantine, just unreliable: the worker process dies, or answers ``slow_seconds`` late (after the deadline)."""


class Worker(distributed.Worker):
  """A worker that plays any of :data:`BEHAVIOURS` and :data:`FAULTS`, chosen per run.

  The behaviour is chosen per call, so one set of workers serves many
  experiments; :meth:`reset` forgets what a worker kept between rounds (a
  stale worker's withheld proof). ``slow_seconds`` (an engine's
  ``options``) is how long a ``slow`` worker sleeps.
  """

  BEHAVIOURS = BEHAVIOURS + FAULTS

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.withheld: str | None = None

  def reset(self) -> None:
    self.withheld = None

  def play(self, behaviour, state, assignment, proof_dir, slow_seconds: float = 0.0) -> bool:
    b = behaviour
    if b == "crash":
      os._exit(17)
    if b == "slow":
      time.sleep(slow_seconds)
    if b == "free-rider":
      return self._copy_other(proof_dir, assignment)
    if b == "stale":
      return self._stale(state, assignment, proof_dir)
    if b in ("lazy", "wrong-data", "spoof"):
      self._fabricate(b, state, assignment, proof_dir)
    elif b == "peek":
      self._peek(state, assignment, proof_dir)
    else:
      self.train(state, assignment, proof_dir)
      if b in ("random", "sign-flip", "scale"):
        self._tamper_final(b, state, assignment, proof_dir)
    return True

  def _tamper_final(self, behaviour, state, assignment, proof_dir):
    program = training.Program(distributed.starting_at(state), self.program.step)
    manifest = proof.read_json(os.path.join(proof_dir, proof.MANIFEST), proof.MANIFEST)
    honest = recorder.final_state(proof_dir, program, manifest)
    start = distributed.starting_at(state)(None)
    rng = np.random.default_rng(assignment.seed)

    def leaf(s, h):
      s, h = np.asarray(s), np.asarray(h)
      if not np.issubdtype(s.dtype, np.floating):
        return h
      if behaviour == "random":
        return (s + rng.normal(0.0, 1.0, s.shape)).astype(s.dtype)
      factor = -1.0 if behaviour == "sign-flip" else 10.0
      return (s + factor * (h.astype(np.float64) - s)).astype(s.dtype)

    forge.replace_checkpoint(proof_dir, jax.tree.map(leaf, start, honest).replace(step=honest.step))

  def _fabricate(self, behaviour, state, assignment, proof_dir):
    """lazy, wrong-data and spoof: states and an index log written as a sealed proof."""
    plan = assignment.plan
    log = forge.seed_order(plan, len(self.dataset))
    program = training.Program(distributed.starting_at(state), self.program.step)
    bounds = proof.segments(plan)
    if behaviour == "spoof":
      # Fang et al.'s infinitesimal update: checkpoints interpolated to a poisoned target (the start pushed
      # along a random direction), nothing trained. (Declaring a tiny learning rate, as against a model
      # owner, gains nothing here: the coordinator replays with its own program.)
      start = training.to_host(program.init(training.derive_keys(plan.seed).init))
      target = forge.perturb(start.params, np.random.default_rng(assignment.seed), 0.05)
      states = forge.interpolated(start, bounds, params=target)
    elif behaviour == "wrong-data":  # its own choice of examples, under the assigned seed
      log = forge.seed_order(plan, len(self.dataset), seed=plan.seed ^ 1)
      states = forge.checkpoints(program, self.dataset, plan, log)
    else:  # lazy: trains the first half of its segments and claims the steps of the rest without taking them
      honest = len(bounds) // 2
      states = forge.checkpoints(
        program, self.dataset, plan, log,
        lambda i, s, end, train: train() if i < honest else s.replace(step=np.int32(end)),
      )  # fmt: skip
    forge.write_proof(proof_dir, program, self.dataset, plan, states, log, self.recorded_config(assignment))

  def _peek(self, state, assignment, proof_dir):
    """peek: reads every file of the shared storage, predicts the coordinator's draw, trains only what it predicts.

    Whatever it finds that names a verifier secret, or a verifier seed for
    this round and worker, gives it a prediction of the segments a
    ``uniform`` judgement replays (as the coordinator derived them when it
    kept a secret in ``setup.json``). It trains those and the last segment
    (always replayed) from their recorded starts and poisons every other
    one (its end is its start pushed along a random direction), so its
    final state is poisoned too. With nothing found, it trains the last
    segment only.
    """
    workdir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(proof_dir))))
    clues = _clues(workdir, assignment.round, assignment.worker)
    plan = assignment.plan
    bounds = proof.segments(plan)
    n = clues["segments"] or 8
    predicted = {len(bounds) - 1}
    for seed in clues["seeds"]:
      predicted.update(challenge.including_last(len(bounds), n, lambda c, m, s=seed: challenge.uniform(c, m, s)))
    log = forge.seed_order(plan, len(self.dataset))
    program = training.Program(distributed.starting_at(state), self.program.step)
    rng = np.random.default_rng(assignment.nonce)

    def train_predicted(i, s, end, train):
      return train() if i in predicted else s.replace(step=np.int32(end), params=forge.perturb(s.params, rng, 0.05))

    states = forge.checkpoints(program, self.dataset, plan, log, train_predicted)
    forge.write_proof(proof_dir, program, self.dataset, plan, states, log, self.recorded_config(assignment))

  def _copy_other(self, proof_dir, assignment, timeout: float = 120.0) -> bool:
    """free-rider: waits for the next worker's proof of this round and submits a copy of it."""
    root = os.path.dirname(os.path.dirname(proof_dir))
    other = distributed.worker_dir(root, assignment.round, (assignment.worker + 1) % self.workers)
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(other, proof.MANIFEST)):
      if time.monotonic() > deadline:
        return False
      time.sleep(0.05)
    shutil.copytree(other, proof_dir)
    return True

  def _stale(self, state, assignment, proof_dir) -> bool:
    if self.withheld is None:  # first round: train honestly, keep the proof, submit nothing
      self.withheld = proof_dir + ".withheld"
      shutil.rmtree(self.withheld, ignore_errors=True)
      self.train(state, assignment, self.withheld)
      return False
    shutil.copytree(self.withheld, proof_dir)
    return True


def _clues(workdir: str, round_: int, worker: int, max_file: int = 1 << 20) -> dict:
  """What the ``peek`` worker learns by reading every file under ``workdir``: verifier seeds it can predict.

  Every JSON value under a key that names a secret (a hex string) gives the
  seed the coordinator once derived from it for ``(round_, worker)``; every
  integer under a key that names a seed, in a record of this round and
  worker, is taken as that judgement's verifier seed. ``segments`` is the
  setup's n, if a file states it.
  """
  seeds, segments = [], None

  def walk(node, r=None, w=None):
    nonlocal segments
    if isinstance(node, dict):
      r = node["round"] if isinstance(node.get("round"), int) else r
      w = node["worker"] if isinstance(node.get("worker"), int) else w
      if isinstance(node.get("segments"), int) and "strategy" in node:
        segments = node["segments"]
      for key, value in node.items():
        name = str(key).lower()
        if "secret" in name and isinstance(value, str):
          try:
            seeds.append(distributed.round_seed(int(value, 16) % (2**62), round_, worker))
          except ValueError:
            pass
        elif "seed" in name and isinstance(value, int) and (r, w) == (round_, worker):
          seeds.append(value)
        else:
          walk(value, r, w)
    elif isinstance(node, list):
      for value in node:
        walk(value, r, w)

  for d, _, files in os.walk(workdir):
    for f in files:
      path = os.path.join(d, f)
      try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or os.path.getsize(path) > max_file:
          continue
        with open(path, "rb") as fh:
          walk(json.loads(fh.read()))
      except (OSError, ValueError, RecursionError):
        continue
  return {"seeds": seeds, "segments": segments}
