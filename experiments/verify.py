"""Verifies a proof: ``python -m experiments.verify --proof=DIR [--strategy=...]``.

Rebuilds the training program from the config recorded in the proof, checks
everything, replays the chosen segments bit for bit, prints a table and exits
0 (accepted), 1 (rejected: a check failed) or 2 (unusable input, or this
machine cannot replay exactly).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from experiments import build
from pol_jax import challenge, proof, replay
from pol_jax import verify as verify_lib

_PROOF = flags.DEFINE_string("proof", None, "Proof directory.", required=True)
_STRATEGY = flags.DEFINE_enum("strategy", "fiat-shamir", challenge.STRATEGIES, "Which segments to replay.")
_SEGMENTS = flags.DEFINE_integer("segments", 8, "Segments to replay (uniform, fiat-shamir).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", None, "Verifier seed (uniform; default: drawn from the OS).")
_Q = flags.DEFINE_integer("q", 1, "Segments per epoch and metric (top-q).", lower_bound=1)
_REPORT = flags.DEFINE_string("report", None, "Write the verdict as JSON to this file.")
_DEVICES = flags.DEFINE_integer("devices", None, "Local devices to replay on, one segment each (default: all).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, to verify across processes.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes joined by jax.distributed.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's rank in [0, num_processes).", lower_bound=0)


def run(
  proof_dir: str,
  strategy: str = "fiat-shamir",
  segments: int = 8,
  seed: int | None = None,
  q: int = 1,
  devices: int | None = None,
  progress: bool = True,
) -> verify_lib.Verdict:
  """Verifies ``proof_dir`` with the program its recorded config describes."""
  import jax
  from ml_collections import ConfigDict
  from tqdm import tqdm

  manifest = verify_lib.read_manifest(proof_dir)
  try:
    config = ConfigDict(manifest["config"])
    train = build.dataset(config, "train")
    program = build.program(config, train)
  except build.ConfigError as e:
    raise proof.ProofError(proof.MANIFEST, f"config.{e.field}", str(e).split(": ", 1)[1]) from None
  if strategy == "uniform" and seed is None:
    if jax.process_count() > 1:
      raise UsageError("--strategy=uniform across processes needs --seed, so that every process draws alike")
    import secrets

    seed = secrets.randbits(63)
  try:
    replay.local_devices(devices)
  except ValueError as e:
    raise UsageError(str(e)) from None
  with tqdm(desc="verify", unit="segment", disable=not progress, leave=False) as bar:
    return verify_lib.verify(
      proof_dir,
      program,
      train,
      strategy=strategy,
      num_segments=segments,
      seed=seed,
      q=q,
      devices=devices,
      on_segment=lambda _: bar.update(1),
    )


class UsageError(Exception):
  """A request this machine cannot serve (CLI exit status 2)."""


def _join(coordinator: str | None, num_processes: int, process_id: int) -> None:
  """Joins ``jax.distributed`` before JAX starts any computation."""
  if coordinator is None:
    if num_processes > 1:
      raise UsageError("--num_processes > 1 needs --coordinator=HOST:PORT (process 0's address)")
    return
  if process_id >= num_processes:
    raise UsageError(f"--process_id={process_id} must be below --num_processes={num_processes}")
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  # Connect now, with stdout sent to stderr: Gloo prints its connection line
  # to stdout, which belongs to the verdict.
  from jax.experimental import multihost_utils

  sys.stdout.flush()
  saved = os.dup(1)
  os.dup2(2, 1)
  try:
    multihost_utils.sync_global_devices("pol-jax verify: joined")
  finally:
    os.dup2(saved, 1)
    os.close(saved)


def exit_status(verdict: verify_lib.Verdict) -> int:
  """0 accepted; 1 a check showed the proof false; 2 undecided here (environment)."""
  if verdict.accepted:
    return 0
  return 2 if [c.name for c in verdict.failed] == ["environment"] else 1


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax logs every restore at INFO.
  try:
    _join(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    verdict = run(
      _PROOF.value, _STRATEGY.value, _SEGMENTS.value, _SEED.value, _Q.value, _DEVICES.value, sys.stderr.isatty()
    )
  except (proof.ProofError, UsageError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(verdict.table())
  if _REPORT.value and _PROCESS_ID.value == 0:
    with open(_REPORT.value, "w") as f:
      json.dump(verdict.to_json(), f, indent=1)
  sys.exit(exit_status(verdict))


if __name__ == "__main__":
  app.run(main)
