"""Shared fixtures: small recorded proofs, and helpers to tamper with them.

Built with the library only (``pol_jax``), never through ``experiments``: the
smoke config below has the values of ``experiments/configs/default.py:smoke``
(``test_build.py`` checks that they agree).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
from ml_collections import ConfigDict

from pol_jax import build, proof, recorder, store, tolerance
from pol_jax.proof import reseal  # noqa: F401  (tests edit manifests as a forger would)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _test_key():
  from cryptography.hazmat.primitives.asymmetric import ed25519

  return ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


OWNER_KEY = _test_key()
"""The owner of the test proofs (a fixed key: its private bytes are in this file)."""
OWNER = OWNER_KEY.public_key().public_bytes_raw().hex()

SMOKE = {
  "dataset": "digits", "model": "cnn", "augment": "none", "widths": (16, 32), "features": (128,), "dropout": 0.1,
  "optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine",
  "batch_size": 32, "steps": 12, "k": 4, "seed": 0, "owner": "", "runner": "loop", "numerics": "float32",
}  # fmt: skip
"""``experiments/configs/default.py:smoke``: three segments of four steps on digits."""


def smoke_config(model: str = "mlp", **overrides) -> ConfigDict:
  """A few short segments: the scan runner for the MLP, the loop for the CNN."""
  c = ConfigDict(SMOKE)
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


@pytest.fixture(scope="session")
def cnn_proof(tmp_path_factory):
  """A BatchNorm CNN proof: vmapped replay does not reproduce its bits."""
  path = str(tmp_path_factory.mktemp("cnn") / "proof")
  record(path, smoke_config("cnn", steps=24, k=4))
  return path


@pytest.fixture(scope="session")
def calibration(cnn_proof):
  """``cnn_proof``'s tolerance calibration: the path of its JSON file, and the record."""
  program, train = build.rebuild(cnn_proof)
  record_ = tolerance.calibrate(cnn_proof, program, train, num_segments=6, chunk=6)
  path = os.path.join(os.path.dirname(cnn_proof), "calibration.json")
  with open(path, "w") as f:
    json.dump(record_, f)
  return path, record_


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


# ------------------------------------------------------------------ tampering, as a forger would


def batch_path(proof_dir: str, step: int) -> str:
  """The relative path of the batch directory that holds the recorded state at ``step``."""
  return f"{proof.CHECKPOINTS}/{store.batch_of(step, store.batches(proof_dir))}"


def ocdbt_data_file(p: str, step: int = 4) -> str:
  """A TensorStore data file of the batch that holds ``step`` (relative path): what a restore reads."""
  d = os.path.join(batch_path(p, step), "state", "ocdbt.process_0", "d")
  return os.path.join(d, sorted(os.listdir(os.path.join(p, d)))[0])


def plant_fifo(p: str, rel: str) -> str:
  """Replaces the file ``rel`` of ``p`` by a FIFO (opening it to read blocks until a writer comes)."""
  path = os.path.join(p, rel)
  os.remove(path)
  os.mkfifo(path)
  return path


def huge_orbax_model(path: str) -> None:
  """A real Orbax checkpoint of a 2x3 array whose metadata then declares 60000x60000 (14.4 GB)."""
  import numpy as np
  import orbax.checkpoint as ocp

  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
  ocp.Checkpointer(handler).save(path, {"w": np.ones((2, 3), np.float32)})
  zarray = os.path.join(path, "w", ".zarray")
  meta = json.load(open(zarray))
  meta["shape"] = [60000, 60000]
  json.dump(meta, open(zarray, "w"))


# ------------------------------------------------------------------ hostile input: hangs, one-line errors


HANG_SECONDS = 30


def within(fn, fifo: str | None = None, seconds: float = HANG_SECONDS):
  """``fn()``'s exception (or None), failing the test if it runs past ``seconds`` (a hang)."""
  out: dict = {}

  def target():
    try:
      fn()
    except BaseException as e:  # noqa: BLE001 - handed to the test
      out["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    for _ in range(3):  # Unblock a reader stuck on the FIFO so the thread can end.
      try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
      except (OSError, TypeError):
        pass
    pytest.fail(f"hung for {seconds} s on {fifo}")
  return out.get("error")


def check_one_line(error: BaseException | None, kind: type, *words: str) -> None:
  assert isinstance(error, kind), repr(error)
  assert "\n" not in str(error), str(error)
  for word in words:
    assert word in str(error), str(error)


def run_limited(code: str, arg: str, error: str) -> subprocess.CompletedProcess:
  """Runs ``code`` in a child limited to 3 GiB of address space; ``error`` (a class name) exits 2, printed."""
  prelude = "import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\ntry:\n"
  body = "".join(f"  {line}\n" for line in code.splitlines())
  tail = f"except Exception as e:\n  if type(e).__name__ != {error!r}: raise\n  print(e)\n  sys.exit(2)\n"
  return subprocess.run(
    [sys.executable, "-c", prelude + body + tail, arg], cwd=ROOT, capture_output=True, text=True, timeout=60
  )
