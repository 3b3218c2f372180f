"""Flax integration: a user's own Linen TrainState loop records and verifies."""

from __future__ import annotations

import importlib.util
import os

import optax
import pytest
from conftest import ROOT, load_manifest

from pol_jax import challenge, data, integrations, proof, recorder, training, verifier


def _example(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_linen_train_state_example_records_and_verifies(tmp_path):
  example = _example("linen_train_state")
  verdict = example.main(str(tmp_path))
  assert verdict.accepted, verdict.table()
  assert len(verdict.segments) == 6 and all(s.match for s in verdict.segments)
  # A verifier whose step uses another learning rate cannot check the proof (undecided, exit 2): its program
  # differs from the recorded one (the first differing line named) and does not reproduce the states.
  example.tx = optax.sgd(0.06, momentum=0.9)
  other = training.Program(example.init, example.train_step)
  _assert_cannot_check(
    verifier.verify(str(tmp_path / "proof"), other, data.load_digits("train"), challenge=challenge.All())
  )


def _assert_cannot_check(verdict):
  program = verdict.checks[verifier.CHECKS.index("program")]
  assert verdict.status == "undecided", verdict.table()
  assert program.passed is None and "first difference at line" in program.detail, program.detail


def test_nnx_optimizer_example_records_and_verifies(tmp_path):
  example = _example("nnx_optimizer")
  verdict = example.main(str(tmp_path))
  assert verdict.accepted, verdict.table()
  assert len(verdict.segments) == 6 and all(s.match for s in verdict.segments)
  # The proof holds the whole NNX state: BatchNorm statistics and the optimizer's moments and step.
  manifest = load_manifest(tmp_path / "proof")
  meta = proof.read_meta(str(tmp_path / "proof"), 120, manifest["checkpoints"]["120"])
  leaves = set(meta["leaves"])
  assert {"rest/0/bn/mean", "rest/0/bn/var", "rest/1/step"} <= leaves, sorted(leaves)
  assert any(p.startswith("rest/1/opt_state/") for p in leaves), sorted(leaves)
  # The trained model comes back as an NNX module holding the recorded final state.
  program = integrations.nnx_program(example.create, example.train_step)
  model, optimizer = program.objects(recorder.final_state(str(tmp_path / "proof"), program, manifest))
  assert int(optimizer.step[...]) == 120
  # A verifier whose optimizer uses another learning rate cannot check the proof (undecided, exit 2).
  example.optax = _OtherLearningRate()
  other = integrations.nnx_program(example.create, example.train_step)
  _assert_cannot_check(
    verifier.verify(str(tmp_path / "proof"), other, data.load_digits("train"), challenge=challenge.All())
  )


class _OtherLearningRate:
  """Stands in for ``optax`` in the example module: ``adamw`` with another learning rate."""

  def __getattr__(self, name):
    return getattr(optax, name)

  def adamw(self, learning_rate, **kwargs):
    return optax.adamw(learning_rate * 1.5, **kwargs)


@pytest.mark.parametrize("example", ["nnx_tutorial", "linen_flax_style"])
def test_flax_style_examples_record_and_verify_from_the_cli(tmp_path, example):
  import subprocess
  import sys

  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "examples"), os.environ.get("PYTHONPATH", "")]),
  }

  def cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True)

  trained = cli(
    "experiments.train", f"--program={example}:build", f"--config=examples/{example}.py",
    "--config.steps=60", f"--workdir={tmp_path}",
  )  # fmt: skip
  assert trained.returncode == 0 and "WARNING" not in trained.stderr, trained.stderr
  verified = cli("experiments.verify", f"--proof={tmp_path}/proof", f"--program={example}:build")
  assert verified.returncode == 0 and verified.stdout.startswith("ACCEPTED: 3 of 3"), verified.stdout + verified.stderr
  assert "WARNING" not in verified.stderr, verified.stderr
