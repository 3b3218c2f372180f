"""Digests, Merkle root, data order, challenges, distances, proof files."""

from __future__ import annotations

import hashlib
import os

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pol_jax import challenge, data, distances, fingerprint, proof, sampling, training


def _reference_root(leaves: list[bytes]) -> bytes:
  """RFC 6962's recursive definition, written independently of data.merkle_root."""
  if len(leaves) == 1:
    return hashlib.sha256(b"\x00" + leaves[0]).digest()
  k = 1 << ((len(leaves) - 1).bit_length() - 1)
  return hashlib.sha256(b"\x01" + _reference_root(leaves[:k]) + _reference_root(leaves[k:])).digest()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 33])
def test_merkle_root_is_rfc6962(n):
  leaves = np.stack([np.frombuffer(hashlib.sha256(bytes([i])).digest(), np.uint8) for i in range(n)])
  assert data.merkle_root(leaves) == _reference_root([bytes(row) for row in leaves]).hex()


def test_merkle_root_changes_with_any_leaf_and_with_order():
  leaves = np.arange(5 * 32, dtype=np.uint8).reshape(5, 32)
  root = data.merkle_root(leaves)
  for i in range(5):
    changed = leaves.copy()
    changed[i, 7] ^= 1
    assert data.merkle_root(changed) != root
  assert data.merkle_root(leaves[[1, 0, 2, 3, 4]]) != root


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint8, (8, 8, 1)), st.integers(0, 63), st.integers(1, 255))
def test_example_digest_covers_every_value(image, position, delta):
  changed = image.copy()
  changed.reshape(-1)[position] ^= np.uint8(delta)
  assert data.example_digest(image, np.int32(3)) != data.example_digest(changed, np.int32(3))
  assert data.example_digest(image, np.int32(3)) != data.example_digest(image, np.int32(4))


def test_digits_split_is_fixed_and_real():
  train, test = data.load_digits("train"), data.load_digits("test")
  assert (len(train), len(test)) == (1437, 360)
  assert train.inputs.dtype == np.uint8 and train.inputs.max() == 16
  assert set(np.unique(train.labels)) == set(range(10))
  assert data.merkle_root(train.digests()) == data.merkle_root(data.load_digits("train").digests())


def test_index_log_is_the_seed_order_epoch_by_epoch():
  order = training.derive_keys(0).order
  log = sampling.index_log(order, 100, 32, 9)  # 3 steps per epoch, 3 epochs
  assert log.shape == (9, 32) and log.dtype == np.int32
  for epoch in range(3):
    used = log[3 * epoch : 3 * epoch + 3].ravel()
    assert len(set(used)) == 96, "an epoch draws without replacement"
  assert not np.array_equal(log[:3], log[3:6]), "each epoch has its own permutation"
  np.testing.assert_array_equal(sampling.index_log(order, 100, 32, 9, start=4), log[4:])
  assert not np.array_equal(sampling.index_log(training.derive_keys(1).order, 100, 32, 9), log)


def test_keys_are_fold_ins_of_one_seed():
  keys = training.derive_keys(7)
  root = jax.random.key(7)
  for i, key in enumerate(keys):
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.fold_in(root, i)))


def test_fiat_shamir_is_a_deterministic_distinct_draw_from_the_root():
  a = challenge.fiat_shamir(50, 8, "ab" * 32)
  assert a == challenge.fiat_shamir(50, 8, "ab" * 32)
  assert len(set(a)) == 8 and all(0 <= i < 50 for i in a)
  assert a != challenge.fiat_shamir(50, 8, "ac" * 32)
  assert challenge.fiat_shamir(5, 99, "00" * 32) == [0, 1, 2, 3, 4]
  counts = np.bincount(sum((challenge.fiat_shamir(10, 1, f"{r:064x}") for r in range(2000)), []), minlength=10)
  assert counts.min() > 140, counts  # roughly uniform: 200 expected per segment


def test_top_q_takes_the_largest_updates_per_epoch_united_over_metrics():
  sizes = {"l2": np.array([1.0, 5.0, 2.0, 9.0, 3.0, 1.0]), "linf": np.array([7.0, 1.0, 1.0, 1.0, 1.0, 8.0])}
  epochs = np.array([0, 0, 0, 1, 1, 1])
  assert challenge.top_q(sizes, epochs, 1) == [0, 1, 3, 5]


def test_distances_are_correct_including_cosine():
  a = {"w": np.array([3.0, 4.0]), "i": np.array([1], np.int32)}
  b = {"w": np.array([4.0, 3.0]), "i": np.array([9], np.int32)}
  d = distances.distances(a, b)
  assert d == pytest.approx({"l1": 2.0, "l2": np.sqrt(2.0), "linf": 1.0, "cosine": 1 - 24 / 25})
  assert distances.distances(a, a) == {"l1": 0.0, "l2": 0.0, "linf": 0.0, "cosine": 0.0}


def test_leaf_digest_binds_path_dtype_shape_and_bytes():
  x = np.arange(6, dtype=np.float32)
  base = proof.leaf_digest("params/w", x)
  assert base != proof.leaf_digest("params/v", x)
  assert base != proof.leaf_digest("params/w", x.reshape(2, 3))
  assert base != proof.leaf_digest("params/w", x.view(np.int32))
  y = x.copy()
  y[5] = np.nextafter(y[5], np.float32(10))
  assert base != proof.leaf_digest("params/w", y)


def test_read_npy_checks_the_header_before_reading(tmp_path):
  path = str(tmp_path / "a.npy")
  np.save(path, np.zeros((4, 3), np.int32))
  np.testing.assert_array_equal(proof.read_npy(path, "a.npy", (4, 3), np.dtype("<i4")), np.zeros((4, 3)))
  with pytest.raises(proof.IntegrityError, match=r"declares int32\[4, 3\], the manifest says int32\[40, 3\]"):
    proof.read_npy(path, "a.npy", (40, 3), np.dtype("<i4"))
  np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(proof.IntegrityError, match="declares object"):
    proof.read_npy(path, "a.npy", (1,), np.dtype("<i4"))


def test_paths_outside_the_proof_directory_are_refused(tmp_path):
  (tmp_path / "proof" / "checkpoints").mkdir(parents=True)
  os.symlink("/etc", tmp_path / "proof" / "checkpoints" / "4")
  with pytest.raises(proof.ProofError, match="resolves outside the proof directory"):
    proof.inside(str(tmp_path / "proof"), "checkpoints", "4", "meta")
  with pytest.raises(proof.ProofError, match="outside"):
    proof.inside(str(tmp_path / "proof"), "..", "x")


@pytest.mark.parametrize(
  "edit, words",
  [
    (lambda b: b.pop("seed"), "seed: missing"),
    (lambda b: b.update(k=True), "k: expected an integer"),
    (lambda b: b.update(steps=2**40), "steps: 1099511627776 is outside"),
    (lambda b: b.update(batch_size=4096), "batch_size: 4096 is larger than the dataset"),
    (lambda b: b.update(runner="eager"), "runner: expected 'scan' or 'loop'"),
    (lambda b: b["dataset"].update(merkle_root="xyz"), "dataset.merkle_root: expected 64 lowercase hex digits"),
    (lambda b: b["checkpoints"].pop("4"), "checkpoints: expected steps 0, k, 2k, ..., T; missing ['4']"),
  ],
)
def test_manifest_fields_are_validated_and_named(honest, edit, words):
  import json

  with open(os.path.join(honest, proof.MANIFEST)) as f:
    manifest = json.load(f)
  body = {k: v for k, v in manifest.items() if k != "root"}
  edit(body)
  with pytest.raises(proof.ProofError, match=f"manifest.json: {words}".replace("[", r"\[").replace("(", r"\(")):
    proof.validate_manifest(proof.seal(body))


def test_environment_fingerprint_ignores_the_forced_device_count():
  flags = "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=true"
  assert fingerprint.numeric_xla_flags(flags) == "--xla_cpu_enable_fast_math=true"
  env = fingerprint.environment()
  assert set(env) == set(fingerprint.EXACT_FIELDS) | set(fingerprint.INFO_FIELDS)
  assert "device_count" in fingerprint.INFO_FIELDS and "device_count" not in fingerprint.EXACT_FIELDS
  assert fingerprint.mismatches(env, {**env, "device_count": 8}) == []
  assert fingerprint.mismatches(env, {**env, "cpu_threads": 64}) == [("cpu_threads", env["cpu_threads"], 64)]


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


def test_deterministic_gpu_flags_and_the_cpu_speed_flags_are_added_once():
  from experiments import cli

  assert cli.deterministic_xla_flags("--xla_foo=1", has_cuda=False) == "--xla_foo=1"
  flags = cli.deterministic_xla_flags("--xla_foo=1", has_cuda=True)
  assert flags == "--xla_foo=1 --xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0"
  assert cli.deterministic_xla_flags(flags, has_cuda=True) == flags
  assert "--xla_gpu_autotune_level=2" in cli.deterministic_xla_flags("--xla_gpu_autotune_level=2", True)
  speed = fingerprint.CPU_SPEED_FLAGS
  assert cli.deterministic_xla_flags("", False, speed=speed) == " ".join(speed)
  assert cli.deterministic_xla_flags("--xla_cpu_experimental_ynn_fusion_type=", False, speed=speed).count("ynn") == 1
  assert all(f.split("=")[0] in fingerprint.REPRODUCIBLE_FLAGS for f in speed)  # a verifier sets them again


def test_state_fingerprint_names_the_changed_leaf_and_is_the_same_in_both_passes(monkeypatch):
  state = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((), jnp.int32), "k": jax.random.key(1), "c": jnp.ones(4)}
  one_pass = np.asarray(training.state_fingerprint(state))
  monkeypatch.setattr(training, "_ONE_PASS_WORDS", 0)
  per_leaf = np.asarray(training.state_fingerprint(state))
  np.testing.assert_array_equal(one_pass, per_leaf)
  changed = {**state, "c": state["c"].at[2].set(np.nextafter(np.float32(1), np.float32(2)))}
  differs = np.asarray(training.state_fingerprint(changed)) != per_leaf
  assert differs.tolist() == [False, False, True, False], differs  # leaves in tree order: a, b, c, k


def test_the_fused_batchnorm_computes_nnx_batchnorms_values_gradients_and_statistics():
  from flax import nnx

  from pol_jax.models._norm import BatchNorm

  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 12)) * 3 + 1
  w = jax.random.normal(jax.random.key(1), x.shape)
  ours, ref = BatchNorm(12, momentum=0.9, rngs=nnx.Rngs(0)), nnx.BatchNorm(12, momentum=0.9, rngs=nnx.Rngs(0))
  assert [p for p, _ in nnx.state(ours).flat_state()] == [p for p, _ in nnx.state(ref).flat_state()]  # same leaves

  def loss(module, x):
    y = module(x)
    return (y * w).sum() + (y**2).sum()

  grads = {}
  for name, module in (("ours", ours), ("ref", ref)):
    module.train()
    grads[name] = nnx.grad(loss, argnums=(0, 1))(module, x)
  (gm, gx), (rm, rx) = grads["ours"], grads["ref"]
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5 * float(jnp.abs(rx).max()))
  np.testing.assert_allclose(gm.scale[...], rm.scale[...], rtol=1e-5)
  np.testing.assert_allclose(gm.bias[...], rm.bias[...], rtol=1e-5)
  np.testing.assert_allclose(ours.mean[...], ref.mean[...], rtol=1e-6)
  np.testing.assert_allclose(ours.var[...], ref.var[...], rtol=1e-6)
  ours.eval(), ref.eval()
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6, atol=1e-6)
