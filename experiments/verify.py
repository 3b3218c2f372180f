"""Verifies a proof: ``python -m experiments.verify --proof=DIR [--strategy=...]``.

Rebuilds the training program from the config recorded in the proof, checks
everything, replays the chosen segments, prints a table and exits 0
(accepted), 1 (rejected: a check failed) or 2 (unusable input, or this
machine cannot replay exactly).

  --strategy=top-q+uniform (default): per epoch the largest recorded update
                           under each metric (top-q), the last segment, and
                           --segments others drawn from --seed or, by default,
                           a fresh seed from the OS (printed in the verdict);
                           uniform: the last and --segments - 1 others;
                           fiat-shamir draws from the proof's root
                           (non-interactive, but a forger can re-roll it by
                           resealing); top-q: the paper's; all replays everything
  --detect=0.99 --faked_fraction=0.05
                           without --segments, the uniform part is the smallest
                           that catches a proof with 5% of its segments faked
                           with probability 0.99; the verdict states what it
                           guarantees
  --mode=exact (default)   bit-exact replay, one segment per local device; a proof
                           recorded with another CPU thread count, XLA flags or
                           x64 is replayed in worker processes pinned to its
                           thread count (floor(cores / threads) at once)
  --env=match              if the proof's jax/jaxlib differ from this Python's,
                           build (once, cached) a virtual environment with them
                           and verify there (needs the package index)
  --mode=tolerance         jit(vmap) replay of --chunk segments at a time,
                           accepted within --calibration=FILE or --delta=...
  --coordinator=HOST:PORT --num_processes=N --process_id=I
                           verify across processes (jax.distributed)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from experiments import cli
from pol_jax import build, challenge, proof, replay, tolerance, venv, verifier

_CHALLENGE_FLAGS = {"n": "--segments", "q": "--q", "detect": "--detect", "faked_fraction": "--faked_fraction"}
"""The flag that sets each argument of a challenge."""


def challenge_from(
  strategy: str, segments: int | None, seed: int | None, q: int, detect: float, faked_fraction: float
) -> challenge.Challenge:
  """The challenge ``--strategy`` and its settings describe."""
  if strategy in ("uniform", challenge.DEFAULT) and seed is None and jax.process_count() > 1:
    raise cli.UsageError(f"--strategy={strategy} across processes needs --seed, so that every process draws alike")
  try:
    return challenge.from_name(strategy, n=segments, seed=seed, q=q, detect=detect, faked_fraction=faked_fraction)
  except ValueError as e:
    raise cli.UsageError(cli.in_flags(str(e), _CHALLENGE_FLAGS)) from None


def tolerance_from(calibration: str | None, delta: str | None) -> tolerance.Thresholds:
  if calibration and delta:
    raise cli.UsageError("pass --calibration or --delta, not both")
  try:
    if calibration:
      return tolerance.load(calibration)
    if delta:
      return tolerance.parse(delta, source=f"--delta={delta}")
  except ValueError as e:
    raise cli.UsageError(str(e) if calibration else f"--delta: {e}") from None
  raise cli.UsageError(
    "--mode=tolerance needs a delta: --calibration=FILE (from python -m experiments.calibrate --proof=DIR) "
    "or --delta=l1=X,l2=X,linf=X,cosine=X"
  )


def mode_from(mode: str, devices: int | None, chunk: int, calibration: str | None, delta: str | None) -> replay.Mode:
  """The replay mode ``--mode`` and its settings describe."""
  if mode == "exact" and (calibration or delta):
    raise cli.UsageError("--calibration and --delta apply to --mode=tolerance only")
  thresholds = tolerance_from(calibration, delta) if mode == "tolerance" else None
  return replay.from_name(mode, devices=devices, delta=thresholds, chunk=chunk)


def run(
  proof_dir: str,
  drawn: challenge.Challenge = challenge.TopQUniform(),
  mode: replay.Mode = replay.Exact(),
  integrity: str = "full",
  progress: bool = True,
  workers: int | None = None,
  versions_matched: str | None = None,
  user_program: str | None = None,
) -> verifier.Verdict:
  """Verifies ``proof_dir`` with the program its recorded config describes.

  ``user_program``: ``"package.module:function"`` that builds it (``--program``),
  for a proof a user's own program recorded; default: this project's configs.
  """
  try:
    program, train = build.rebuild(proof_dir, program=user_program)
  except build.ProgramUnavailable as e:
    raise cli.UsageError(f"--program: {e}") from None
  with tqdm(desc="verify", unit="segment", disable=not progress, leave=False) as bar:
    try:
      return verifier.verify(
        proof_dir,
        program,
        train,
        challenge=drawn,
        replay=mode,
        integrity=integrity,
        on_segment=lambda _: bar.update(1),
        builder=user_program or build.BUILDER,
        max_workers=workers,
        versions_matched=versions_matched,
      )
    except ValueError as e:  # devices this process lacks, a chunk that does not divide or fit
      raise cli.UsageError(cli.in_flags(str(e))) from None


def _join(coordinator: str | None, num_processes: int, process_id: int) -> None:
  """Joins ``jax.distributed`` before JAX starts any computation."""
  if coordinator is None:
    if num_processes > 1:
      raise cli.UsageError("--num_processes > 1 needs --coordinator=HOST:PORT (process 0's address)")
    return
  if process_id >= num_processes:
    raise cli.UsageError(f"--process_id={process_id} must be below --num_processes={num_processes}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  # Connect now, with stdout sent to stderr: Gloo prints its connection line
  # to stdout, which belongs to the verdict.
  sys.stdout.flush()
  saved = os.dup(1)
  os.dup2(2, 1)
  try:
    multihost_utils.sync_global_devices("pol-jax verify: joined")
  finally:
    os.dup2(saved, 1)
    os.close(saved)


def exit_status(verdict: verifier.Verdict) -> int:
  """0 accepted; 1 a check showed the proof false; 2 undecided here (e.g. the environment)."""
  return {"accepted": 0, "rejected": 1, "undecided": 2}[verdict.status]


def _in_matched_versions(proof_dir: str, argv: list[str]) -> int | None:
  """``--env=match``: re-runs this verification in a venv of the proof's versions, if they differ.

  Returns the child's exit status, or None when this interpreter already has
  the recorded jax and jaxlib (the verification then runs here).
  """
  recorded = proof.validate_body(proof.read_json(os.path.join(proof_dir, proof.MANIFEST), proof.MANIFEST))[
    "environment"
  ]
  if not [f for f, _, _ in venv.matches(recorded) if f in ("jax", "jaxlib")]:
    return None
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    python = venv.ensure(recorded, root, log=lambda line: print(line, file=sys.stderr))
  except (venv.MatchError, ValueError) as e:
    raise cli.UsageError(f"--env=match: {e}") from None
  matched = f"a venv of Python {venv.python_version(recorded)}, jax {recorded['jax']}, jaxlib {recorded['jaxlib']}"
  args = [a for a in argv[1:] if not a.startswith("--env")] + [f"--versions_matched={matched}"]
  return subprocess.run([python, "-m", "experiments.verify", *args], env=venv.clean_environ(), check=False).returncode


def main(argv) -> None:
  del argv  # absl's leftovers; --env=match re-runs sys.argv's flags
  logging.set_verbosity(logging.ERROR)  # Orbax logs every restore at INFO.
  if _ENV.value == "match":
    try:
      status = _in_matched_versions(_PROOF.value, sys.argv)
    except (proof.ProofError, cli.UsageError) as e:
      print(f"error: {cli.in_flags(str(e))}", file=sys.stderr)
      sys.exit(2)
    if status is not None:
      sys.exit(status)
  cli.set_flags_of_proof(_PROOF.value)  # before JAX starts a backend
  build.set_data_dir(_DATA_DIR.value)  # the verifier's own copy of the data, never the proof's choice
  if _MAX_PARAMS.value:
    os.environ["POL_JAX_MAX_PARAMS"] = str(_MAX_PARAMS.value)  # worker processes inherit it
  try:
    mode = mode_from(_MODE.value, _DEVICES.value, _CHUNK.value, _CALIBRATION.value, _DELTA.value)
    _join(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    drawn = challenge_from(
      _STRATEGY.value, _SEGMENTS.value, _SEED.value, _Q.value, _DETECT.value, _FAKED_FRACTION.value
    )
    verdict = run(
      _PROOF.value,
      drawn,
      mode,
      _INTEGRITY.value,
      sys.stderr.isatty(),
      _WORKERS.value,
      _VERSIONS_MATCHED.value,
      user_program=_PROGRAM.value,
    )
  except (proof.ProofError, cli.UsageError) as e:
    print(f"error: {cli.in_flags(str(e))}", file=sys.stderr)
    sys.exit(2)
  if _REPORT.value and _PROCESS_ID.value == 0:
    with open(_REPORT.value, "w") as f:
      json.dump(verdict.to_json(), f, indent=1)
  status = exit_status(verdict)
  print(cli.in_flags(verdict.table()))
  if status == 2:
    print(f"error: {cli.in_flags(verdict.summary())}", file=sys.stderr)
  sys.exit(status)


if __name__ == "__main__":
  # Flags exist only when this module runs as a program, so the experiments modules can be
  # imported together as libraries (the notebook does).
  _PROOF = flags.DEFINE_string("proof", None, "Proof directory.", required=True)
  _STRATEGY = flags.DEFINE_enum("strategy", challenge.DEFAULT, challenge.STRATEGIES, "Which segments to replay.")
  _SEGMENTS = flags.DEFINE_integer(
    "segments",
    None,
    "The uniform part: segments to replay (uniform, fiat-shamir: the last included) or to draw beyond top-q and the "
    "last (top-q+uniform). Default: sized by --detect and --faked_fraction.",
    lower_bound=0,
  )
  _DETECT = flags.DEFINE_float(
    "detect", challenge.DETECT, "Size the uniform part to catch --faked_fraction faked with this probability."
  )
  _FAKED_FRACTION = flags.DEFINE_float(
    "faked_fraction", challenge.FAKED_FRACTION, "The fraction of faked segments the uniform part must catch."
  )
  _SEED = flags.DEFINE_integer("seed", None, "Verifier seed (uniform, top-q+uniform; default: drawn from the OS).")
  _Q = flags.DEFINE_integer("q", 1, "Segments per epoch and metric (top-q, top-q+uniform).", lower_bound=1)
  _REPORT = flags.DEFINE_string("report", None, "Write the verdict as JSON to this file.")
  _MODE = flags.DEFINE_enum("mode", "exact", replay.MODES, "exact: digest equality; tolerance: within delta.")
  _CALIBRATION = flags.DEFINE_string("calibration", None, "Tolerance mode: delta from experiments.calibrate.")
  _DELTA = flags.DEFINE_string("delta", None, "Tolerance mode: normalised delta, e.g. l2=1e-4,linf=1e-3.")
  _CHUNK = flags.DEFINE_integer("chunk", 64, "Tolerance mode: segments per vmapped call.")
  _DEVICES = flags.DEFINE_integer("devices", None, "Local devices to replay on (default: all).")
  _INTEGRITY = flags.DEFINE_enum(
    "integrity", "full", ["full", "sampled"], "full: check every checkpoint's arrays; sampled: those replay uses."
  )
  _WORKERS = flags.DEFINE_integer(
    "workers", None, "At most this many pinned worker processes (default: cores // the proof's threads).", lower_bound=1
  )
  _ENV = flags.DEFINE_enum(
    "env",
    "here",
    ["here", "match"],
    "here: verify with this Python's packages; match: if the proof's jax/jaxlib differ, build once (cached under "
    "~/.cache/pol-jax, needs the package index) and verify in a virtual environment with the recorded versions.",
  )
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Your TFDS data directory (default: $TFDS_DATA_DIR).")
  _PROGRAM = flags.DEFINE_string(
    "program", None, "package.module:build, build(config) -> (program, dataset): the user program that made the proof."
  )
  _MAX_PARAMS = flags.DEFINE_integer(
    "max_params", None, "Refuse a proof whose model has more parameters (default 250M).", lower_bound=1
  )
  _VERSIONS_MATCHED = flags.DEFINE_string("versions_matched", None, "Set by --env=match in the child it starts.")
  _COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, to verify across processes.")
  _NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes joined by jax.distributed.", lower_bound=1)
  _PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's rank in [0, num_processes).", lower_bound=0)
  app.run(main, flags_parser=cli.parse_flags)
