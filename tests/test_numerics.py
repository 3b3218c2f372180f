"""Portable numerics: float64 compute rounded after every op, the same bits at any thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, reseal

from pol_jax import challenge, numerics, proof, recorder, training, verifier

_PINNED = "import os, runpy, sys; os.sched_setaffinity(0, {0}); sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"


def _cli(module: str, *args: str, cores: set[int] | None = None) -> subprocess.CompletedProcess:
  argv = [sys.executable, "-c", _PINNED.format(repr(cores)), module] if cores else [sys.executable, "-m", module]
  return subprocess.run([*argv, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_every_operation_is_rounded_to_float32_in_float64():
  def f(x, y):
    return jnp.tanh(x @ y).sum() / 3.0

  x = np.linspace(-1, 1, 48, dtype=np.float32).reshape(6, 8)
  y = np.linspace(2, -1, 40, dtype=np.float32).reshape(8, 5)
  with jax.enable_x64(True):
    got = numerics.portable(f)(x, y)

    def r(v):
      return jax.lax.reduce_precision(v, exponent_bits=8, mantissa_bits=23)

    a = jnp.asarray(x, jnp.float64)
    b = jnp.asarray(y, jnp.float64)
    want = r(r(r(jnp.tanh(r(a @ b))).sum()) / 3.0).astype(jnp.float32)
  assert got.dtype == jnp.float32
  assert got == want, (got, want)


def test_gradients_and_cotangents_are_rounded_too():
  def loss(w, x):
    return jnp.sum(jnp.sin(x @ w) ** 2)

  w = np.full((4, 3), 0.1, np.float32)
  x = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
  with jax.enable_x64(True):
    g = numerics.portable(jax.grad(loss))(w, x)
    exact = jax.grad(loss)(jnp.asarray(w, jnp.float64), jnp.asarray(x, jnp.float64))
  assert g.dtype == jnp.float32
  # Every value is a float32, within float32 rounding of the float64 gradient.
  np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(exact), rtol=1e-6)


@pytest.mark.parametrize(
  ("fn", "name"),
  [
    (lambda x: jax.lax.scan(lambda c, _: (c * 2.0, None), x, None, length=3)[0], "scan"),
    (lambda x: jax.lax.while_loop(lambda c: c < 10.0, lambda c: c * 2.0, x), "while"),
    (lambda x: jax.lax.cond(x > 0, lambda v: v, lambda v: -v, x), "cond"),
  ],
)
def test_a_step_that_cannot_be_wrapped_names_its_primitive(fn, name):
  with jax.enable_x64(True), pytest.raises(numerics.Unsupported, match=f"calls '{name}'"):
    numerics.portable(fn)(np.float32(1.5))


def test_portable_numerics_need_x64():
  with pytest.raises(numerics.Unsupported, match="JAX_ENABLE_X64=1"):
    numerics.portable(lambda x: x * 2.0)(np.float32(1.0))


def test_a_step_with_a_loop_fails_before_training_starts(tmp_path):
  from conftest import smoke_config

  from pol_jax import build

  config = smoke_config("mlp")
  train = build.dataset(config, "train")
  program = build.program(config, train)

  def looping(state, batch, key):
    state, metrics = program.step(state, batch, key)
    return state, {**metrics, "x": jax.lax.fori_loop(0, 2, lambda i, v: v * 2.0, metrics["loss"])}

  portable = numerics.portable_program(program._replace(step=looping))
  with jax.enable_x64(True), pytest.raises(numerics.Unsupported, match="calls '(while|scan)'"):
    recorder.record(str(tmp_path / "proof"), portable, train, build.plan(config))
  assert not os.path.exists(tmp_path / "proof" / proof.CHECKPOINTS), "nothing was trained or written"


@pytest.fixture(scope="module")
def portable_proof(tmp_path_factory):
  """The default CNN in portable numerics, recorded by the CLI with this machine's 2 threads."""
  workdir = str(tmp_path_factory.mktemp("portable"))
  done = _cli(
    "experiments.train",
    f"--workdir={workdir}",
    "--config=experiments/configs/default.py:smoke",
    "--config.numerics=portable",
    "--config.batch_size=64",
    "--config.steps=16",
  )
  assert done.returncode == 0, done.stderr[-2000:]
  return os.path.join(workdir, "proof")


def test_a_portable_proof_from_two_threads_verifies_bit_for_bit_on_one(portable_proof, tmp_path):
  with open(os.path.join(portable_proof, proof.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["numerics"] == {"kind": "portable", "protocol": numerics.PROTOCOL}
  assert manifest["environment"]["cpu_threads"] == 2 and manifest["environment"]["x64"] is True
  report = tmp_path / "r.json"
  done = _cli("experiments.verify", f"--proof={portable_proof}", "--strategy=all", f"--report={report}", cores={0})
  assert done.returncode == 0, done.stdout + done.stderr[-2000:]
  verdict = json.loads(report.read_text())
  assert verdict["status"] == "accepted" and len(verdict["segments"]) == 4
  assert {s["device"] for s in verdict["segments"]} == {"cpu:0"}, "replayed in this process, no pinned workers"
  rows = {r["field"]: r for r in verdict["reproduction"]}
  assert rows["cpu_threads"]["here"] == 1 and "portable" in rows["cpu_threads"]["how"]


def test_a_float32_proof_of_the_same_run_is_refused_on_one_core(tmp_path):
  workdir = str(tmp_path)
  done = _cli(
    "experiments.train",
    f"--workdir={workdir}",
    "--config=experiments/configs/default.py:smoke",
    "--config.batch_size=64",
    "--config.steps=8",
  )
  assert done.returncode == 0, done.stderr[-2000:]
  refused = _cli("experiments.verify", f"--proof={workdir}/proof", "--strategy=all", cores={0})
  assert refused.returncode == 2 and "needs 2 cores" in refused.stderr, refused.stdout + refused.stderr


def test_a_float32_verifier_of_a_portable_proof_is_told_so(portable_proof, copy_of):
  from experiments.configs import default
  from pol_jax import build

  config = default.get_config("smoke")
  config.batch_size, config.steps = 64, 16
  train = build.dataset(config, "train")
  verdict = verifier.verify(portable_proof, build.program(config, train), train, challenge=challenge.All())
  assert "recorded with portable numerics, the verifier's program computes in float32" in verdict.checks[2].detail


@pytest.mark.parametrize(
  ("edit", "words"),
  [
    (lambda b: b.pop("numerics"), "numerics: missing"),
    (lambda b: b["numerics"].update(kind="float16"), "numerics.kind: expected 'float32' or 'portable'"),
    (lambda b: b["numerics"].update(protocol="x64r/0"), "numerics.protocol: portable protocol 'x64r/0'"),
    (lambda b: b["numerics"].update(protocol=None), "numerics.protocol: portable protocol None"),
    (lambda b: b["numerics"].update(extra=1), "numerics: expected the fields kind and protocol"),
  ],
)
def test_the_numerics_record_is_validated(portable_proof, copy_of, edit, words):
  p = copy_of(portable_proof)
  reseal(p, edit)
  with pytest.raises(proof.ProofError, match=words.replace("(", r"\(")):
    proof.read_manifest(p)


def test_training_state_dtypes_are_float32_in_portable_numerics(portable_proof):
  from pol_jax import build

  with jax.enable_x64(True):
    program, _ = build.rebuild(portable_proof)
    state = jax.eval_shape(program.init, training.derive_keys(0).init)
  dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(state)}
  assert dtypes <= {"float32", "int32", "uint32"}, dtypes
