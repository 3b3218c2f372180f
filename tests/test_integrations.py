"""A Flax user's own training code records and verifies: pol_jax.integrations and the examples.

Programs written as the Flax examples write them (dict batches, extra fields, a Linen TrainState subclass, a
Grain source), NNX programs through :func:`pol_jax.integrations.nnx_program`, and the examples in ``examples/``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import OWNER, ROOT, load_manifest
from flax import nnx
from flax.training import train_state

from pol_jax import challenge, data, integrations, proof, recorder, store, training, verifier


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
  plan = proof.Plan(owner=OWNER, nonce=0, k=4, steps=12, batch_size=32, runner="loop")
  recorder.record(path, program, examples, plan, config={"example": "linen dict batches"})
  return path, program, examples


def test_a_linen_trainstate_step_with_dict_batches_records_and_verifies(user_proof):
  path, program, examples = user_proof
  verdict = verifier.verify(path, program, examples, challenge=challenge.All())
  assert verdict.accepted, verdict.table()
  batch = examples.batch(np.array([[0, 1]]))
  assert set(batch) == {"image", "label", "weight"} and batch["image"].shape == (1, 2, 8, 8, 1)


def test_every_field_of_an_example_is_in_its_digest(user_proof):
  path, program, examples = user_proof
  tree = jax.tree.map(np.copy, examples.tree)
  tree["weight"][int(np.asarray(verifier.proof.read_index_log(path, proof.read_manifest(path)))[0, 0])] += 1.0
  verdict = verifier.verify(path, program, data.Examples(examples.name, tree), challenge=challenge.All())
  assert [c.name for c in verdict.failed] == ["data"], verdict.table()


def test_a_grain_source_records_a_proof_that_the_dict_of_arrays_verifies_and_an_iterator_is_refused(tmp_path):
  import grain

  examples = digits_with_weights()
  rows = IndexedSource(examples)
  source = grain.MapDataset.source([rows[i] for i in range(len(rows))]).map(lambda ex: {**ex, "weight": ex["weight"]})
  loaded = data.from_source(examples.name, source)
  assert len(loaded) == len(examples) and np.array_equal(loaded.digests(), examples.digests())
  indices = np.array([[5, 0, len(examples) - 1], [3, 3, 2]])
  got, want = loaded.batch(indices), examples.batch(indices)
  assert set(got) == set(want) and all(np.array_equal(got[f], want[f]) and got[f].dtype == want[f].dtype for f in want)
  # Recorded from the Grain source, verified with the same examples as a dict of arrays: the same digests.
  plan = proof.Plan(owner=OWNER, nonce=1, k=4, steps=8, batch_size=32, runner="loop")
  recorder.record(str(tmp_path / "proof"), training.Program(create, train_step), loaded, plan, config={})
  verdict = verifier.verify(
    str(tmp_path / "proof"), training.Program(create, train_step), examples, challenge=challenge.All()
  )
  assert verdict.accepted, verdict.table()
  # A source whose examples change structure is named; an iterator is refused in one line.
  ragged = data.from_source("ragged", [{"x": np.zeros(2)}, {"x": np.zeros(2), "y": np.ones(1)}])
  with pytest.raises(ValueError, match="example 1 has another structure than example 0"):
    ragged.batch(np.array([0, 1]))
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
  plan = proof.Plan(owner=OWNER, nonce=0, k=3, steps=9, batch_size=32, runner="loop")
  path = str(tmp_path / "proof")
  manifest = recorder.record(path, program, train, plan, config={"example": "nnx rngs in the model"})
  assert any(d for p, d in store.read_meta(path, 9, None)["leaves"].items() if "key" in p)
  state = recorder.final_state(path, program, manifest)
  keys = [leaf for leaf in jax.tree.leaves(state) if training.is_key(leaf)]
  assert keys and all(str(k.dtype) == "key<fry>" for k in keys)
  verdict = verifier.verify(path, program, train, challenge=challenge.All())
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
  plan = proof.Plan(owner=OWNER, nonce=1, k=3, steps=6, batch_size=32, runner="loop")
  manifest = recorder.record(str(tmp_path / "proof"), program, train, plan, config={"example": "nnx tutorial"})
  assert verifier.verify(str(tmp_path / "proof"), program, train, challenge=challenge.All()).accepted
  _, _, metrics = program.objects(recorder.final_state(str(tmp_path / "proof"), program, manifest))
  assert 0.0 <= float(metrics.compute()["accuracy"]) <= 1.0 and float(metrics.compute()["loss"]) > 0


def test_a_step_that_does_not_fit_the_objects_says_the_signature_it_needs():
  from pol_jax import integrations

  def wrong(model, batch):
    return {}

  with pytest.raises(TypeError, match=r"train_step\(model, batch\) does not fit the 3 objects create returns"):
    integrations.nnx_program(tutorial_create, wrong)


def test_a_program_mismatch_names_the_first_differing_line(user_proof):
  import os

  from pol_jax import proof

  path, _, examples = user_proof
  assert "programs/segment.stablehlo.gz" in proof.read_manifest(path)["files"]
  assert os.path.getsize(os.path.join(path, "programs", "segment.stablehlo.gz")) < 200_000

  unclipped = jax.jit(functools.partial(_train_step, grad_scale=1.0001))  # the verifier's step differs

  # Not rebuilt from the recorded config (no builder): this verifier's program differs, so it cannot tell
  # a false proof from its own difference: undecided (exit 2), never rejected.
  verdict = verifier.verify(path, training.Program(create, unclipped), examples, challenge=challenge.All())
  program, replayed = verdict.checks[verifier.CHECKS.index("program")], verdict.checks[verifier.CHECKS.index("replay")]
  assert verdict.status == "undecided" and not verdict.failed, verdict.table()
  assert program.passed is None and "this verifier's segment program differs from the recorded one" in program.detail
  assert "first difference at line" in program.detail and "builder=None" in program.detail, program.detail
  assert replayed.passed is None and "does not show the proof false" in replayed.detail, replayed.detail
  assert proof.first_difference("x\ny", "x\ny\nz") == "the recorded program has 2 lines, the verifier's 3"

  # A step wrapped in one more jax.jit lowers to other text but computes the same bits: exact replay decides.
  rewrapped = jax.jit(lambda state, batch, key: train_step(state, batch, key))
  verdict = verifier.verify(path, training.Program(create, rewrapped), examples, challenge=challenge.All())
  program = verdict.checks[verifier.CHECKS.index("program")]
  assert verdict.accepted, verdict.table()
  assert "first difference at line" in program.detail and "reproduces every replayed state" in program.detail


# ------------------------------------------------------------------ the examples


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
  meta = store.read_meta(str(tmp_path / "proof"), 120, manifest["checkpoints"]["120"])
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
