"""pol_jax.data: datasets read by index, per-example digests and their Merkle root, digits and TFDS."""

from __future__ import annotations

import hashlib
import os

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import record
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.configs import cifar10_resnet20, cifar100_resnet50
from pol_jax import build, challenge, data, proof, verifier


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


@pytest.mark.parametrize("module", [cifar10_resnet20, cifar100_resnet50])
def test_tfds_path_records_and_verifies_on_mock_data_and_catches_a_changed_example(tmp_path, module):
  with tfds.testing.mock_data(num_examples=64):
    config = module.get_config("smoke")
    train = build.dataset(config, "train")
    assert train.name.startswith(f"tfds/{config.dataset}:") and train.name.endswith(":train")
    path = str(tmp_path / "proof")
    record(path, config)
    program, ours = build.rebuild(path)
    assert verifier.verify(path, program, ours, challenge=challenge.All()).accepted
    used = int(np.load(os.path.join(path, proof.INDICES))[0, 0])
    inputs = ours.inputs.copy()
    inputs[used, 0, 0, 0] ^= 1
    verdict = verifier.verify(path, program, data.Dataset(ours.name, inputs, ours.labels), challenge=challenge.All())
  assert [c.name for c in verdict.failed] == ["data"], verdict.table()


def test_a_tfds_data_source_is_read_by_index_in_its_own_structure():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.from_source("mnist:train (mock)", tfds.data_source("mnist", split="train"))
    batch = source.batch(np.array([[0, 19], [7, 7]]))
    assert len(source) == 20 and set(batch) == {"image", "label"}
    assert batch["image"].shape == (2, 2, 28, 28, 1) and batch["image"].dtype == np.uint8
    assert np.array_equal(batch["image"][1, 0], batch["image"][1, 1]) and not np.array_equal(
      batch["image"][0, 0], batch["image"][0, 1]
    )
    tree = {
      "image": np.stack([source.source[i]["image"] for i in range(20)]),
      "label": np.array([source.source[i]["label"] for i in range(20)]),
    }
    assert np.array_equal(source.digests(), data.Examples("same", tree).digests())
