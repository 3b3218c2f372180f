"""``verify``: checks a proof and replays segments of it bit for bit."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable

import jax
import numpy as np

from pol_jax import challenge, distances, fingerprint, proof, replay, sampling, training, workers
from pol_jax import data as data_lib
from pol_jax import tolerance as tolerance_lib

MODES = ("exact", "tolerance")
CHECKS = ("integrity", "environment", "program", "init", "data order", "data", "replay", "progress")


@dataclasses.dataclass
class Check:
  """One check of a verification: ``passed`` is None when it did not run."""

  name: str
  passed: bool | None
  detail: str


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
        line += f"; {g.statement()}" + ("" if g.catch >= 1.0 else " (--strategy=all replays every segment)")
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
  strategy: str = challenge.DEFAULT,
  num_segments: int | None = None,
  seed: int | None = None,
  q: int = 1,
  detect: float = challenge.DETECT,
  faked_fraction: float = challenge.FAKED_FRACTION,
  devices: int | None = None,
  mode: str = "exact",
  tolerance: tolerance_lib.Tolerance | None = None,
  chunk: int = 64,
  integrity: str = "full",
  init_check: str = "seed",
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
  order), data (the verifier's own copy of every example the chosen segments
  use has the recorded digest, and the Merkle root holds), replay (each
  chosen segment, replayed from its recorded start with the same runner,
  lands on the recorded end bit for bit) and progress (each chosen segment
  moves at least one parameter bit: a replay that cannot move the weights,
  because k or the learning rate is too small, is evidence of nothing).

  Guarantees:
    An accepted proof shows that the recorded states follow one another by
    running ``program.step`` on the committed data in the seed's order, from
    the seed's initialisation, for every replayed segment; with ``all``, for
    the whole run. ``top-q+uniform`` (the default) always replays top-q (per
    epoch, the largest recorded update under each metric) and the last
    segment, so a proof that jumps to another model in one segment (the
    largest update of its epoch) or swaps its last checkpoint is always
    caught, and a fake top-q misses moves the weights no more than the
    largest honest update of its epoch; it adds n of the other segments
    drawn once from a seed the prover cannot know, so that a proof with m
    faked segments, m = ``ceil(faked_fraction * S)``, is caught with
    probability at least ``detect`` (the verdict's ``guarantee`` states n, m
    and the probability, ``1 - C(P-m, n) / C(P, n)`` for the P other
    segments). ``uniform`` replays the last and n - 1 of the other S - 1:
    it passes a proof with m faked others with probability ``C(S-1-m, n-1) /
    C(S-1, n-1)`` per draw, (S - n) / (S - 1) for one, which a prover who
    picks a small k makes large. ``fiat-shamir`` draws from the proof's root,
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
    strategy: one of ``challenge.STRATEGIES``.
    num_segments: n, the uniform part: the segments ``uniform`` and
      ``fiat-shamir`` replay (the last included), the segments
      ``top-q+uniform`` draws beyond top-q and the last. None (default):
      the smallest n that catches a proof with ``faked_fraction`` of its
      segments faked with probability ``detect`` (``challenge.sample_size``).
    seed: the verifier's seed, for ``uniform`` and ``top-q+uniform``
      (default: drawn from the OS, and reported in the verdict so the draw
      can be repeated).
    q: segments per epoch and metric, for ``top-q`` and ``top-q+uniform``.
    detect: the detection probability the uniform part is sized for.
    faked_fraction: the fraction of faked segments it is sized to detect.
    devices: replay on this many local devices, one segment per device at a
      time (default: all local devices). Bit-identical to sequential replay. Under
      ``jax.distributed`` every process replays its share of the segments on
      its own devices and the results are gathered, so every process returns
      the same verdict.
    mode: ``"exact"`` (digest equality; needs the prover's environment) or
      ``"tolerance"``: ``jit(vmap(...))`` replay of ``chunk`` segments at a time,
      sharded over the devices, accepted when every distance is within
      ``tolerance``. Tolerance mode also serves a verifier whose environment
      differs from the prover's; differences are reported, not blocking.
    tolerance: the delta per metric and its source (tolerance mode).
    chunk: segments per vmapped call (tolerance mode).
    integrity: ``"full"`` restores every checkpoint and checks every array
      against its digest before replaying; ``"sampled"`` checks every
      checkpoint's meta up front and the arrays of the checkpoints the chosen
      segments use as they are restored (faster; a damaged checkpoint that no
      chosen segment uses goes unnoticed, like any unsampled segment).
      ``top-q`` and ``top-q+uniform`` restore every checkpoint for the update
      sizes, so they check every array either way.
    init_check: ``"seed"``: step 0 must equal the seed's initialisation, bit
      for bit; ``"ks"``: the paper's statistical check (see :func:`ks_init`),
      for the paper's verifier only: it accepts any init drawn from the right
      distribution, which is what the infinitesimal-update attack exploits.
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

  Example (with ``program`` and ``dataset`` built as the prover built them)::

    verdict = verify("runs/default/proof", program, dataset, strategy="all")
    print(verdict.table())
    assert verdict.accepted
  """
  if strategy not in challenge.STRATEGIES:
    raise ValueError(f"Expected strategy in {challenge.STRATEGIES}, got {strategy!r}.")
  if strategy in ("uniform", challenge.DEFAULT) and seed is None:
    if jax.process_count() > 1:
      raise ValueError(f"strategy={strategy!r} across processes needs a seed that every process shares.")
    seed = secrets.randbits(63)
  least = 0 if strategy == challenge.DEFAULT else 1
  if num_segments is not None and num_segments < least:
    raise ValueError(f"Expected num_segments >= {least} for strategy={strategy!r}, got num_segments={num_segments}.")
  if not 0 < detect <= 1:
    raise ValueError(f"Expected 0 < detect <= 1, got detect={detect}.")
  if not 0 < faked_fraction <= 1:
    raise ValueError(f"Expected 0 < faked_fraction <= 1, got faked_fraction={faked_fraction}.")
  if strategy == challenge.DEFAULT:
    integrity = "full"  # its top-q part needs every update size: every checkpoint is restored and checked anyway
  if integrity not in ("full", "sampled"):
    raise ValueError(f"Expected integrity 'full' or 'sampled', got {integrity!r}.")
  if mode not in MODES:
    raise ValueError(f"Expected mode in {MODES}, got {mode!r}.")
  if init_check not in ("seed", "ks"):
    raise ValueError(f"Expected init_check 'seed' or 'ks', got {init_check!r}.")
  if mode == "tolerance" and tolerance is None:
    raise ValueError("Tolerance mode needs a tolerance: calibrate one (experiments.calibrate) or give delta.")
  replay.local_devices(devices)  # Refuse an impossible device count before any work.
  manifest = proof.read_manifest(proof_dir)
  plan = proof.Plan.from_manifest(manifest)
  bounds = proof.segments(plan)
  checks = {name: Check(name, None, "not run") for name in CHECKS}
  verdict = Verdict(
    False,
    mode,
    strategy,
    manifest.get("root"),
    list(checks.values()),
    [],
    len(bounds),
    seed=seed if strategy in ("uniform", challenge.DEFAULT) else None,
  )

  def done() -> Verdict:
    verdict.checks = list(checks.values())
    verdict.accepted = checks["replay"].passed is True and checks["init"].passed is True and not verdict.failed
    return verdict

  keys = training.derive_keys(plan.seed)
  template = training.to_host(program.init(keys.init))

  # 1. Integrity: nothing from the proof is used before its digest is checked. The file
  # listing comes first, so Orbax and TensorStore only ever open listed, hashed regular files.
  try:
    proof.validate_manifest(manifest)
    proof.check_files(proof_dir, manifest)
    log = proof.read_index_log(proof_dir, manifest)
    size = manifest["dataset"]["size"]
    leaves = proof.read_data_digests(proof_dir, manifest)
    if data_lib.merkle_root(leaves) != manifest["dataset"]["merkle_root"]:
      raise proof.IntegrityError(f"{proof.DATA_DIGESTS}: Merkle root does not match dataset.merkle_root")
    if log.min(initial=0) < 0 or log.max(initial=0) >= size:
      raise proof.IntegrityError(f"{proof.INDICES}: an index is outside [0, {size})")
    full = integrity == "full" or strategy in ("top-q", challenge.DEFAULT)
    per_epoch = sampling.steps_per_epoch(manifest["dataset"]["size"], plan.batch_size)

    def draw(sizes):
      return challenge.select(
        strategy,
        len(bounds),
        n=num_segments,
        seed=seed,
        root=verdict.root,
        update_sizes=sizes,
        epochs=np.array([start // per_epoch for start, _ in bounds]),
        q=q,
        detect=detect,
        faked_fraction=faked_fraction,
      )

    # A draw that needs no update sizes is made first, so the integrity pass keeps just the states it replays.
    known = None if strategy in ("top-q", challenge.DEFAULT) else draw(None)
    keep = None if known is None else {step for i in known[0] for step in bounds[i]}
    sizes, checked = _check_checkpoints(proof_dir, manifest, template, bounds, full=full, keep=keep)
  except proof.IntegrityError as e:
    checks["integrity"] = Check("integrity", False, str(e))
    return done()
  checks["integrity"] = Check(
    "integrity",
    True,
    f"root {verdict.root[:16]}..., {len(bounds) + 1} checkpoints, index log, {size} data digests"
    + ("" if sizes is not None else "; arrays of the checkpoints replay uses are checked as they are restored"),
  )

  # 2. Environment: exact replay needs every bit-changing field to match or be reproduced.
  recorded_env, here = manifest["environment"], fingerprint.environment()
  portable = manifest["numerics"]["kind"] == "portable"
  differ = fingerprint.mismatches(recorded_env, here, portable)
  pinning, checks["environment"] = _check_environment(recorded_env, differ, mode, builder, max_workers, portable)
  if portable and not differ:
    checks["environment"].detail = (
      f"portable numerics ({manifest['numerics']['protocol']}): x64 is on here; versions, threads, CPU ISA "
      "and backend do not change its bits"
    )
  if versions_matched:
    checks["environment"].detail += f"; versions matched in {versions_matched}"
  verdict.reproduction = reproduction(recorded_env, here, differ, pinning, versions_matched, portable)
  unlike = fingerprint.mismatches(recorded_env, here) if portable else differ
  foreign = {fingerprint.KINDS[f] for f, _, _ in unlike} & {"versions", "hardware"}

  # 3. Program: the verifier's step lowers to the recorded program. Where it
  # does not and the verifier's program was not rebuilt from the recorded
  # config, an exact replay still decides if it reproduces every state.
  text_differs = None  # what differs, where exact replay is to decide despite it
  segment = training.make_segment(program.step, plan.runner)
  texts = fingerprint.program_texts(segment, template, dataset, plan, keys.step)
  ours = {name: fingerprint.program_digest(text) for name, text in texts.items()}
  bad = [name for name in ours if manifest["programs"].get(name) != ours[name]]
  if program.numerics != manifest["numerics"]["kind"]:
    checks["program"] = Check(
      "program",
      False,
      f"the proof was recorded with {manifest['numerics']['kind']} numerics, the verifier's program computes in "
      f"{program.numerics} (numerics.portable_program makes a program portable)",
    )
  elif bad or set(ours) != set(manifest["programs"]):
    if foreign and portable:
      checks["program"] = Check(
        "program",
        None,
        "not comparable (the lowered text depends on the versions and backend that differ); portable numerics: "
        "the replay decides, bit for bit",
      )
    elif foreign:
      checks["program"] = Check(
        "program", None, "not comparable: the lowered program depends on the versions and backend that differ"
      )
    else:
      name = (bad or ["segment"])[0]
      recorded = proof.read_program(proof_dir, name, manifest["programs"].get(name, ""))
      where = (
        f"first difference at {proof.first_difference(recorded, texts[name])}"
        if recorded is not None and name in texts
        else "the recorded text is not in the proof"
      )
      other = _other_source(manifest, builder)
      if other is None:  # rebuilt from the recorded config, as the prover's builder builds it
        checks["program"] = Check(
          "program",
          False,
          f"the recorded {', '.join(bad) or 'segment'} program is not the one its recorded config builds ({where})",
        )
      else:
        differs = f"this verifier's {', '.join(bad) or 'segment'} program differs from the recorded one ({where})"
        exact = mode == "exact"
        checks["program"] = Check(
          "program",
          None,
          f"{differs}; {other}" + ("; the replay decides whether it reproduces the recorded states" if exact else ""),
        )
        text_differs = differs if exact else None
  else:
    checks["program"] = Check("program", True, f"{plan.runner} program {ours['segment'][:16]}... as recorded")

  # 4. Init: the recorded step 0 is the state the seed derives.
  if init_check == "ks":
    try:
      state0, _ = checked[0] if 0 in checked else proof.restore(proof_dir, 0, template, manifest["checkpoints"]["0"])
    except proof.IntegrityError as e:
      checks["integrity"] = Check("integrity", False, str(e))
      return done()
    p_min, leaf, tests = ks_init(state0.params, program.init(jax.random.key(KS_SEED)).params)
    checks["init"] = Check(
      "init",
      p_min * tests >= KS_ALPHA,
      f"KS test of step 0 against a fresh init, {tests} parameter leaves: smallest p = {p_min:.3g} ({leaf}); "
      f"Holm-Bonferroni at alpha {KS_ALPHA} needs >= {KS_ALPHA / tests:.3g}",
    )
  else:
    recorded0 = proof.read_meta(proof_dir, 0, manifest["checkpoints"]["0"])["leaves"]
    checks["init"] = _check_init(recorded0, proof.leaf_digests(template), plan)
    if checks["init"].passed is False and differ and not portable:
      # This process's flags or threads derive other bits than the prover's: a worker in its environment decides.
      fields = ", ".join(f for f, _, _ in differ)
      checks["init"] = Check(
        "init",
        None,
        f"step 0 differs from this process's initialisation, but {fields} differ from the prover's"
        + ("; checked in a worker with the prover's environment" if mode == "exact" and pinning else ": not decided"),
      )

  # 5. Data order: the index log is the seed-derived order.
  if order_check:
    expected = sampling.index_log(keys.order, size, plan.batch_size, plan.steps)
    rows = np.flatnonzero((expected != log).any(axis=1))
    checks["data order"] = (
      Check("data order", False, f"{len(rows)} steps use batches other than the seed's order, first step {rows[0]}")
      if len(rows)
      else Check("data order", True, f"all {plan.steps} batches follow the seed's order")
    )
  else:
    checks["data order"] = Check("data order", None, "not checked: the prover chose the batches (paper's verifier)")

  # Segment selection, then 6. data: the verifier's copy of what they use.
  chosen, verdict.guarantee = known or draw(sizes)
  needed = {step for i in chosen for step in bounds[i]}
  checked = {step: v for step, v in checked.items() if step in needed}  # drop what no chosen segment uses
  if progress_check:
    try:
      checks["progress"] = _check_progress(proof_dir, manifest, bounds, chosen)
    except proof.IntegrityError as e:
      checks["integrity"] = Check("integrity", False, str(e))
      return done()
  else:
    checks["progress"] = Check("progress", None, "not checked (the paper's verifier)")
  used = np.unique(np.concatenate([log[bounds[i][0] : bounds[i][1]].ravel() for i in chosen]))
  if dataset.name != manifest["dataset"]["name"] or len(dataset) != size:
    checks["data"] = Check(
      "data",
      False,
      f"the verifier's dataset is {dataset.name!r} ({len(dataset)} examples), "
      f"the proof's {manifest['dataset']['name']!r} ({size})",
    )
  else:
    differs = used[(dataset.digests(used) != leaves[used]).any(axis=1)]
    checks["data"] = (
      Check("data", False, f"{len(differs)} examples differ from their recorded digest, first index {differs[0]}")
      if len(differs)
      else Check("data", True, f"{len(used)} examples used by the chosen segments match their digests")
    )

  # 7. Replay, only where it can decide and the inputs are the recorded ones.
  needed = ("environment", "program", "data") if mode == "exact" else ("program", "data")
  failed = [n for n in needed if checks[n].passed is False]
  comparable = mode == "exact" and not portable and text_differs is None  # else the replay decides
  undecided = [n for n in needed if checks[n].passed is None and (comparable or n != "program")]
  if failed or undecided:
    why = f"the {', '.join(failed)} check failed" if failed else f"the {', '.join(undecided)} check could not decide"
    checks["replay"] = Check("replay", None, f"not run: {why}")
    return done()
  job = replay.Job(proof_dir, manifest, segment, template, dataset, log, keys.step, checked)
  work = [(i, *bounds[i]) for i in chosen]
  mine = work[jax.process_index() :: jax.process_count()]
  local = replay.local_devices(devices)
  if mode == "exact" and pinning is not None:
    init = {} if checks["init"].passed is None else None
    try:
      results = workers.replay(proof_dir, verdict.root, builder, mine, pinning, on_segment, init)
      if init is not None:
        checks["init"] = _check_init(recorded0, init, plan, where=" (in a worker with the prover's environment)")
    except workers.Unreproducible as e:
      checks["environment"] = Check("environment", None, f"not reproduced: {e}")
      checks["replay"] = Check("replay", None, "not run: the environment could not be reproduced")
      return done()
  elif mode == "exact":
    results = replay.replay(job, mine, local, on_segment)
  else:
    batched = training.make_batched_segment(program.step, plan.runner)
    results = replay.replay_batched(job, batched, mine, chunk, local, on_segment)
  if jax.process_count() > 1:
    results = replay.gather(results, len(work), [proof.path_str(n) for n, _ in proof.flatten(template)])
  verdict.segments = sorted(results, key=lambda r: r.index)
  broken = [r for r in verdict.segments if r.error]
  if broken:
    checks["integrity"] = Check("integrity", False, broken[0].error)
    checks["replay"] = Check("replay", None, "not decided: a checkpoint it needs failed its integrity check")
    return done()
  if mode == "exact":
    bad = [s for s in verdict.segments if not s.match]
    why = lambda s: f"does not reproduce the recorded state: {s.mismatch}"  # noqa: E731
    passed = f"{len(chosen)} of {len(bounds)} segments reproduce bit for bit ({strategy})"
    if text_differs and bad:  # the verifier's own program: it cannot tell a false proof from its difference
      checks["replay"] = Check(
        "replay",
        None,
        f"segment {bad[0].index} (steps {bad[0].start}-{bad[0].end}) {why(bad[0])}; this verifier's program "
        "differs from the recorded one, so this does not show the proof false: verify with the program "
        "rebuilt from the recorded config (builder=, the CLI's --program)",
      )
      return done()
    if text_differs:
      checks["program"] = Check(
        "program",
        True,
        f"{text_differs}, but it reproduces every replayed state bit for bit: the states follow from it",
      )
  else:
    verdict.tolerance = {**tolerance.to_json(), "bounds": tolerance.bounds}
    bad, why, passed, undecided = _judge_tolerance(verdict.segments, tolerance, job, local, escalate=not differ)
    if undecided and not bad:
      checks["replay"] = Check("replay", None, undecided)
      return done()
  checks["replay"] = (
    Check(
      "replay",
      False,
      f"segment {bad[0].index} (steps {bad[0].start}-{bad[0].end}) {why(bad[0])}"
      + (f"; {len(bad)} segments in all" if len(bad) > 1 else ""),
    )
    if bad
    else Check("replay", True, passed)
  )
  return done()


def _judge_tolerance(segments, tolerance, job, devices, escalate: bool):
  """Tolerance mode's decision: within delta, beyond the honest range, or undecided.

  A segment outside delta but inside the range honest replays reach
  (``tolerance.bounds``) is replayed exactly when this verifier's environment
  is the prover's (``escalate``), and its digests decide; otherwise it stays
  undecided. Returns ``(rejected segments, why(segment), pass detail,
  undecided detail or None)``.
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

  exact_note = f"; {escalated} outside delta decided by exact replay" if escalated else ""
  passed = (
    f"{len(segments)} segments within {tolerance.describe()}{exact_note}; "
    f"{sum(bool(s.match) for s in segments)} reproduced bit for bit"
  )
  undecided = None
  if unsure:
    first = unsure[0]
    undecided = (
      f"{len(unsure)} segments are outside delta but inside the range of honest replay noise, first segment "
      f"{first.index} (steps {first.start}-{first.end}); tolerance mode cannot tell them from honest noise: "
      "verify exactly on the prover's environment"
    )
  return bad, why, passed, undecided


def _check_init(recorded: dict, derived: dict, plan, where: str = "") -> Check:
  """The init check: the recorded step 0's leaf digests against those of the state the seed derives."""
  bad = [p for p in derived if recorded.get(p) != derived[p]]
  if bad:
    return Check(
      "init", False, f"step 0 is not the seed's initialisation{where}: {len(bad)} leaves differ, first {bad[0]}"
    )
  return Check("init", True, f"step 0 equals init from seed {plan.seed}, bound to key {plan.owner[:16]}...{where}")


def _other_source(manifest: dict, builder: str | None) -> str | None:
  """Why the verifier's program may differ from the recorded one although the
  environment matches (None: it was rebuilt from the recorded config by the
  builder the prover used, at the prover's version)."""
  if builder is None:
    return "it was not rebuilt from the recorded config (builder=None)"
  recorded = manifest.get("builder")
  if recorded is None:
    return None
  ours = workers.builder_record(builder)
  if recorded.get("target") != ours["target"]:
    return f"the proof was built by {recorded.get('target')}, this verifier's program by {ours['target']}"
  if recorded.get("version") != ours["version"]:
    return f"{ours['target']} is version {ours['version']} here, {recorded.get('version')} in the proof"
  return None


def _check_environment(
  recorded: dict, differ, mode: str, builder: str | None, max_workers: int | None, portable: bool = False
):
  """The environment check, and the worker pinning that reproduces the prover's (or None)."""
  if not differ:
    return None, Check("environment", True, "every field that changes bits matches the prover's")
  detail = "; ".join(f"{f}: proof {a!r}, here {b!r}" for f, a, b in differ)
  if portable:
    return None, Check(
      "environment", None, f"portable numerics compute in float64 and need x64 ({detail}): set JAX_ENABLE_X64=1"
    )
  if mode == "tolerance":
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
      how = "not reproduced: needs the prover's versions (--env=match)"
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
  if not full:
    proof.read_metas(proof_dir, digests)
    return None, {}
  names = proof.batches(proof_dir)
  by_batch: dict = {}
  for step in steps:
    batch = proof.batch_of(step, names)
    if batch is None:
      raise proof.IntegrityError(f"checkpoint {step}: missing (no batch {proof.CHECKPOINTS}/<b> with b >= {step})")
    by_batch.setdefault(batch, []).append(step)
  state_bytes = sum(proof.stored(leaf).nbytes for leaf in jax.tree.leaves(template))
  sizes = {m: np.zeros(len(bounds)) for m in distances.METRICS}
  kept: dict = {}
  previous = None
  i = 0
  for batch, members in by_batch.items():
    try:
      restored = proof.restore_batch(proof_dir, batch, template, {s: digests[s] for s in members})
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


KS_SEED = 20210524
"""The key of the fresh initialisation the KS init check compares with."""
KS_ALPHA = 0.01
"""The paper code's threshold on the KS p-values (here family-wise, Holm-Bonferroni)."""

PAPER_TOLERANCE = tolerance_lib.Tolerance(
  {"l1": 1000.0, "l2": 10.0, "linf": 0.1, "cosine": 0.001},
  normalised=False,
  source="the paper code's default deltas, raw distances",
  reject={"l1": 1000.0, "l2": 10.0, "linf": 0.1, "cosine": 0.001},  # the paper rejects outside delta
)


def ks_init(params, fresh) -> tuple[float, str, int]:
  """The paper's initialisation check: a two-sample KS test per parameter leaf.

  Compares each leaf of ``params`` (a recorded step 0) with the same leaf of
  ``fresh`` (an initialisation the verifier draws itself). A leaf the
  initialiser sets to a constant (biases: zeros) must equal it.

  Returns:
    ``(smallest p-value, its leaf, number of leaves tested)``; the family is
    rejected at level alpha when ``p * tests < alpha`` (Holm-Bonferroni).
  """
  from scipy import stats

  results = []
  fresh_leaves = dict(proof.flatten(fresh))
  for names, leaf in proof.flatten(params):
    a, b = np.ravel(np.asarray(leaf, np.float64)), np.ravel(np.asarray(fresh_leaves[names], np.float64))
    if b.min() == b.max():
      p = 1.0 if (a == b[0]).all() else 0.0
    else:
      p = float(stats.ks_2samp(a, b, method="asymp").pvalue)
    results.append((p, proof.path_str(names)))
  p, leaf = min(results)
  return p, leaf, len(results)


def paper(proof_dir: str, program: training.Program, dataset: data_lib.Dataset, *, q: int = 2, **kwargs) -> Verdict:
  """The paper's verifier, for comparison: what the published attacks were built against.

  Top-Q segments per epoch (``q``, the paper code's default 2), replayed with
  the tolerance mode and the paper code's default raw deltas
  (:data:`PAPER_TOLERANCE`), the KS initialisation check instead of the
  seed's, and no check of the data order or of progress. Integrity, program and data
  digests are still ours. Do not use it to accept proofs.
  """
  return verify(
    proof_dir,
    program,
    dataset,
    strategy="top-q",
    q=q,
    mode="tolerance",
    tolerance=PAPER_TOLERANCE,
    init_check="ks",
    order_check=False,
    progress_check=False,
    **kwargs,
  )


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
  metas = proof.read_metas(proof_dir, {step: manifest["checkpoints"][str(step)] for step in steps})
  params = {step: {p: d for p, d in meta["leaves"].items() if p.startswith("params/")} for step, meta in metas.items()}
  return [i for i in indices if params[bounds[i][0]] == params[bounds[i][1]]]


def _check_progress(proof_dir, manifest, bounds, chosen) -> Check:
  """Every chosen segment moves at least one parameter bit (see :func:`unmoved_segments`)."""
  still = unmoved_segments(proof_dir, manifest, chosen)
  if not still:
    return Check("progress", True, f"each of the {len(chosen)} replayed segments moves the parameters")
  first = bounds[still[0]]
  return Check(
    "progress",
    False,
    f"{len(still)} of {len(chosen)} replayed segments moved no parameter bit (first segment {still[0]}, steps "
    f"{first[0]}-{first[1]}): k or the learning rate is too small for replay to be evidence",
  )


def calibrate(
  proof_dir: str,
  program: training.Program,
  dataset: data_lib.Dataset,
  *,
  num_segments: int | None = None,
  margin: float = 10.0,
  chunk: int = 16,
  devices: int | None = None,
  on_segment: Callable[[replay.SegmentResult], None] | None = None,
) -> dict:
  """Measures the tolerance mode's honest noise on a proof and proposes delta.

  The proof must first verify exactly on every segment (or on
  ``num_segments`` Fiat-Shamir segments), so its recorded states are what
  exact replay computes here; the same segments are then replayed with
  ``jit(vmap(...))``, and the noise per metric is the largest normalised
  distance to the recorded state. The proposed delta is
  ``max(noise x margin, tolerance.FLOOR)``. The noise is heavy-tailed (one
  segment of 30 can sit four orders of magnitude above the median), so no
  delta from one proof bounds another's: a distance above delta but inside
  ``tolerance.HONEST_RANGE`` is undecided, never rejected.

  Returns:
    A JSON-serialisable record: the proof root, the noise, the margin, the
    proposed delta and every segment's distances.

  Raises:
    ValueError: the proof does not verify exactly here.
  """
  which = {"strategy": "all"} if num_segments is None else {"strategy": "fiat-shamir", "num_segments": num_segments}
  exact = verify(proof_dir, program, dataset, devices=devices, **which)
  if not exact.accepted:
    raise ValueError(f"calibrate on a proof that verifies exactly here; this one: {exact.summary()}")
  loose = tolerance_lib.Tolerance({m: 1e300 for m in distances.METRICS}, source="calibration")
  noisy = verify(
    proof_dir,
    program,
    dataset,
    **which,
    devices=devices,
    mode="tolerance",
    tolerance=loose,
    chunk=chunk,
    on_segment=on_segment,
  )
  noise = {m: max(s.normalised[m] for s in noisy.segments) for m in distances.METRICS}
  return {
    "proof_root": exact.root,
    "margin": margin,
    "noise": noise,
    "delta": tolerance_lib.propose(noise, margin),
    "floor": tolerance_lib.FLOOR,
    "reject": tolerance_lib.HONEST_RANGE,
    "normalised": True,
    "chunk": chunk,
    "environment": fingerprint.environment(),
    "segments": [
      {"index": s.index, "start": s.start, "end": s.end, "bitwise": s.match, "normalised": s.normalised}
      for s in noisy.segments
    ],
  }
