"""Training across untrusted workers: every update comes with a proof, checked before it is aggregated.

The paper's second application. Each round the coordinator hands every
worker the current state and an :class:`Assignment` (a round seed, from which
the worker's data order and step keys derive, and how many steps of what
size); the worker trains from that state with the same segment runner as
everywhere else and returns a proof of its steps (an ordinary pol-jax proof
whose initial state is the coordinator's). The coordinator checks the proof
(:func:`judge`: size, assignment, then :func:`pol_jax.verify.verify` with the
coordinator's own program, data and a verifier seed the worker cannot
know), aggregates the accepted updates in worker order (:func:`aggregate`,
so a run replays bit for bit) and records the round.

Workers run wherever an engine puts them: :class:`Worker` is a plain class,
which ``experiments.distributed`` runs as Ray actors. :data:`BEHAVIOURS`
lists the Byzantine ones it can play, for experiments and tests.

Everything but :class:`RayEngine` is host-side NumPy and JAX; Ray is
imported only when an engine is made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from pol_jax import attacks, proof, recorder, sampling, training
from pol_jax import data as data_lib
from pol_jax import verify as verify_lib

PyTree = Any

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
)
FAULTS = ("crash", "slow")
"""Not Byzantine, just unreliable: the worker process dies, or answers after the deadline."""

AGGREGATORS = ("mean", "median")


@dataclasses.dataclass(frozen=True)
class Assignment:
  """What a worker must do in a round: ``steps`` steps of ``batch_size`` from ``seed``'s order, recorded every ``k``."""

  round: int
  worker: int
  seed: int
  steps: int
  k: int
  batch_size: int
  runner: str

  @property
  def plan(self) -> recorder.Plan:
    return recorder.Plan(self.seed, self.k, self.steps, self.batch_size, self.runner)


def round_seed(run_seed: int, round_: int, worker: int) -> int:
  """The seed of ``worker``'s data order and step keys in ``round_``: fixed by the run's seed, distinct per pair.

  >>> round_seed(0, 1, 2) == round_seed(0, 1, 2) != round_seed(0, 2, 1)
  True
  """
  digest = hashlib.sha256(f"pol-jax/distributed/v1:{run_seed}:{round_}:{worker}".encode()).digest()
  return int.from_bytes(digest[:8], "big") >> 1


def starting_at(state: PyTree) -> Callable[[Any], PyTree]:
  """An ``init`` that returns the coordinator's state (step 0), whatever the key."""
  start = state.replace(step=np.zeros_like(np.asarray(state.step)))
  return lambda key: start


@dataclasses.dataclass
class Judgement:
  """The coordinator's decision on one worker's submission."""

  worker: int
  status: str
  """``accepted``, ``rejected`` or ``dropped`` (crashed, timed out, nothing returned)."""
  check: str | None = None
  detail: str = ""
  verify_seconds: float = 0.0
  train_seconds: float = 0.0


def check_assignment(manifest: dict, assignment: Assignment) -> str | None:
  """Why the proof is not of ``assignment`` (seed, steps, k, batch size, runner), or None."""
  expected = {
    "seed": assignment.seed,
    "steps": assignment.steps,
    "k": assignment.k,
    "batch_size": assignment.batch_size,
    "runner": assignment.runner,
  }
  wrong = [
    f"{name} {manifest.get(name)!r}, assigned {value!r}"
    for name, value in expected.items()
    if manifest.get(name) != value
  ]
  return "; ".join(wrong) or None


def judge(
  proof_dir: str,
  assignment: Assignment,
  start: PyTree,
  step: training.StepFn,
  dataset: data_lib.Dataset,
  *,
  strategy: str = "uniform",
  num_segments: int = 8,
  seed: int | None = None,
  max_bytes: int,
) -> tuple[Judgement, PyTree | None]:
  """Checks a worker's proof of ``assignment`` from ``start``; returns the judgement and, if accepted, the final state.

  In order: ``size`` (the directory holds at most ``max_bytes``, counted
  before anything is parsed), ``assignment`` (the manifest's seed and shape
  are the ones assigned), then every check of :func:`pol_jax.verify.verify`
  with the coordinator's ``step`` and ``dataset`` and ``start`` as the only
  initial state the init check accepts. A malformed proof is rejected by
  ``integrity`` with its one-line reason.
  """
  t0 = time.perf_counter()

  def rejected(check, detail):
    return Judgement(assignment.worker, "rejected", check, detail, time.perf_counter() - t0), None

  try:
    size = proof.size_bytes(proof_dir)
    if size > max_bytes:
      return rejected("size", f"the proof holds {size} bytes, more than the limit of {max_bytes}")
    manifest = verify_lib.read_manifest(proof_dir)
    wrong = check_assignment(manifest, assignment)
    if wrong:
      return rejected("assignment", f"the proof is not of this worker's assignment: {wrong}")
    program = training.Program(starting_at(start), step)
    verdict = verify_lib.verify(proof_dir, program, dataset, strategy=strategy, num_segments=num_segments, seed=seed)
  except proof.ProofError as e:
    return rejected("integrity", str(e))
  if not verdict.accepted:  # rejected, or undecided here: either way not aggregated
    failed = verdict.failed[0] if verdict.failed else next(c for c in verdict.checks if c.passed is None)
    return rejected(failed.name, failed.detail if verdict.failed else f"undecided: {failed.detail}")
  final = recorder.final_state(proof_dir, program, manifest)
  return Judgement(assignment.worker, "accepted", None, verdict.summary(), time.perf_counter() - t0), final


def final_state_unchecked(proof_dir: str, start: PyTree) -> PyTree | None:
  """The proof's final state as a coordinator without a defence takes it (integrity of that file only)."""
  try:
    manifest = verify_lib.read_manifest(proof_dir)
    return recorder.final_state(proof_dir, training.Program(starting_at(start), None), manifest)
  except (proof.ProofError, proof.IntegrityError, KeyError, ValueError, OSError):
    return None


def aggregate(start: PyTree, finals: Sequence[PyTree], how: str = "mean") -> PyTree:
  """The new coordinator state from the workers' final states, in the order given (worker order).

  Floating leaves: the mean (summed in order, in float64, then cast) or the
  coordinate-wise median. Other leaves (step counters) from the first. With
  no final state, ``start`` is kept. The step is ``start``'s: rounds are
  counted by the coordinator.
  """
  if how not in AGGREGATORS:
    raise ValueError(f"Expected aggregator in {AGGREGATORS}, got {how!r}.")
  if not finals:
    return start

  def leaf(*xs):
    xs = [np.asarray(x) for x in xs]
    if not np.issubdtype(xs[0].dtype, np.floating):
      return xs[0]
    stacked = np.stack([x.astype(np.float64) for x in xs])
    out = stacked.mean(axis=0) if how == "mean" else np.median(stacked, axis=0)
    return out.astype(xs[0].dtype)

  merged = jax.tree.map(leaf, *[f.replace(step=start.step) for f in finals])
  return merged.replace(step=start.step)


class Worker:
  """Trains an assignment and writes its proof, honestly or as one of :data:`BEHAVIOURS`.

  Built once per worker process: ``build()`` -> ``(program, dataset)``, so the
  compiled step is reused every round. The behaviour is chosen per call, so
  one set of workers serves many experiments; :meth:`reset` forgets what a
  worker kept between rounds.
  """

  def __init__(
    self, worker: int, build: Callable[[], tuple[training.Program, data_lib.Dataset]], config: dict, workers: int = 1
  ):
    self.worker, self.config, self.workers = worker, config, workers
    self.program, self.dataset = build()
    self.withheld: str | None = None

  def reset(self) -> None:
    self.withheld = None

  def run(
    self, state: PyTree, assignment: Assignment, proof_dir: str, behaviour: str = "honest", slow_seconds: float = 0.0
  ) -> dict | None:
    """Trains ``assignment`` from ``state``; returns ``{"proof": dir, "seconds": s}``, or None for no submission."""
    if behaviour not in BEHAVIOURS + FAULTS:
      raise ValueError(f"Expected behaviour in {BEHAVIOURS + FAULTS}, got {behaviour!r}.")
    t0 = time.perf_counter()
    shutil.rmtree(proof_dir, ignore_errors=True)
    b = behaviour
    if b == "crash":
      os._exit(17)
    if b == "slow":
      time.sleep(slow_seconds)
    if b == "free-rider":
      submitted = self._copy_other(proof_dir, assignment)
    elif b == "stale":
      submitted = self._stale(state, assignment, proof_dir)
    elif b in ("lazy", "wrong-data", "spoof"):
      self._fabricate(b, state, assignment, proof_dir)
      submitted = True
    else:
      self._honest(state, assignment, proof_dir)
      if b in ("random", "sign-flip", "scale"):
        self._tamper_final(b, state, assignment, proof_dir)
      submitted = True
    return {"proof": proof_dir, "seconds": time.perf_counter() - t0} if submitted else None

  def _config(self, assignment: Assignment, **changes) -> dict:
    return {**self.config, "seed": assignment.seed, "steps": assignment.steps, "k": assignment.k, **changes}

  def _honest(self, state, assignment, proof_dir):
    program = training.Program(starting_at(state), self.program.step)
    recorder.record(proof_dir, program, self.dataset, assignment.plan, config=self._config(assignment))

  def _tamper_final(self, behaviour, state, assignment, proof_dir):
    program = training.Program(starting_at(state), self.program.step)
    manifest = proof.read_json(os.path.join(proof_dir, proof.MANIFEST), proof.MANIFEST)
    honest = recorder.final_state(proof_dir, program, manifest)
    start = starting_at(state)(None)
    rng = np.random.default_rng(assignment.seed)

    def leaf(s, h):
      s, h = np.asarray(s), np.asarray(h)
      if not np.issubdtype(s.dtype, np.floating):
        return h
      if behaviour == "random":
        return (s + rng.normal(0.0, 1.0, s.shape)).astype(s.dtype)
      factor = -1.0 if behaviour == "sign-flip" else 10.0
      return (s + factor * (h.astype(np.float64) - s)).astype(s.dtype)

    attacks.replace_checkpoint(proof_dir, jax.tree.map(leaf, start, honest).replace(step=honest.step))

  def _fabricate(self, behaviour, state, assignment, proof_dir):
    """lazy, wrong-data and spoof: states and an index log written as a sealed proof."""
    plan = assignment.plan
    keys = training.derive_keys(plan.seed)
    log = sampling.index_log(keys.order, len(self.dataset), plan.batch_size, plan.steps)
    program = training.Program(starting_at(state), self.program.step)
    start = training.to_host(program.init(keys.init))
    bounds = recorder.segments(plan)
    config = self._config(assignment)
    if behaviour == "spoof":
      # Fang et al.'s infinitesimal update: checkpoints interpolated to a poisoned target (the start pushed
      # along a random direction), nothing trained. (Declaring a tiny learning rate, as against a model
      # owner, gains nothing here: the coordinator replays with its own program.)
      rng = np.random.default_rng(assignment.seed)
      target = jax.tree.map(
        lambda x: (
          (x + rng.normal(0.0, 0.05, np.shape(x))).astype(np.asarray(x).dtype)
          if np.issubdtype(np.asarray(x).dtype, np.floating)
          else x
        ),
        start.params,
      )
      states = [start] + [
        start.replace(step=np.int32(e), params=attacks.interpolate(start.params, target, (i + 1) / len(bounds)))
        for i, (_, e) in enumerate(bounds)
      ]
    else:
      if behaviour == "wrong-data":  # its own choice of examples, under the assigned seed
        log = sampling.index_log(
          training.derive_keys(plan.seed ^ 1).order, len(self.dataset), plan.batch_size, plan.steps
        )
      segment = training.make_segment(self.program.step, plan.runner)
      honest_segments = len(bounds) // 2 if behaviour == "lazy" else len(bounds)
      states, current = [start], start
      for i, (s, e) in enumerate(bounds):
        if i < honest_segments:
          current, _ = segment.run(current, self.dataset.batch(log[s:e]), keys.step)
          current = training.to_host(current)
        else:  # lazy: claims the step without taking it
          current = current.replace(step=np.int32(e))
        states.append(current)
    attacks.write_proof(proof_dir, program, self.dataset, plan, states, log, config)

  def _copy_other(self, proof_dir, assignment, timeout: float = 120.0) -> bool:
    """free-rider: waits for the next worker's proof of this round and submits a copy of it."""
    other = os.path.join(os.path.dirname(proof_dir), _worker_dir((assignment.worker + 1) % self.workers))
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
      self._honest(state, assignment, self.withheld)
      return False
    shutil.copytree(self.withheld, proof_dir)
    return True


def _worker_dir(worker: int) -> str:
  return f"worker_{worker}"


def worker_dir(root: str, round_: int, worker: int) -> str:
  """Where ``worker``'s proof of ``round_`` goes, under a storage root every node can read."""
  return os.path.join(root, f"round_{round_:05d}", _worker_dir(worker))


DEFENCES = ("none", "pol", "median")
"""none: average every returned update; pol: verify each proof, average the accepted; median: coordinate-wise median."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a coordinator runs: the same setup with the same workers gives the same states, round by round."""

  seed: int
  workers: int
  rounds: int
  steps: int
  """Local steps per worker and round."""
  k: int
  batch_size: int
  runner: str
  defence: str = "pol"
  strategy: str = "uniform"
  segments: int = 8
  max_bytes: int = 64 << 20
  exclude: bool = False
  """Exclude a worker from later rounds after a rejection."""

  def __post_init__(self):
    if self.defence not in DEFENCES:
      raise ValueError(f"Expected defence in {DEFENCES}, got {self.defence!r}.")
    if self.workers < 1 or self.rounds < 1:
      raise ValueError(f"Expected at least one worker and one round, got {self.workers} and {self.rounds}.")
    recorder.Plan(self.seed, self.k, self.steps, self.batch_size, self.runner)  # validates the rest

  def assignment(self, round_: int, worker: int) -> Assignment:
    seed = round_seed(self.seed, round_, worker)
    return Assignment(round_, worker, seed, self.steps, self.k, self.batch_size, self.runner)


Dispatch = Callable[[int, PyTree, dict[int, Assignment], dict[int, str]], dict[int, Any]]
"""``dispatch(round, state, assignments, proof_dirs) -> {worker: {"proof", "seconds"} | None | "why it was dropped"}``."""

COORDINATOR = "coordinator"
ROUNDS = "rounds.json"
SETUP = "setup.json"


def coordinate(
  workdir: str,
  setup: Setup,
  program: training.Program,
  dataset: data_lib.Dataset,
  dispatch: Dispatch,
  *,
  evaluate: Callable[[PyTree], float] | None = None,
  on_round: Callable[[dict], None] | None = None,
) -> dict:
  """Runs the rounds of ``setup``, or resumes them after the last completed one.

  Worker proofs go to ``workdir/rounds/round_R/worker_W`` (a storage path
  every node must be able to read); the coordinator's own record goes to
  ``workdir/coordinator``: the state after every round (Orbax, with leaf
  digests), and ``rounds.json``, rewritten atomically after each round's state
  is on disk, with every judgement, the roots of the proofs it aggregated
  and the state's digest. A killed coordinator restarted with the same
  arguments resumes after the last round in ``rounds.json`` and ends on the
  same state as an uninterrupted run.

  Returns:
    ``{"state": final state, "rounds": [round records]}``.
  """
  import secrets

  own = os.path.join(workdir, COORDINATOR)
  os.makedirs(own, exist_ok=True)
  setup_path = os.path.join(own, SETUP)
  if os.path.exists(setup_path):
    saved = proof.read_json(setup_path, SETUP)
    if saved.get("setup") != dataclasses.asdict(setup):
      raise proof.ProofError(SETUP, "setup", f"{workdir} holds a run of another setup; use a new --workdir")
    secret = saved["verifier_secret"]
  else:
    secret = secrets.token_hex(32)  # the coordinator's alone: workers never see it
    proof.write_json_atomic(setup_path, {"setup": dataclasses.asdict(setup), "verifier_secret": secret})
  rounds_path = os.path.join(own, ROUNDS)
  done = proof.read_json(rounds_path, ROUNDS) if os.path.exists(rounds_path) else []
  state = starting_at(training.to_host(program.init(training.derive_keys(setup.seed).init)))(None)
  if done:
    state, _ = proof.restore(own, len(done) * setup.steps, state, done[-1]["state_digest"])
  excluded = {w for r in done for w in r.get("excluded", [])}
  writer = proof.Writer(own)
  try:
    for r in range(len(done), setup.rounds):
      assignments = {w: setup.assignment(r, w) for w in range(setup.workers) if w not in excluded}
      dirs = {w: worker_dir(os.path.join(workdir, "rounds"), r, w) for w in assignments}
      start = starting_at(state)(None)
      results = dispatch(r, start, assignments, dirs)
      judgements, finals, roots = [], [], {}
      for w in sorted(assignments):
        result = results.get(w)
        if not isinstance(result, dict):
          judgements.append(Judgement(w, "dropped", None, result or "no submission"))
          continue
        if setup.defence == "pol":
          verifier_seed = round_seed(int(secret, 16) % (2**62), r, w)
          judgement, final = judge(
            result["proof"], assignments[w], start, program.step, dataset,
            strategy=setup.strategy, num_segments=setup.segments, seed=verifier_seed, max_bytes=setup.max_bytes,
          )  # fmt: skip
        else:
          final = final_state_unchecked(result["proof"], start)
          status = "accepted" if final is not None else "dropped"
          judgement = Judgement(w, status, None, "not verified" if final is not None else "unreadable final state")
        judgement.train_seconds = float(result.get("seconds", 0.0))
        judgements.append(judgement)
        if final is not None:
          finals.append(final)
          roots[w] = proof.read_json(os.path.join(result["proof"], proof.MANIFEST), proof.MANIFEST).get("root")
      how = "median" if setup.defence == "median" else "mean"
      state = aggregate(start, finals, how).replace(step=np.asarray((r + 1) * setup.steps, np.int32))
      digest = writer.save(state, {"round": r})
      newly = [j.worker for j in judgements if j.status == "rejected"] if setup.exclude else []
      excluded.update(newly)
      record = {
        "round": r,
        "judgements": [dataclasses.asdict(j) for j in judgements],
        "aggregated": sorted(roots),
        "roots": {str(w): root for w, root in roots.items()},
        "excluded": newly,
        "state_digest": digest,
        "accuracy": evaluate(state) if evaluate else None,
      }
      writer.wait()  # the state is on disk before the round counts as done
      done.append(record)
      proof.write_json_atomic(rounds_path, done)
      if on_round:
        on_round(record)
  finally:
    writer.close()
  return {"state": state, "rounds": done}


class LocalEngine:
  """Runs :class:`Worker` s one after another in this process: for debugging and small runs, no cluster."""

  def __init__(self, behaviours: Sequence[str], build, config: dict):
    self.behaviours = list(behaviours)
    shared = build()  # one program and dataset for every worker: they are identical
    self.workers = [Worker(w, lambda: shared, config, len(self.behaviours)) for w in range(len(self.behaviours))]

  def reset(self) -> None:
    for w in self.workers:
      w.reset()

  def __call__(self, round_, state, assignments, dirs):
    return {w: self.workers[w].run(state, assignments[w], dirs[w], self.behaviours[w]) for w in assignments}

  def shutdown(self) -> None:
    pass


def _ray_worker_class():
  import ray

  return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(Worker)


class RayEngine:
  """Dispatches rounds to :class:`Worker` s running as Ray actors.

  ``address=None`` starts a local Ray cluster (``ray.init()``); ``"HOST:PORT"``
  joins an existing one, whose nodes must have pol-jax installed and reach
  the proof storage path. The state travels through the object store, the
  proofs through the storage path. A worker that crashes or does not answer
  within ``timeout`` seconds is dropped for the round and restarted for the
  next. ``behaviours[w]`` is what worker ``w`` plays (settable between runs).
  """

  def __init__(
    self,
    behaviours: Sequence[str],
    build: Callable[[], tuple[training.Program, data_lib.Dataset]],
    config: dict,
    *,
    address: str | None = None,
    timeout: float = 300.0,
    slow_seconds: float = 0.0,
  ):
    try:
      import ray
    except ImportError:
      raise ImportError(
        "Ray workers need Ray: pip install 'pol-jax[distributed]' (or run them in-process with LocalEngine)"
      ) from None

    if not ray.is_initialized():
      ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    self.behaviours, self.build, self.config = list(behaviours), build, config
    self.timeout, self.slow_seconds = timeout, slow_seconds
    self._cls = _ray_worker_class()
    self.actors = [self._start(w) for w in range(len(self.behaviours))]

  def _start(self, w: int):
    return self._cls.remote(w, self.build, self.config, len(self.behaviours))

  def reset(self) -> None:
    """Forgets what the workers kept between rounds (a stale worker's withheld proof), before a new run."""
    import ray

    ray.get([a.reset.remote() for a in self.actors])

  def __call__(self, round_, state, assignments, dirs):
    import ray

    state_ref = ray.put(state)
    refs = {
      w: self.actors[w].run.remote(state_ref, assignments[w], dirs[w], self.behaviours[w], self.slow_seconds)
      for w in assignments
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout)
    ready = set(ready)
    results = {}
    for w, ref in refs.items():
      if ref not in ready:
        results[w] = f"timed out after {self.timeout:g} s"
        ray.kill(self.actors[w], no_restart=True)
        self.actors[w] = self._start(w)
        continue
      try:
        results[w] = ray.get(ref)
      except ray.exceptions.RayError as e:
        results[w] = f"crashed ({type(e).__name__})"
        self.actors[w] = self._start(w)
    return results

  def shutdown(self) -> None:
    import ray

    for a in self.actors:
      ray.kill(a, no_restart=True)


def audit(workdir: str, setup: Setup, program: training.Program) -> list[str]:
  """Re-checks a coordinator's record: each round's state is the aggregate of the proofs it names.

  For every recorded round: each aggregated worker proof is still there with
  the recorded root, and aggregating their final states (restored and
  checked against their digests) from the previous recorded state gives,
  bit for bit, the recorded state of the round. It does not re-verify the
  worker proofs (:func:`judge` does, given the same start). Returns the
  problems found, none for a faithful record.
  """
  own = os.path.join(workdir, COORDINATOR)
  rounds = proof.read_json(os.path.join(own, ROUNDS), ROUNDS)
  state = starting_at(training.to_host(program.init(training.derive_keys(setup.seed).init)))(None)
  how = "median" if setup.defence == "median" else "mean"
  problems = []
  for record in rounds:
    r = record["round"]
    start = starting_at(state)(None)
    replayed = training.Program(starting_at(start), program.step)
    finals = []
    for w in record["aggregated"]:
      d = worker_dir(os.path.join(workdir, "rounds"), r, w)
      try:
        manifest = verify_lib.read_manifest(d)
        if manifest.get("root") != record["roots"].get(str(w)):
          problems.append(f"round {r}: worker {w}'s proof root is not the recorded one")
          continue
        finals.append(recorder.final_state(d, replayed, manifest))
      except (proof.ProofError, proof.IntegrityError) as e:
        problems.append(f"round {r}: worker {w}'s proof is unusable: {e}")
    expected = aggregate(start, finals, how).replace(step=np.asarray((r + 1) * setup.steps, np.int32))
    try:
      state, _ = proof.restore(own, (r + 1) * setup.steps, expected, record["state_digest"])
    except proof.IntegrityError as e:
      problems.append(f"round {r}: the recorded state is unusable: {e}")
      break
    if proof.leaf_digests(state) != proof.leaf_digests(expected):
      problems.append(f"round {r}: the recorded state is not the aggregate of the proofs the round names")
  return problems
