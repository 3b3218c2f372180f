"""``verify``: checks a proof and replays segments of it bit for bit.

:func:`verify` is a pipeline of checks, each a function that returns a
:class:`Check`: :func:`check_integrity`, :func:`check_environment`,
:func:`check_program`, :func:`check_init`, :func:`check_data_order`,
:func:`check_progress`, :func:`check_data` and :func:`check_replay`, which
runs only where the checks before it let it decide. Which segments it
replays is a :mod:`pol_jax.challenge` value, how it replays them a
:mod:`pol_jax.replay` mode. The paper's verifier is :mod:`pol_jax.paper`;
the tolerance mode's calibration is :func:`pol_jax.tolerance.calibrate`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from pol_jax import challenge, distances, fingerprint, isolation, proof, replay, sampling, store, training, workers
from pol_jax import data as data_lib

CHECKS = ("integrity", "environment", "program", "init", "data order", "data", "replay", "progress")


@dataclasses.dataclass
class Check:
  """One check of a verification: ``passed`` is None when it did not run."""

  name: str
  passed: bool | None
  detail: str

  def __post_init__(self):
    self.detail = proof.clip(self.detail)  # it may quote the proof's values


@dataclasses.dataclass
class Verdict:
  """The outcome of :func:`verify`: accepted only if every check passed."""

  accepted: bool
  mode: str
  strategy: str
  root: str | None
  checks: list[Check]
  segments: list[replay.SegmentResult]
  num_segments: int
  tolerance: dict | None = None
  seed: int | None = None
  """The verifier's seed that drew the segments (``uniform``, ``top-q+uniform``), so the draw can be repeated."""

  reproduction: list[dict] | None = None
  """How the verifier reproduced the prover's environment, field by field (see :func:`reproduction`)."""

  guarantee: challenge.Guarantee | None = None
  """What a strategy with a uniform part shows about the segments it did not replay."""

  @property
  def failed(self) -> list[Check]:
    return [c for c in self.checks if c.passed is False]

  @property
  def status(self) -> str:
    """``accepted``; ``rejected`` (a check showed the proof false); or ``undecided``
    (this verifier could not decide, e.g. it cannot reproduce the environment)."""
    if self.accepted:
      return "accepted"
    return "rejected" if self.failed else "undecided"

  def to_json(self) -> dict:
    return {
      "accepted": self.accepted,
      "status": self.status,
      "reproduction": self.reproduction,
      "mode": self.mode,
      "strategy": self.strategy,
      "root": self.root,
      "num_segments": self.num_segments,
      "seed": self.seed,
      "one_false_segment_passes": self.one_false_segment_passes,
      "guarantee": None
      if self.guarantee is None
      else {
        **dataclasses.asdict(self.guarantee),
        "catch": self.guarantee.catch,
        "statement": self.guarantee.describe(),
      },
      "tolerance": self.tolerance,
      "checks": [dataclasses.asdict(c) for c in self.checks],
      "segments": [
        {**dataclasses.asdict(s), "mismatch": s.mismatch, "normalised": s.normalised} for s in self.segments
      ],
    }

  @property
  def one_false_segment_passes(self) -> float | None:
    """For a strategy with a uniform part, the chance that a draw like this one misses one false segment
    that is not replayed whatever the draw (not the last, nor top-q's)."""
    g = self.guarantee
    if g is None or g.population == 0:
      return None
    return challenge.miss_probability(g.population, g.drawn, 1)

  def _drawn(self) -> str:
    if self.seed is not None:
      return f"{self.strategy}, verifier seed {self.seed}"
    return self.strategy

  def summary(self) -> str:
    if self.accepted and self.mode == "exact":
      g = self.guarantee
      line = (
        f"ACCEPTED: {len(self.segments)} of {self.num_segments} segments replayed bit for bit "
        f"(exact mode, {self._drawn()}" + (f": {g.composition()}" if g else "") + ")"
      )
      if g:
        line += f"; {g.statement()}" + ("" if g.catch >= 1.0 else " (challenge=All() replays every segment)")
      return line
    if self.accepted:
      return (
        f"ACCEPTED in tolerance mode: {len(self.segments)} of {self.num_segments} segments within delta "
        f"({self._drawn()}); not a bit-exact verification"
      )
    if self.failed:
      return f"REJECTED by the {self.failed[0].name} check: {self.failed[0].detail}"
    first = next((c for c in self.checks if c.passed is None), Check("?", None, ""))
    return f"UNDECIDED by the {first.name} check: {first.detail}"

  def table(self) -> str:
    """The verdict as a readable text table."""
    lines = [self.summary(), "", f"{'check':<12} {'result':<8} detail"]
    for c in self.checks:
      result = {True: "pass", False: "FAIL", None: "-"}[c.passed]
      lines.append(f"{c.name:<12} {result:<8} {c.detail}")
    if self.reproduction:
      lines += ["", f"{'environment':<18} {'proof':<24} {'here':<24} how"]
      for row in self.reproduction:
        lines.append(f"{row['field']:<18} {str(row['proof']):<24.24} {str(row['here']):<24.24} {row['how']}")
    if self.segments:
      tol = self.mode == "tolerance"
      lines += [
        "",
        f"{'segment':>7} {'steps':>13} {'bits':>4} "
        + (f"{'within':>6} " if tol else "")
        + f"{'l2':>9} {'linf':>9} {'cosine':>9} {'update l2':>9} "
        + (f"{'l2/update':>9} " if tol else "")
        + f"{'seconds':>7}  device",
      ]
      for s in self.segments:
        within = f"{ {True: 'yes', False: 'NO', None: '?'}[s.within]:>6} " if tol else ""
        ratio = f"{s.normalised['l2']:>9.2e} " if tol else ""
        lines.append(
          f"{s.index:>7} {f'{s.start}-{s.end}':>13} {'same' if s.match else 'diff':>4} {within}"
          f"{s.distance['l2']:>9.2e} {s.distance['linf']:>9.2e} {s.distance['cosine']:>9.2e} "
          f"{s.update['l2']:>9.2e} {ratio}{s.seconds:>7.2f}  {s.device}"
        )
    return "\n".join(lines)


def verify(
  proof_dir: str,
  program: training.Program,
  dataset: data_lib.Dataset,
  *,
  challenge: challenge.Challenge = challenge.TopQUniform(),
  replay: replay.Mode = replay.Exact(),
  integrity: str = "full",
  init_check: Callable[[training.TrainState, training.Program], Check] | None = None,
  order_check: bool = True,
  progress_check: bool = True,
  on_segment: Callable[[replay.SegmentResult], None] | None = None,
  builder: str | None = None,
  max_workers: int | None = None,
  versions_matched: str | None = None,
) -> Verdict:
  """Verifies the proof in ``proof_dir`` by bit-exact replay.

  Checks, in order: integrity (the manifest root, every checkpoint, the index
  log and the data digests against their digests), environment (every field
  that changes bits matches the prover's), program (the segment program this
  verifier compiles is the one the prover recorded; see ``builder``), init (the initial state
  is the one the seed derives), data order (the index log is the seed-derived
  order), progress (each chosen segment moves at least one parameter bit: a
  replay that cannot move the weights, because k or the learning rate is too
  small, is evidence of nothing), data (the verifier's own copy of every
  example the chosen segments use has the recorded digest, and the Merkle
  root holds) and replay (each chosen segment, replayed from its recorded
  start with the same runner, lands on the recorded end bit for bit).

  Guarantees:
    An accepted proof shows that the recorded states follow one another by
    running ``program.step`` on the committed data in the seed's order, from
    the seed's initialisation, for every replayed segment; with ``All()``, for
    the whole run. ``TopQUniform`` (the default) always replays top-q (per
    epoch, the largest recorded update under each metric) and the last
    segment, so a proof that jumps to another model in one segment (the
    largest update of its epoch) or swaps its last checkpoint is always
    caught, and a fake top-q misses moves the weights no more than the
    largest honest update of its epoch; it adds n of the other segments
    drawn once from a seed the prover cannot know, so that a proof with m
    faked segments, m = ``ceil(faked_fraction * S)``, is caught with
    probability at least ``detect`` (the verdict's ``guarantee`` states n, m
    and the probability, ``1 - C(P-m, n) / C(P, n)`` for the P other
    segments). ``Uniform`` replays the last and n - 1 of the other S - 1:
    it passes a proof with m faked others with probability ``C(S-1-m, n-1) /
    C(S-1, n-1)`` per draw, (S - n) / (S - 1) for one, which a prover who
    picks a small k makes large. ``FiatShamir`` draws from the proof's root,
    and a forger can reseal a faked proof (any byte changes the root) until
    the draw misses its faked segments, so it bounds only the fraction of
    faked work, and n must be sized for the number of re-rolls a forger can
    afford.

    It does not show who ran the training, when, or that the data were
    obtained lawfully; that the final model is a given file (compare digests);
    or anything about segments not replayed. It is exact replay: it trusts the
    verifier's own JAX, XLA and hardware to compute the step as specified.

  Args:
    proof_dir: the proof directory.
    program: the ``init`` and ``step`` the prover used, rebuilt by the verifier.
    dataset: the verifier's own copy of the training data.
    challenge: which segments to replay (:mod:`pol_jax.challenge`): ``All()``,
      ``TopQ(q)``, ``Uniform(n, seed)``, ``FiatShamir(n)`` or
      ``TopQUniform(q, n, seed)`` (the default). n None: the smallest n that
      catches a proof with ``faked_fraction`` of its segments faked with
      probability ``detect`` (``challenge.sample_size``). seed None: drawn from
      the OS, and reported in the verdict so the draw can be repeated.
    replay: how (:mod:`pol_jax.replay`): ``Exact(devices)`` (the default:
      digest equality; needs the prover's environment), one segment per local
      device at a time (default: all local devices), bit-identical to
      sequential replay; under ``jax.distributed`` every process replays its
      share of the segments on its own devices and the results are gathered,
      so every process returns the same verdict. ``Tolerance(delta, chunk,
      devices)``: ``jit(vmap(...))`` replay of ``chunk`` segments at a time,
      sharded over the devices, accepted when every distance is within
      ``delta`` (a ``tolerance.Thresholds``). Tolerance mode also serves a
      verifier whose environment differs from the prover's; differences are
      reported, not blocking.
    integrity: ``"full"`` restores every checkpoint and checks every array
      against its digest before replaying; ``"sampled"`` checks every
      checkpoint's meta up front and the arrays of the checkpoints the chosen
      segments use as they are restored (faster; a damaged checkpoint that no
      chosen segment uses goes unnoticed, like any unsampled segment).
      ``TopQ`` and ``TopQUniform`` restore every checkpoint for the update
      sizes, so they check every array either way.
    init_check: None: step 0 must equal the seed's initialisation, bit for
      bit; or ``init_check(state0, program) -> Check``, the recorded step 0
      judged otherwise: ``paper.check_init`` is the paper's statistical
      check, for the paper's verifier only: it accepts any init drawn from
      the right distribution, which is what the infinitesimal-update attack
      exploits.
    order_check: check that the index log is the seed's order (the paper's
      verifier does not: its prover chooses the batches).
    progress_check: check that every replayed segment moves a parameter bit
      (the paper's verifier does not).
    on_segment: called with each ``replay.SegmentResult`` of this process.
    builder: ``"module:function"``, importable here, that rebuilds
      ``(program, dataset)`` from a recorded config. With it, exact mode
      reproduces a proof whose CPU thread count, XLA flags or x64 differ from
      this process's by replaying in worker processes pinned to the proof's
      thread count (``pol_jax.workers``), ``floor(cores / threads)`` at once;
      without it such a proof is undecided here. Giving it also says that
      ``program`` is what it builds from the recorded config: a program that
      differs from the recorded one (same environment, same builder version)
      then shows the proof false (exit 1). Without it a differing program
      only says that this verifier's program differs: exact replay still
      decides if it reproduces every state (a step merely wrapped in another
      ``jax.jit`` lowers to other text but computes the same bits), and the
      verdict is undecided (exit 2) if it does not.
    max_workers: at most this many worker processes (default: as many as the
      cores allow).
    versions_matched: set by a caller that re-ran this verification in a
      virtual environment with the proof's versions (``pol_jax.venv``); it is
      reported in the verdict.

  Raises:
    proof.ProofError: unusable input (the CLI exits 2).
    ValueError, TypeError: impossible settings, naming the argument.

  Example (with ``program`` and ``dataset`` built as the prover built them)::

    verdict = pol_jax.verify("runs/default/proof", program, dataset, challenge=pol_jax.All())
    print(verdict.table())
    assert verdict.accepted
  """
  strategy = _settle(challenge, replay, integrity)  # checked, with the verifier's seed drawn where it needs one
  mode, exact = replay, replay.name == "exact"
  inputs = _Inputs.read(proof_dir, program, dataset)
  checks = {name: Check(name, None, "not run") for name in CHECKS}
  skipped = frozenset(name for name, on in (("data order", order_check), ("progress", progress_check)) if not on)
  decide = functools.partial(_decide, skipped=skipped)
  verdict = _undecided(inputs, strategy, mode)
  recorded, checks["integrity"] = check_integrity(inputs, strategy, full=integrity == "full")
  if recorded is None:
    return decide(verdict, checks)
  verdict.guarantee = recorded.guarantee
  env, checks["environment"] = check_environment(inputs.manifest, exact, builder, max_workers, versions_matched)
  verdict.reproduction = env.reproduction
  text_differs, checks["program"] = check_program(inputs, env, exact, builder)
  try:  # these read recorded states: a damaged one fails the integrity check
    own_init = init_check is not None
    checks["init"] = init_check(_state0(inputs, recorded), program) if own_init else check_init(inputs, env, exact)
    checks["data order"] = check_data_order(inputs, recorded.log, env) if order_check else _skipped("data order")
    checks["progress"] = check_progress(inputs, recorded.chosen) if progress_check else _skipped("progress")
  except proof.IntegrityError as e:
    checks["integrity"] = Check("integrity", False, str(e))
    return decide(verdict, checks)
  recorded = recorded.for_replay(inputs.bounds)  # frees the checked states no chosen segment uses
  checks["data"] = check_data(inputs, recorded)
  blocked = _replay_blocked(checks, exact, env, text_differs)
  if blocked:
    checks["replay"] = Check("replay", None, f"not run: {blocked}")
    return decide(verdict, checks)
  recheck_init = not own_init and checks["init"].passed is None  # in a worker with the prover's environment
  verdict.segments, decided = check_replay(
    inputs, recorded, env, mode, strategy.name, text_differs, recheck_init, builder, on_segment
  )
  checks.update(decided)
  return decide(verdict, checks)


@dataclasses.dataclass(frozen=True)
class _Inputs:
  """What the checks compare: the proof as its manifest describes it, and the verifier's program and data."""

  proof_dir: str
  manifest: dict
  plan: proof.Plan
  bounds: list[tuple[int, int]]
  """Each segment's first and last step."""
  keys: training.Keys
  template: Any
  """The state the seed derives, on the host: every recorded state is restored into its structure."""
  program: training.Program
  dataset: data_lib.Dataset

  @classmethod
  def read(cls, proof_dir: str, program: training.Program, dataset: data_lib.Dataset) -> _Inputs:
    manifest = proof.read_manifest(proof_dir)
    plan = proof.Plan.from_manifest(manifest)
    keys = training.derive_keys(plan.seed)
    template = training.to_host(program.init(keys.init))
    return cls(proof_dir, manifest, plan, proof.segments(plan), keys, template, program, dataset)

  @property
  def segment(self) -> training.Segment:
    """The verifier's segment runner: the prover's kind around the verifier's step (memoised)."""
    return training.make_segment(self.program.step, self.plan.runner)


@dataclasses.dataclass(frozen=True)
class _Recorded:
  """What the integrity check read from the proof, each part checked against its digest, and the draw."""

  log: np.ndarray
  """The index log, ``[steps, batch size]``."""
  digests: np.ndarray
  """The data digests, one row per example."""
  chosen: list[int]
  """The segments to replay."""
  guarantee: challenge.Guarantee | None
  checked: dict
  """``{step: (state, meta)}``: states the integrity pass restored and checked, kept for replay."""

  def for_replay(self, bounds: list[tuple[int, int]]) -> _Recorded:
    """Without the checked states that no chosen segment starts or ends on."""
    needed = {step for i in self.chosen for step in bounds[i]}
    return dataclasses.replace(self, checked={step: v for step, v in self.checked.items() if step in needed})


@dataclasses.dataclass(frozen=True)
class _Environment:
  """This verifier's environment against the prover's, and how it is reproduced."""

  differ: list[tuple[str, Any, Any]]
  """``(field, proof's, here)`` of each field that changes bits and differs."""
  portable: bool
  """The proof was recorded with portable numerics."""
  foreign: bool
  """The versions or the hardware differ: the lowered program text depends on them."""
  lowering: list[str]
  """The settings of this process that change the lowered text and differ from the prover's (x64, ...)."""
  pinning: workers.Pinning | None
  """The pinned worker processes that reproduce the prover's threads and flags, if any."""
  reproduction: list[dict]
  """Field by field, how each differing field was reproduced (see :func:`reproduction`)."""


_SKIPPED = {
  "data order": "not checked: the prover chose the batches (paper's verifier)",
  "progress": "not checked (the paper's verifier)",
}


def _skipped(name: str) -> Check:
  return Check(name, None, _SKIPPED[name])


def _settle(strategy: challenge.Challenge, mode: replay.Mode, integrity: str) -> challenge.Challenge:
  """Refuses impossible settings before any work; returns the challenge with the verifier's seed drawn if it needs one."""
  if not isinstance(strategy, challenge.Challenge):
    raise TypeError(f"Expected challenge=All(), TopQ(), Uniform(), FiatShamir() or TopQUniform(), got {strategy!r}.")
  if not isinstance(mode, replay.Mode):
    raise TypeError(f"Expected replay=Exact() or Tolerance(delta), got {mode!r}.")
  if integrity not in ("full", "sampled"):
    raise ValueError(f"Expected integrity 'full' or 'sampled', got {integrity!r}.")
  if isinstance(mode, replay.Tolerance) and mode.delta is None:
    raise ValueError(
      "replay=Tolerance(delta=None): tolerance mode needs a delta: calibrate one (tolerance.calibrate, "
      "experiments.calibrate) or give Tolerance(delta=tolerance.Thresholds(...))."
    )
  replay.local_devices(mode.devices)  # Refuse an impossible device count before any work.
  if not hasattr(strategy, "seed") or strategy.seed is not None:
    return strategy
  if jax.process_count() > 1:
    raise ValueError(
      f"challenge={type(strategy).__name__}(seed=None) across processes needs a seed that every process shares."
    )
  return dataclasses.replace(strategy, seed=secrets.randbits(63))


def _undecided(inputs: _Inputs, strategy: challenge.Challenge, mode: replay.Mode) -> Verdict:
  """The verdict before any check has decided."""
  thresholds = None if mode.name == "exact" else {**mode.delta.to_json(), "bounds": mode.delta.bounds}
  seed = getattr(strategy, "seed", None)  # uniform, top-q+uniform
  root = inputs.manifest.get("root")
  return Verdict(False, mode.name, strategy.name, root, [], [], len(inputs.bounds), tolerance=thresholds, seed=seed)


_REPLAY_DECIDES = ("environment", "program")
"""Checks that may stay undecided in an accepted verdict: a replay that ran bit for bit (or within delta) decides."""


def _decide(verdict: Verdict, checks: dict[str, Check], skipped: frozenset[str] = frozenset()) -> Verdict:
  """Accepted only if no check failed and every check passed but those the replay decides and those ``skipped``.

  An undecided data order, data, progress or init check (a hostile field
  that stops it from running, say) leaves the verdict undecided.
  """
  verdict.checks = list(checks.values())
  verdict.accepted = not verdict.failed and all(
    check.passed is True or (name in _REPLAY_DECIDES and checks["replay"].passed is True) or name in skipped
    for name, check in checks.items()
  )
  return verdict


def check_integrity(inputs: _Inputs, strategy: challenge.Challenge, full: bool) -> tuple[_Recorded | None, Check]:
  """The integrity check: nothing from the proof is used before its digest is checked.

  The file listing comes first, so Orbax and TensorStore only ever open
  listed, hashed regular files. ``full`` checks every checkpoint's arrays, as
  do the strategies that need the update sizes (top-q). The segments are
  drawn here: first, where the draw needs no update sizes, so that this pass
  keeps just the states replay uses.

  Returns:
    ``(what was read, the check)``; None instead of what was read when it failed.
  """
  proof_dir, manifest, bounds = inputs.proof_dir, inputs.manifest, inputs.bounds
  try:
    proof.validate_manifest(manifest)
    proof.check_files(proof_dir, manifest)
    log = proof.read_index_log(proof_dir, manifest)
    size = manifest["dataset"]["size"]
    digests = proof.read_data_digests(proof_dir, manifest)
    if data_lib.merkle_root(digests) != manifest["dataset"]["merkle_root"]:
      raise proof.IntegrityError(f"{proof.DATA_DIGESTS}: Merkle root does not match dataset.merkle_root")
    if log.min(initial=0) < 0 or log.max(initial=0) >= size:
      raise proof.IntegrityError(f"{proof.INDICES}: an index is outside [0, {size})")
    per_epoch = sampling.steps_per_epoch(size, inputs.plan.batch_size)
    epochs = np.array([start // per_epoch for start, _ in bounds])
    segments = challenge.Segments(len(bounds), root=manifest.get("root"), epochs=epochs)
    known = None if strategy.needs_update_sizes else strategy.select(segments)
    keep = None if known is None else {step for i in known[0] for step in bounds[i]}
    full = full or strategy.needs_update_sizes
    sizes, checked = _check_checkpoints(proof_dir, manifest, inputs.template, bounds, full=full, keep=keep)
  except proof.IntegrityError as e:
    return None, Check("integrity", False, str(e))
  chosen, guarantee = known or strategy.select(dataclasses.replace(segments, update_sizes=sizes))
  detail = f"root {manifest['root'][:16]}..., {len(bounds) + 1} checkpoints, index log, {size} data digests" + (
    "" if sizes is not None else "; arrays of the checkpoints replay uses are checked as they are restored"
  )
  return _Recorded(log, digests, chosen, guarantee, checked), Check("integrity", True, detail)


def check_environment(
  manifest: dict, exact: bool, builder: str | None, max_workers: int | None, versions_matched: str | None
) -> tuple[_Environment, Check]:
  """The environment check: exact replay needs every bit-changing field to match or be reproduced."""
  recorded, here = manifest["environment"], fingerprint.environment()
  portable = manifest["numerics"]["kind"] == "portable"
  differ = fingerprint.mismatches(recorded, here, portable)
  pinning, check = _environment_check(recorded, differ, exact, builder, max_workers, portable)
  if portable and not differ:
    check.detail = (
      f"portable numerics ({manifest['numerics']['protocol']}): x64 is on here; versions, threads, CPU ISA "
      "and backend do not change its bits"
    )
  if versions_matched:
    check.detail += f"; versions matched in {versions_matched}"
  unlike = fingerprint.mismatches(recorded, here) if portable else differ
  foreign = bool({fingerprint.KINDS[f] for f, _, _ in unlike} & {"versions", "hardware"})
  lowering = [f for f in LOWERING_FIELDS if f in recorded and recorded[f] != here.get(f)]
  rows = reproduction(recorded, here, differ, pinning, versions_matched, portable)
  return _Environment(differ, portable, foreign, lowering, pinning, rows), check


LOWERING_FIELDS = ("x64", "matmul_precision")
"""Environment fields that change the lowered program text itself (x64: integer and float widths;
the default matmul precision: each dot's precision), not only the compiled program's bits."""


CONFIG_UNCHECKED = "the recorded config was not rebuilt (builder=None): it is the prover's description, unchecked"
"""What a verdict says where the verifier was given its program rather than building it from the recorded
config: the lowered program is checked, the config that claims to describe it is not."""


def check_program(inputs: _Inputs, env: _Environment, exact: bool, builder: str | None) -> tuple[str | None, Check]:
  """The program check: the verifier's segment program lowers to the recorded one.

  Where it does not and the verifier's program was not rebuilt from the
  recorded config, an exact replay still decides if it reproduces every
  state. Without ``builder``, a check that does not fail says that the
  recorded config was not checked (:data:`CONFIG_UNCHECKED`).

  Returns:
    ``(what differs, where exact replay is to decide despite it, else None; the check)``.
  """
  differs, check = _check_program(inputs, env, exact, builder)
  if builder is None and check.passed is not False and CONFIG_UNCHECKED not in check.detail:
    check = dataclasses.replace(check, detail=f"{check.detail}; {CONFIG_UNCHECKED}")
  return differs, check


def _check_program(inputs: _Inputs, env: _Environment, exact: bool, builder: str | None) -> tuple[str | None, Check]:
  manifest, program = inputs.manifest, inputs.program
  texts = fingerprint.program_texts(inputs.segment, inputs.template, inputs.dataset, inputs.plan, inputs.keys.step)
  ours = {name: fingerprint.program_digest(text) for name, text in texts.items()}
  bad = [name for name in ours if manifest["programs"].get(name) != ours[name]]
  if program.numerics != manifest["numerics"]["kind"]:
    return None, Check(
      "program",
      False,
      f"the proof was recorded with {manifest['numerics']['kind']} numerics, the verifier's program computes in "
      f"{program.numerics} (numerics.portable_program makes a program portable)",
    )
  if not bad and set(ours) == set(manifest["programs"]):
    return None, Check("program", True, f"{inputs.plan.runner} program {ours['segment'][:16]}... as recorded")
  if env.foreign and env.portable:
    return None, Check(
      "program",
      None,
      "not comparable (the lowered text depends on the versions and backend that differ); portable numerics: "
      "the replay decides, bit for bit",
    )
  if env.foreign:
    return None, Check(
      "program", None, "not comparable: the lowered program depends on the versions and backend that differ"
    )
  if env.lowering:  # the text made here is not the prover's whatever the program: the replay decides
    where = "in worker processes with the prover's settings" if env.pinning is not None else "if it can run here"
    return None, Check(
      "program",
      None,
      f"not comparable in this process: its {', '.join(env.lowering)} differs from the prover's and the lowered "
      f"text depends on it; the replay {where} decides, bit for bit",
    )
  name, which = (bad or ["segment"])[0], ", ".join(bad) or "segment"
  recorded = proof.read_program(inputs.proof_dir, name, manifest["programs"].get(name, ""))
  where = (
    f"first difference at {proof.first_difference(recorded, texts[name])}"
    if recorded is not None and name in texts
    else "the recorded text is not in the proof"
  )
  other = _other_source(manifest, builder)
  if other is None:  # rebuilt from the recorded config, as the prover's builder builds it
    return None, Check(
      "program", False, f"the recorded {which} program is not the one its recorded config builds ({where})"
    )
  differs = f"this verifier's {which} program differs from the recorded one ({where})"
  decides = "; the replay decides whether it reproduces the recorded states" if exact else ""
  return (differs if exact else None), Check("program", None, f"{differs}; {other}{decides}")


def check_init(inputs: _Inputs, env: _Environment, exact: bool) -> Check:
  """The init check: the recorded step 0 is the state the seed derives, bit for bit (leaf digests)."""
  recorded = store.read_meta(inputs.proof_dir, 0, inputs.manifest["checkpoints"]["0"])["leaves"]
  check = _init_check(recorded, proof.leaf_digests(inputs.template), inputs.plan)
  if check.passed is False and env.differ and not env.portable:
    # This process's flags or threads derive other bits than the prover's: a worker in its environment decides.
    fields = ", ".join(f for f, _, _ in env.differ)
    return Check(
      "init",
      None,
      f"step 0 differs from this process's initialisation, but {fields} differ from the prover's"
      + ("; checked in a worker with the prover's environment" if exact and env.pinning else ": not decided"),
    )
  return check


def _init_check(recorded: dict, derived: dict, plan: proof.Plan, where: str = "") -> Check:
  """The recorded step 0's leaf digests against those of the state the seed derives."""
  bad = [p for p in derived if recorded.get(p) != derived[p]]
  if bad:
    return Check(
      "init", False, f"step 0 is not the seed's initialisation{where}: {len(bad)} leaves differ, first {bad[0]}"
    )
  return Check("init", True, f"step 0 equals init from seed {plan.seed}, bound to key {plan.owner[:16]}...{where}")


def _state0(inputs: _Inputs, recorded: _Recorded) -> training.TrainState:
  """The recorded step 0, as the integrity pass checked it, or restored and checked now."""
  if 0 in recorded.checked:
    return recorded.checked[0][0]
  state, _ = store.restore(inputs.proof_dir, 0, inputs.template, inputs.manifest["checkpoints"]["0"])
  return state


def check_data_order(inputs: _Inputs, log: np.ndarray, env: _Environment) -> Check:
  """The data order check: the index log is the order the seed derives.

  The order depends on x64: where this process's differs from the prover's, a
  child process started with the prover's setting derives it.
  """
  plan = inputs.plan
  if "x64" in env.lowering:
    x64 = inputs.manifest["environment"]["x64"]  # a bool: the manifest was validated when it was read
    job = {
      "seed": plan.seed,
      "num_examples": inputs.manifest["dataset"]["size"],
      "batch_size": plan.batch_size,
      "num_steps": plan.steps,
    }
    with tempfile.TemporaryDirectory() as scratch:
      derived = isolation.run(
        "pol_jax.sampling:index_log_job",
        job,
        isolation.Limits(seconds=600.0, memory_bytes=0),
        scratch,
        env={**os.environ, "JAX_ENABLE_X64": "1" if x64 else "0"},
        label="the data order's child process",
      )
    if derived["sha256"] != proof.leaf_digest("indices", log):
      return Check(
        "data order", False, f"the index log is not the order the seed derives (with x64 {x64}, as recorded)"
      )
    return Check(
      "data order", True, f"all {plan.steps} batches follow the seed's order (derived with x64 {x64}, as recorded)"
    )
  expected = sampling.index_log(inputs.keys.order, inputs.manifest["dataset"]["size"], plan.batch_size, plan.steps)
  rows = np.flatnonzero((expected != log).any(axis=1))
  if len(rows):
    return Check(
      "data order", False, f"{len(rows)} steps use batches other than the seed's order, first step {rows[0]}"
    )
  return Check("data order", True, f"all {plan.steps} batches follow the seed's order")


def check_progress(inputs: _Inputs, chosen: list[int]) -> Check:
  """The progress check: every chosen segment moves at least one parameter bit (see :func:`unmoved_segments`).

  Raises:
    proof.IntegrityError: a checkpoint's meta does not match its digest.
  """
  still = unmoved_segments(inputs.proof_dir, inputs.manifest, chosen)
  if not still:
    return Check("progress", True, f"each of the {len(chosen)} replayed segments moves the parameters")
  first = inputs.bounds[still[0]]
  return Check(
    "progress",
    False,
    f"{len(still)} of {len(chosen)} replayed segments moved no parameter bit (first segment {still[0]}, steps "
    f"{first[0]}-{first[1]}): k or the learning rate is too small for replay to be evidence",
  )


def check_data(inputs: _Inputs, recorded: _Recorded) -> Check:
  """The data check: the verifier's own copy of every example the chosen segments use has its recorded digest."""
  manifest, dataset, bounds = inputs.manifest, inputs.dataset, inputs.bounds
  size = manifest["dataset"]["size"]
  used = np.unique(np.concatenate([recorded.log[bounds[i][0] : bounds[i][1]].ravel() for i in recorded.chosen]))
  if dataset.name != manifest["dataset"]["name"] or len(dataset) != size:
    return Check(
      "data",
      False,
      f"the verifier's dataset is {dataset.name!r} ({len(dataset)} examples), "
      f"the proof's {manifest['dataset']['name']!r:.80} ({size})",
    )
  differs = used[(dataset.digests(used) != recorded.digests[used]).any(axis=1)]
  if len(differs):
    return Check("data", False, f"{len(differs)} examples differ from their recorded digest, first index {differs[0]}")
  return Check("data", True, f"{len(used)} examples used by the chosen segments match their digests")


def _replay_blocked(checks: dict[str, Check], exact: bool, env: _Environment, text_differs: str | None) -> str | None:
  """Why replay cannot decide (None: it can): a check it needs failed, or could not decide."""
  needed = ("environment", "program", "data") if exact else ("program", "data")
  failed = [n for n in needed if checks[n].passed is False]
  if failed:
    return f"the {', '.join(failed)} check failed"
  comparable = exact and not env.portable and text_differs is None and not env.lowering  # else the replay decides
  undecided = [n for n in needed if checks[n].passed is None and (comparable or n != "program")]
  if undecided:
    return f"the {', '.join(undecided)} check could not decide"
  return None


def check_replay(
  inputs: _Inputs,
  recorded: _Recorded,
  env: _Environment,
  mode: replay.Mode,
  strategy: str,
  text_differs: str | None,
  recheck_init: bool,
  builder: str | None,
  on_segment: Callable[[replay.SegmentResult], None] | None,
) -> tuple[list[replay.SegmentResult], dict[str, Check]]:
  """The replay check: each chosen segment, replayed from its recorded start, lands on its recorded end.

  Exact mode replays here, or in the pinned worker processes that reproduce
  the prover's environment; tolerance mode judges by distance
  (:func:`_judge_tolerance`).

  Returns:
    Every segment's result, and the checks decided: ``replay``, and those it
    decides on the way: ``init`` (``recheck_init``: in a worker with the
    prover's environment), ``environment`` (a worker could not reproduce it),
    ``integrity`` (a checkpoint replay restores fails its digest) or
    ``program`` (this verifier's own program reproduces every state).
  """
  work = [(i, *inputs.bounds[i]) for i in recorded.chosen]
  mine = work[jax.process_index() :: jax.process_count()]
  job = replay.Job(
    inputs.proof_dir,
    inputs.manifest,
    inputs.segment,
    inputs.template,
    inputs.dataset,
    recorded.log,
    inputs.keys.step,
    recorded.checked,
    step=inputs.program.step,
  )
  decided: dict[str, Check] = {}
  if isinstance(mode, replay.Exact) and env.pinning is not None:
    try:
      results, decided = _replay_in_workers(inputs, env.pinning, mine, builder, on_segment, recheck_init)
    except workers.ProgramDiffers as e:
      if _other_source(inputs.manifest, builder) is None:  # the prover's builder, in the prover's environment
        return [], {
          "program": Check("program", False, f"the recorded program is not the one its recorded config builds ({e})"),
          "replay": Check("replay", None, "not run: the program check failed"),
        }
      return [], {
        "environment": Check("environment", None, f"not reproduced: {e}"),
        "replay": Check("replay", None, "not run: the environment could not be reproduced"),
      }
    except workers.Unreproducible as e:
      return [], {
        "environment": Check("environment", None, f"not reproduced: {e}"),
        "replay": Check("replay", None, "not run: the environment could not be reproduced"),
      }
  else:
    results = mode.run(job, mine, on_segment)
  if jax.process_count() > 1:
    results = replay.gather(results, len(work), [proof.path_str(n) for n, _ in proof.flatten(inputs.template)])
  results = sorted(results, key=lambda r: r.index)
  broken = [r for r in results if r.error]
  if broken:
    return results, {
      **decided,
      "integrity": Check("integrity", False, broken[0].error),
      "replay": Check("replay", None, "not decided: a checkpoint it needs failed its integrity check"),
    }
  if isinstance(mode, replay.Exact):
    return results, {**decided, **_judge_exact(results, len(work), len(inputs.bounds), strategy, text_differs)}
  local = replay.local_devices(mode.devices)
  return results, {**decided, "replay": _judge_tolerance(results, mode.delta, job, local, escalate=not env.differ)}


def _replay_in_workers(
  inputs: _Inputs,
  pinning: workers.Pinning,
  segments: list[tuple[int, int, int]],
  builder: str | None,
  on_segment: Callable[[replay.SegmentResult], None] | None,
  recheck_init: bool,
) -> tuple[list[replay.SegmentResult], dict[str, Check]]:
  """Exact replay in worker processes pinned to the prover's threads and flags.

  With ``recheck_init`` the first worker also derives the initial state in
  the prover's environment, and the init check is decided on it.

  Raises:
    workers.Unreproducible: a worker could not reproduce the environment.
  """
  init = {} if recheck_init else None
  results = workers.replay(inputs.proof_dir, inputs.manifest["root"], builder, segments, pinning, on_segment, init)
  if init is None:
    return results, {}
  recorded = store.read_meta(inputs.proof_dir, 0, inputs.manifest["checkpoints"]["0"])["leaves"]
  where = " (in a worker with the prover's environment)"
  return results, {"init": _init_check(recorded, init, inputs.plan, where=where)}


def _judge_exact(results, chosen: int, total: int, strategy: str, text_differs: str | None) -> dict[str, Check]:
  """Exact mode's decision: every replayed state's digests equal the recorded ones."""
  bad = [s for s in results if not s.match]
  if text_differs and bad:  # the verifier's own program: it cannot tell a false proof from its difference
    return {
      "replay": Check(
        "replay",
        None,
        f"segment {bad[0].index} (steps {bad[0].start}-{bad[0].end}) does not reproduce the recorded state: "
        f"{bad[0].mismatch}; this verifier's program differs from the recorded one, so this does not show the "
        "proof false: verify with the program rebuilt from the recorded config (builder=, the CLI's --program)",
      )
    }
  if bad:
    return {"replay": _rejection(bad, lambda s: f"does not reproduce the recorded state: {s.mismatch}")}
  decided = {"replay": Check("replay", True, f"{chosen} of {total} segments reproduce bit for bit ({strategy})")}
  if text_differs:
    decided["program"] = Check(
      "program", True, f"{text_differs}, but it reproduces every replayed state bit for bit: the states follow from it"
    )
  return decided


def _rejection(bad: list[replay.SegmentResult], why: Callable[[replay.SegmentResult], str]) -> Check:
  """The replay check failed: the first bad segment, why, and how many."""
  first = bad[0]
  return Check(
    "replay",
    False,
    f"segment {first.index} (steps {first.start}-{first.end}) {why(first)}"
    + (f"; {len(bad)} segments in all" if len(bad) > 1 else ""),
  )


def _judge_tolerance(segments, tolerance, job, devices, escalate: bool) -> Check:
  """Tolerance mode's decision: within delta, beyond the honest range, or undecided.

  A segment outside delta but inside the range honest replays reach
  (``tolerance.bounds``) is replayed exactly when this verifier's environment
  is the prover's (``escalate``), and its digests decide; otherwise it stays
  undecided. Returns the replay check.
  """
  for s in segments:
    s.within = tolerance.judge(s.distance, s.update)
  unsure = [s for s in segments if s.within is None]
  escalated = 0
  if unsure and escalate:
    exact = replay.replay(job, [(s.index, s.start, s.end) for s in unsure], devices)
    for s, e in zip(unsure, exact, strict=True):
      s.match = s.within = e.match
      s.differing, s.first_differing, s.diverged_step, s.diverged_leaf = (
        e.differing,
        e.first_differing,
        e.diverged_step,
        e.diverged_leaf,
      )
    escalated, unsure = len(unsure), []
  bad = [s for s in segments if s.within is False]

  def why(s) -> str:
    if s.match is False and s.differing:
      return f"is outside delta, and exact replay does not reproduce it: {s.mismatch}"
    measured = tolerance.measure(s.distance, s.update)
    m = max(tolerance.bounds, key=lambda m: measured[m] / max(tolerance.bounds[m], 1e-300))
    return (
      f"{m} distance {measured[m]:.3g} is beyond {tolerance.bounds[m]:.3g}, outside the range of honest "
      f"replay noise ({tolerance.describe_bounds()})"
    )

  if bad:
    return _rejection(bad, why)
  if unsure:
    first = unsure[0]
    return Check(
      "replay",
      None,
      f"{len(unsure)} segments are outside delta but inside the range of honest replay noise, first segment "
      f"{first.index} (steps {first.start}-{first.end}); tolerance mode cannot tell them from honest noise: "
      "verify exactly on the prover's environment",
    )
  exact_note = f"; {escalated} outside delta decided by exact replay" if escalated else ""
  return Check(
    "replay",
    True,
    f"{len(segments)} segments within {tolerance.describe()}{exact_note}; "
    f"{sum(bool(s.match) for s in segments)} reproduced bit for bit",
  )


def _other_source(manifest: dict, builder: str | None) -> str | None:
  """Why the verifier's program may differ from the recorded one although the
  environment matches (None: it was rebuilt from the recorded config by the
  builder the prover used, at the prover's version)."""
  if builder is None:
    return CONFIG_UNCHECKED
  recorded = manifest.get("builder")
  if recorded is None:
    return None
  ours = workers.builder_record(builder)
  if recorded.get("target") != ours["target"]:
    return f"the proof was built by {recorded.get('target')}, this verifier's program by {ours['target']}"
  if recorded.get("version") != ours["version"]:
    return f"{ours['target']} is version {ours['version']} here, {recorded.get('version')} in the proof"
  return None


def _environment_check(
  recorded: dict, differ, exact: bool, builder: str | None, max_workers: int | None, portable: bool = False
):
  """The environment check, and the worker pinning that reproduces the prover's (or None)."""
  if not differ:
    return None, Check("environment", True, "every field that changes bits matches the prover's")
  detail = "; ".join(f"{f}: proof {a!r:.80}, here {b!r:.80}" for f, a, b in differ)
  if portable:
    return None, Check(
      "environment", None, f"portable numerics compute in float64 and need x64 ({detail}): set JAX_ENABLE_X64=1"
    )
  if not exact:
    return None, Check("environment", True, f"differs ({detail}); tolerance mode decides by distance")
  kinds = {fingerprint.KINDS[f] for f, _, _ in differ}
  lacking = fingerprint.lacking_isa(str(recorded.get("xla_flags", "")))
  if lacking:
    return None, Check(
      "environment",
      None,
      f"the proof pins XLA:CPU to {lacking}, which this CPU lacks ({detail}): verify on a CPU with it",
    )
  if "hardware" in kinds:
    return None, Check("environment", None, f"exact replay needs the prover's hardware ({detail})")
  if "versions" in kinds:
    return None, Check(
      "environment",
      None,
      f"exact replay needs the prover's versions ({detail}); verify in an environment with them "
      "(the CLI's --env=match builds one)",
    )
  if builder is None:
    return None, Check(
      "environment",
      None,
      f"{detail} differ; reproducing them needs worker processes, which need builder= (the function that "
      "rebuilds the program from the recorded config)",
    )
  try:
    pinning = workers.plan(recorded, max_workers=max_workers)
  except workers.Unreproducible as e:
    return None, Check("environment", None, str(e))
  return pinning, Check("environment", True, f"reproduced ({detail}): {pinning.describe()}")


def reproduction(
  recorded: dict, here: dict, differ, pinning, versions_matched: str | None, portable: bool = False
) -> list[dict]:
  """Field by field: how this verifier reproduced each environment field that differs."""
  rows = []
  for field, proof_value, here_value in differ:
    kind = fingerprint.KINDS[field]
    if kind in ("threads", "flags") and pinning is not None:
      how = f"matched in {len(pinning.cores)} pinned worker process{'es' if len(pinning.cores) > 1 else ''}"
    elif kind == "versions":
      how = "not reproduced: needs the prover's versions (pol_jax.venv; the CLI's --env=match)"
    else:
      how = "not reproduced"
    rows.append({"field": field, "proof": proof_value, "here": here_value, "how": how})
  for field, proof_value, here_value in fingerprint.unmatched_info(recorded, here, portable):
    if versions_matched and field == "python":
      how = f"matched ({versions_matched})"
    elif portable and field in fingerprint.EXACT_FIELDS:
      how = "reported: portable numerics do not depend on it"
    elif field in fingerprint.EXACT_FIELDS:
      how = "reported: measured to change no bit on this backend"
    else:
      how = "reported: does not change bits"
    rows.append({"field": field, "proof": proof_value, "here": here_value, "how": how})
  if versions_matched:
    rows.insert(
      0,
      {
        "field": "jax, jaxlib",
        "proof": recorded.get("jax"),
        "here": here.get("jax"),
        "how": f"matched ({versions_matched})",
      },
    )
  return rows


KEEP_BYTES = replay.KEEP_BYTES
"""The integrity pass keeps at most this many bytes of checked states for replay; beyond, replay restores again."""


def _batches_hold_the_recorded_states(proof_dir: str, steps: list[int]) -> tuple[dict[int, list[int]], dict[int, dict]]:
  """``({batch: its steps}, {batch: its meta})``, once every batch is shown to hold exactly the recorded states in it.

  A batch restores one row per state its meta lists, and only the recorded
  states' metas are digested: extra entries (a copy of a real one, or ``0``)
  would have every read of the batch allocate rows for states nobody checks.

  Raises:
    proof.IntegrityError: a state missing, a batch holding others, a batch holding none.
  """
  names = store.batches(proof_dir)
  by_batch: dict[int, list[int]] = {}
  for step in steps:
    batch = store.batch_of(step, names)
    if batch is None:
      raise proof.IntegrityError(f"checkpoint {step}: missing (no batch {proof.CHECKPOINTS}/<b> with b >= {step})")
    by_batch.setdefault(batch, []).append(step)
  metas = {}
  for batch in names:
    members = by_batch.get(batch, [])
    label = f"checkpoint {members[0]}: " if members else ""
    try:
      metas[batch] = store.read_batch_meta(proof_dir, batch)
    except proof.IntegrityError as e:
      raise proof.IntegrityError(f"{label}{e}") from None
    rows = store.batch_rows(metas[batch])
    missing = sorted(set(members) - set(rows))
    if missing:
      raise proof.IntegrityError(
        f"checkpoint {missing[0]}: not in {proof.CHECKPOINTS}/{batch}, the batch that must hold it"
      )
    if rows != members:
      extra = sorted(set(rows) - set(members))
      raise proof.IntegrityError(
        f"{label}{proof.CHECKPOINTS}/{batch} lists {len(rows)} states, the manifest records {len(members)} in it"
        + (f" (not recorded: steps {extra[:5]})" if extra else "")
      )
  return by_batch, metas


def _check_checkpoints(proof_dir, manifest, template, bounds, full: bool, keep: set | None = None):
  """Checks every checkpoint's meta against the manifest, and with ``full``
  every array against its digest, restoring each batch once.

  Keeps, for replay, the checked states at the steps of ``keep`` (every step
  when None: the segments are chosen afterwards), up to :data:`KEEP_BYTES`.

  Returns ``(update size of every segment or None, {step: (state, meta)} kept)``:
  the sizes (``top-q`` needs them) when ``full``.
  """
  steps = proof.checkpoint_steps(manifest["k"], manifest["steps"])
  digests = {step: manifest["checkpoints"][str(step)] for step in steps}
  by_batch, metas = _batches_hold_the_recorded_states(proof_dir, steps)
  if not full:
    store.read_metas(proof_dir, digests, metas)
    return None, {}
  state_bytes = sum(proof.stored(leaf).nbytes for leaf in jax.tree.leaves(template))
  sizes = {m: np.zeros(len(bounds)) for m in distances.METRICS}
  kept: dict = {}
  previous = None
  i = 0
  for batch, members in by_batch.items():
    try:
      restored = store.restore_batch(proof_dir, batch, template, {s: digests[s] for s in members}, metas[batch])
    except proof.IntegrityError as e:
      message = str(e)
      raise proof.IntegrityError(
        message if message.startswith("checkpoint ") else f"checkpoint {members[0]}: {message}"
      ) from None
    for step in members:
      state, meta = restored[step]
      if int(state.step) != step:
        raise proof.IntegrityError(f"checkpoint {step}: holds the state of step {int(state.step)}")
      if previous is not None:
        for metric, value in distances.distances(previous.params, state.params).items():
          sizes[metric][i - 1] = value
      if (keep is None or step in keep) and (len(kept) + 1) * state_bytes <= KEEP_BYTES:
        kept[step] = (state, meta)
      previous = state
      i += 1
  return sizes, kept


def unmoved_segments(proof_dir: str, manifest: dict, indices) -> list[int]:
  """Those of the segments ``indices`` whose recorded parameters at their end equal those at their start, bit for bit.

  Compares the ``params/...`` leaf digests of the checkpoint metas (each
  checked against the manifest), so nothing is restored. Such a segment
  replays bit for bit whatever its start was: its replay is evidence of
  nothing.

  Raises:
    proof.IntegrityError: a checkpoint's meta does not match its digest.
  """
  bounds = proof.segments(proof.Plan.from_manifest(manifest))
  steps = {step for i in indices for step in bounds[i]}
  metas = store.read_metas(proof_dir, {step: manifest["checkpoints"][str(step)] for step in steps})
  params = {step: {p: d for p, d in meta["leaves"].items() if p.startswith("params/")} for step, meta in metas.items()}
  return [i for i in indices if params[bounds[i][0]] == params[bounds[i][1]]]
