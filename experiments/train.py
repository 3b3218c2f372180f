"""Trains with a proof: ``python -m experiments.train [--config=...] [--workdir=DIR]``.

Writes ``DIR/proof``; run again on a workdir holding a killed run's partial
proof to resume it. Exit status 2, with a one-line message, on bad input.

The proof is bound to an Ed25519 key: its seed derives from the public key and
``config.seed`` (``proof.bound_seed``), so only that key can claim it.
``--key`` (default ``DIR/owner.key``) is the private key, created (mode 0600,
with ``DIR/owner.key.pub``) when missing and never overwritten; training needs
only its public key, and ``--config.owner=HEX`` names one directly.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from tqdm import tqdm

from experiments import cli
from pol_jax import build, ownership, proof, recorder, workers

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")


def run(config, workdir: str, progress: bool = True, user_program: str | None = None) -> dict:
  """Records a proof of training ``config`` in ``workdir/proof``; returns a summary.

  ``user_program``: ``"package.module:function"``, a ``build(config: dict) ->
  (program, dataset)`` of your own (``--program``) that replaces this project's
  models and data; ``config`` then needs only the plan's fields (``owner``,
  ``seed``, ``k``, ``steps``, ``batch_size``, ``runner``) besides your own.

  Raises:
    cli.UsageError: ``user_program`` cannot be imported here.
  """
  plan = build.plan(config)
  if user_program:
    try:
      build_user_program = build.user_builder(user_program)
    except build.ProgramUnavailable as e:
      raise cli.UsageError(f"--program: {e}") from None
    program, train = build_user_program(config.to_dict())
  else:
    train = build.dataset(config, "train")
    program = build.program(config, train)
  proof_dir = os.path.join(workdir, "proof")
  bar = tqdm(total=plan.steps, desc="train", unit="step", disable=not progress, leave=False)
  last = {"step": 0}

  def on_segment(step: int, metrics: dict) -> None:
    bar.update(step - last["step"])
    last["step"] = step
    bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")

  t0 = time.perf_counter()
  with bar:
    manifest = recorder.record(
      proof_dir, program, train, plan, config=config.to_dict(), on_segment=on_segment,
      builder=workers.builder_record(user_program) if user_program else None,
    )  # fmt: skip
  seconds = time.perf_counter() - t0
  final = None if user_program else recorder.final_state(proof_dir, program, manifest)
  return {
    "proof": proof_dir,
    "root": manifest["root"],
    "steps": plan.steps,
    "checkpoints": len(manifest["checkpoints"]),
    "seconds": seconds,
    "proof_bytes": proof.size_bytes(proof_dir),
    "test_accuracy": None if final is None else build.evaluate(config, final, build.dataset(config, "test")),
  }


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax logs every save at INFO.
  cli.set_deterministic_flags()  # before JAX starts a backend
  try:
    build.set_data_dir(_DATA_DIR.value)
    owner = cli.bind_owner(_CONFIG.value, _KEY.value or os.path.join(_WORKDIR.value, "owner.key"))
    build.set_numerics(_CONFIG.value)
    summary = run(_CONFIG.value, _WORKDIR.value, progress=sys.stderr.isatty(), user_program=_PROGRAM.value)
  except (
    build.ConfigError,
    cli.UsageError,
    proof.ProofError,
    recorder.ProofExistsError,
    ownership.DisputeError,
  ) as e:
    print(f"error: {cli.in_flags(str(e))}", file=sys.stderr)
    sys.exit(2)
  print(
    f"recorded {summary['steps']} steps in {summary['seconds']:.1f} s: {summary['checkpoints']} checkpoints, "
    f"{summary['proof_bytes'] / 1e6:.2f} MB ({summary['proof_bytes'] / summary['steps']:.0f} bytes/step)\n"
    f"proof:  {summary['proof']}\nroot:   {summary['root']}\n{owner}"
  )
  if summary["test_accuracy"] is not None:
    print(f"held-out accuracy: {summary['test_accuracy']:.4f}")


if __name__ == "__main__":
  # Flags exist only when this module runs as a program, so the experiments modules can be
  # imported together as libraries (the notebook does).
  _CONFIG = cli.define_config(_DEFAULT, "Training config file (and :arg).")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for the proof and metrics.")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Your TFDS data directory (default: $TFDS_DATA_DIR).")
  _PROGRAM = flags.DEFINE_string("program", None, "Your package.module:build, build(config) -> (program, dataset).")
  _KEY = flags.DEFINE_string(
    "key", None, "The owner's Ed25519 private key (PEM); created if missing (default WORKDIR/owner.key)."
  )
  app.run(main, flags_parser=cli.parse_flags)
