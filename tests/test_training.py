"""pol_jax.training: keys, the pure step, the segment runner and the state fingerprint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke_config

from pol_jax import build, challenge, data, recorder, training, verifier


def test_keys_are_fold_ins_of_one_seed():
  keys = training.derive_keys(7)
  root = jax.random.key(7)
  for i, key in enumerate(keys):
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.fold_in(root, i)))


@pytest.mark.parametrize("runner", training.RUNNERS)
def test_dropout_key_changes_every_step_and_replays(runner):
  import optax

  from pol_jax.models import mlp

  apply_fn, init_fn = mlp.build(features=(32,), dropout=0.5)
  tx = optax.sgd(0.0)  # no learning: only the per-step key changes the outputs
  params, model_state = init_fn(jax.random.key(0))
  state = training.init_state(params, tx, model_state)
  segment = training.make_segment(training.make_step(apply_fn, training.cross_entropy, tx), runner)
  x = np.tile(data.load_digits().inputs[:8][None], (3, 1, 1, 1, 1))
  y = np.tile(data.load_digits().labels[:8][None], (3, 1))
  _, metrics = segment.run(state, (x, y), training.derive_keys(0).step)
  losses = np.asarray(metrics["loss"])
  assert len(set(losses.tolist())) == 3, losses
  _, again = segment.run(state, (x, y), training.derive_keys(0).step)
  np.testing.assert_array_equal(np.asarray(again["loss"]), losses)


def test_state_fingerprint_names_the_changed_leaf_and_is_the_same_in_both_passes(monkeypatch):
  state = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((), jnp.int32), "k": jax.random.key(1), "c": jnp.ones(4)}
  one_pass = np.asarray(training.state_fingerprint(state))
  monkeypatch.setattr(training, "_ONE_PASS_WORDS", 0)
  per_leaf = np.asarray(training.state_fingerprint(state))
  np.testing.assert_array_equal(one_pass, per_leaf)
  changed = {**state, "c": state["c"].at[2].set(np.nextafter(np.float32(1), np.float32(2)))}
  differs = np.asarray(training.state_fingerprint(changed)) != per_leaf
  assert differs.tolist() == [False, False, True, False], differs  # leaves in tree order: a, b, c, k


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_step_is_compiled_once_for_every_segment(tmp_path, model):
  config = smoke_config(model, steps=20, k=4)
  train = build.dataset(config, "train")
  program = build.program(config, train)
  traces = {"prover": 0, "verifier": 0}

  def counting(who):
    def counted(state, batch, key):
      traces[who] += 1
      return program.step(state, batch, key)

    return training.Program(program.init, counted)

  path = str(tmp_path / "proof")
  recorder.record(path, counting("prover"), train, build.plan(config), config=config.to_dict())
  assert traces["prover"] == 1, f"the prover traced its step {traces['prover']} times for 5 segments"
  verdict = verifier.verify(path, counting("verifier"), train, challenge=challenge.All())
  assert verdict.accepted and len(verdict.segments) == 5
  assert traces["verifier"] == 1, f"the verifier traced its step {traces['verifier']} times for 5 segments"
  program_v = counting("verifier")
  for _ in range(2):  # Verifying again in the same process reuses the compiled segment.
    assert verifier.verify(path, program_v, train, challenge=challenge.All()).accepted
  assert traces["verifier"] == 2
