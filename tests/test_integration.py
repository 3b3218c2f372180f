"""Flax integration: a user's own Linen TrainState loop records and verifies."""

from __future__ import annotations

import importlib.util
import os

import optax
from conftest import ROOT

from pol_jax import data, training, verify


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
  # A verifier whose step uses another learning rate is caught before any replay.
  example.tx = optax.sgd(0.06, momentum=0.9)
  other = training.Program(example.init, example.train_step)
  rejected = verify.verify(str(tmp_path / "proof"), other, data.load_digits("train"), strategy="all")
  assert [c.name for c in rejected.failed] == ["program"], rejected.table()
