"""Shared fixtures: small recorded proofs, and helpers to tamper with them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from experiments.configs import default
from experiments.forge import reseal  # noqa: F401  (tests edit manifests as a forger would)
from pol_jax import build, proof, recorder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _test_key():
  from cryptography.hazmat.primitives.asymmetric import ed25519

  return ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


OWNER_KEY = _test_key()
"""The owner of the test proofs (a fixed key: its private bytes are in this file)."""
OWNER = OWNER_KEY.public_key().public_bytes_raw().hex()


def smoke_config(model: str = "mlp", **overrides):
  """A few short segments: the scan runner for the MLP, the loop for the CNN."""
  c = default.get_config("smoke")
  c.model = model
  c.owner = OWNER
  c.runner = "scan" if model == "mlp" else "loop"
  for key, value in overrides.items():
    c[key] = value
  return c


def record(proof_dir: str, config) -> dict:
  config.owner = config.owner or OWNER
  train = build.dataset(config, "train")
  return recorder.record(proof_dir, build.program(config, train), train, build.plan(config), config=config.to_dict())


@pytest.fixture(scope="session")
def honest(tmp_path_factory):
  """A finished honest proof (MLP, scan runner, seed 0); copy it before editing."""
  path = str(tmp_path_factory.mktemp("honest") / "proof")
  record(path, smoke_config())
  return path


@pytest.fixture(scope="session")
def other_seed(tmp_path_factory):
  """The same run with seed 1: a source of plausible checkpoints to splice in."""
  path = str(tmp_path_factory.mktemp("other") / "proof")
  record(path, smoke_config(seed=1))
  return path


@pytest.fixture
def copy_of(tmp_path):
  def copy(path: str) -> str:
    dest = str(tmp_path / f"copy{len(os.listdir(tmp_path))}")
    shutil.copytree(path, dest)
    return dest

  return copy


def load_manifest(proof_dir: str) -> dict:
  with open(os.path.join(proof_dir, proof.MANIFEST)) as f:
    return json.load(f)


def run_cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs ``python -m module args`` in a fresh process from the repository root."""
  return subprocess.run(
    [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
  )


def batch_path(proof_dir: str, step: int) -> str:
  """The relative path of the batch directory that holds the recorded state at ``step``."""
  return f"{proof.CHECKPOINTS}/{proof.batch_of(step, proof.batches(proof_dir))}"


def splice_state(proof_dir: str, source: str, step: int) -> str:
  """Copies ``source``'s recorded state at ``step`` into ``proof_dir`` (its batch rewritten) and reseals, as a
  forger would; returns the spliced state's meta digest."""
  from experiments import forge
  from pol_jax import training

  program, _ = build.rebuild(source)
  manifest = load_manifest(source)
  template = training.to_host(program.init(training.derive_keys(manifest["seed"]).init))
  state, meta = proof.restore(source, step, template, manifest["checkpoints"][str(step)])
  return forge.replace_checkpoint(proof_dir, state, meta.get("fingerprints"))["checkpoints"][str(step)]
