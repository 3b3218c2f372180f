"""A Flax user's own program, written as the Flax examples write it: dict batches, extra fields, a TrainState subclass."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import OWNER
from flax import nnx
from flax.training import train_state

from pol_jax import data, recorder, training, verify


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = x.astype(jnp.float32) / 16.0
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.Dropout(0.1, deterministic=not train)(x.mean(axis=(1, 2)))
    return nn.Dense(10)(x)


class TrainState(train_state.TrainState):
  batch_stats: Any


schedule = optax.warmup_cosine_decay_schedule(0.0, 0.01, warmup_steps=3, decay_steps=12)
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def create(key):
  variables = CNN().init(key, jnp.zeros((1, 8, 8, 1)), train=False)
  return TrainState.create(
    apply_fn=CNN().apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
  )


def _train_step(state, batch, rng, grad_scale=None):
  def loss_fn(params):
    logits, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
      rngs={"dropout": rng}, mutable=["batch_stats"],
    )  # fmt: skip
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return (losses * batch["weight"]).sum() / batch["weight"].sum(), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if grad_scale is not None:
    grads = jax.tree.map(lambda g: g * grad_scale, grads)
  state = state.apply_gradients(grads=grads).replace(batch_stats=updates["batch_stats"])
  return state, {"loss": loss}


train_step = jax.jit(_train_step)


def digits_with_weights() -> data.Examples:
  train = data.load_digits("train")
  weight = np.where(train.labels % 2 == 0, 1.0, 0.5).astype(np.float32)
  return data.Examples("digits+weights", {"image": train.inputs, "label": train.labels, "weight": weight})


class IndexedSource:
  """What a Grain ``MapDataset`` or ``tfds.data_source`` offers: ``len`` and one example by index."""

  def __init__(self, examples: data.Examples):
    self.tree = examples.tree

  def __len__(self):
    return len(self.tree["label"])

  def __getitem__(self, i):
    return {name: column[i] for name, column in self.tree.items()}


@pytest.fixture(scope="module")
def user_proof(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("user") / "proof")
  program = training.Program(create, train_step)
  examples = digits_with_weights()
  plan = recorder.Plan(owner=OWNER, nonce=0, k=4, steps=12, batch_size=32, runner="loop")
  recorder.record(path, program, examples, plan, config={"example": "linen dict batches"})
  return path, program, examples


def test_a_linen_trainstate_step_with_dict_batches_records_and_verifies(user_proof):
  path, program, examples = user_proof
  verdict = verify.verify(path, program, examples, strategy="all")
  assert verdict.accepted, verdict.table()
  batch = examples.batch(np.array([[0, 1]]))
  assert set(batch) == {"image", "label", "weight"} and batch["image"].shape == (1, 2, 8, 8, 1)


def test_every_field_of_an_example_is_in_its_digest(user_proof):
  path, program, examples = user_proof
  tree = jax.tree.map(np.copy, examples.tree)
  tree["weight"][int(np.asarray(verify.proof.read_index_log(path, verify.read_manifest(path)))[0, 0])] += 1.0
  verdict = verify.verify(path, program, data.Examples(examples.name, tree), strategy="all")
  assert [c.name for c in verdict.failed] == ["data"], verdict.table()


def test_an_index_addressable_source_gives_the_same_examples_and_an_iterator_is_refused_in_one_line():
  examples = digits_with_weights()
  loaded = data.from_source(examples.name, IndexedSource(examples))
  assert np.array_equal(loaded.digests(np.arange(50)), examples.digests(np.arange(50)))
  with pytest.raises(TypeError, match="not index-addressable: pass a source with __len__ and __getitem__"):
    data.from_source("gen", (examples.batch(np.array(i)) for i in range(3)))


class NNXNet(nnx.Module):
  """The NNX tutorial's way: the model keeps its own random state (``Dropout(rngs=rngs)``)."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 32, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.hidden(x.reshape(x.shape[0], -1).astype(jnp.float32) / 16.0))))


def nnx_create(key):
  model = NNXNet(nnx.Rngs(key))
  return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


@nnx.jit
def nnx_step(model, optimizer, batch, key):  # the key is unused: dropout draws from the model's own Rngs
  x, y = batch
  loss, grads = nnx.value_and_grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
  optimizer.update(model, grads)
  return {"loss": loss}


def test_typed_prng_keys_in_the_state_are_recorded_restored_and_replayed(tmp_path):
  from pol_jax import integrations, proof

  program = integrations.nnx_program(nnx_create, nnx_step)
  train = data.load_digits("train")
  assert any(training.is_key(leaf) for leaf in jax.tree.leaves(program.init(jax.random.key(0))))
  plan = recorder.Plan(owner=OWNER, nonce=0, k=3, steps=9, batch_size=32, runner="loop")
  path = str(tmp_path / "proof")
  manifest = recorder.record(path, program, train, plan, config={"example": "nnx rngs in the model"})
  assert any(d for p, d in proof.read_meta(path, 9, None)["leaves"].items() if "key" in p)
  state = recorder.final_state(path, program, manifest)
  keys = [leaf for leaf in jax.tree.leaves(state) if training.is_key(leaf)]
  assert keys and all(str(k.dtype) == "key<fry>" for k in keys)
  verdict = verify.verify(path, program, train, strategy="all")
  assert verdict.accepted, verdict.table()


def tutorial_create(key):  # the NNX MNIST tutorial's objects, metrics included
  model = NNXNet(nnx.Rngs(key))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2, 0.9), wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  return model, optimizer, metrics


def tutorial_loss(model, batch):
  logits = model(batch[0])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), logits


@nnx.jit
def tutorial_step(model, optimizer, metrics: nnx.MultiMetric, batch):  # mutates, returns nothing
  (loss, logits), grads = nnx.value_and_grad(tutorial_loss, has_aux=True)(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch[1])
  optimizer.update(model, grads)


def test_the_nnx_tutorials_step_shape_records_and_carries_its_metrics(tmp_path):
  from pol_jax import integrations

  program = integrations.nnx_program(tutorial_create, tutorial_step)
  train = data.load_digits("train")
  plan = recorder.Plan(owner=OWNER, nonce=1, k=3, steps=6, batch_size=32, runner="loop")
  manifest = recorder.record(str(tmp_path / "proof"), program, train, plan, config={"example": "nnx tutorial"})
  assert verify.verify(str(tmp_path / "proof"), program, train, strategy="all").accepted
  _, _, metrics = program.objects(recorder.final_state(str(tmp_path / "proof"), program, manifest))
  assert 0.0 <= float(metrics.compute()["accuracy"]) <= 1.0 and float(metrics.compute()["loss"]) > 0


def test_a_step_that_does_not_fit_the_objects_says_the_signature_it_needs():
  from pol_jax import integrations

  def wrong(model, batch):
    return {}

  with pytest.raises(TypeError, match=r"train_step\(model, batch\) does not fit the 3 objects create returns"):
    integrations.nnx_program(tutorial_create, wrong)


def _cli(module: str, *args: str):
  import os
  import subprocess
  import sys

  from conftest import ROOT

  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_a_third_party_verifies_a_user_programs_proof_with_one_command_naming_the_program(tmp_path):
  from conftest import ROOT

  config = f"--config={ROOT}/tests/user_project/config.py"
  trained = _cli("experiments.train", "--program=user_project:build", config, f"--workdir={tmp_path}")
  assert trained.returncode == 0, trained.stderr
  path = str(tmp_path / "proof")
  assert verify.read_manifest(path)["builder"] == {"target": "user_project:build", "version": None}
  unnamed = _cli("experiments.verify", f"--proof={path}")  # the proof names its builder; it is never imported
  assert unnamed.returncode == 2 and unnamed.stderr.strip().splitlines() == [
    "error: manifest.json: builder: recorded by user_project:build (version None); install that package and pass "
    "--program=user_project:build (pol-jax never imports code a proof names)"
  ], unnamed.stderr
  named = _cli("experiments.verify", f"--proof={path}", "--program=user_project:build", "--strategy=all")
  assert named.returncode == 0 and named.stdout.startswith("ACCEPTED: 3 of 3 segments"), named.stdout + named.stderr
  missing = _cli("experiments.verify", f"--proof={path}", "--program=no_such_project:build")
  assert missing.returncode == 2 and "--program: builder 'no_such_project:build': cannot import it" in missing.stderr


def test_a_program_mismatch_names_the_first_differing_line(user_proof):
  import os

  from pol_jax import proof

  path, _, examples = user_proof
  assert "programs/segment.stablehlo.gz" in verify.read_manifest(path)["files"]
  assert os.path.getsize(os.path.join(path, "programs", "segment.stablehlo.gz")) < 200_000

  unclipped = jax.jit(functools.partial(_train_step, grad_scale=1.0001))  # the verifier's step differs

  verdict = verify.verify(path, training.Program(create, unclipped), examples, strategy="all")
  (failed,) = [c for c in verdict.failed if c.name == "program"]
  assert "first difference at line" in failed.detail and "recorded" in failed.detail, failed.detail
  assert proof.first_difference("x\ny", "x\ny\nz") == "the recorded program has 2 lines, the verifier's 3"
