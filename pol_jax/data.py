"""Index-addressable datasets, per-example digests and their Merkle root.

A proof commits to its training data through a SHA-256 digest of every example
(the Merkle leaves) and a Merkle root over them. The digest covers the stored
bytes of the whole example, its dtype and shape, and its label, so any change
to any value of an example changes its digest (the official PoL code hashed
``str(array)``, which covers 108 of 3072 values of a CIFAR image).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

DIGEST_SIZE = 32
_EXAMPLE_TAG = b"pol-jax/example/v1\x00"
_LEAF_TAG = b"\x00"
_NODE_TAG = b"\x01"


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Examples addressable by index.

  Attributes:
    name: an identifier recorded in the proof, e.g. ``"sklearn/digits:train"``.
    inputs: ``[N, ...]`` array, stored as the source gives it (uint8 images).
    labels: ``[N]`` int32 labels.
  """

  name: str
  inputs: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if len(self.inputs) != len(self.labels):
      raise ValueError(f"Expected as many labels as inputs, got {len(self.labels)} != {len(self.inputs)}.")

  def __len__(self) -> int:
    return len(self.inputs)

  def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The examples at ``indices`` (any shape), as ``(inputs, labels)``."""
    return self.inputs[indices], self.labels[indices]

  def digest(self, index: int) -> bytes:
    """SHA-256 of example ``index``: its bytes, dtype, shape and label."""
    return example_digest(self.inputs[index], self.labels[index])

  def digests(self, indices: np.ndarray | None = None) -> np.ndarray:
    """``uint8 [n, 32]`` digests of the examples at ``indices`` (all by default)."""
    return _digests(self, indices)


class Examples:
  """Examples as a pytree of ``[N, ...]`` arrays, delivered to the step in that structure.

  A dict of arrays (``{"image": ..., "label": ..., "mask": ...}``), a tuple, or
  any nesting of them: ``batch(indices)`` gives the same structure with the
  leading axis replaced by ``indices``' shape, so a step written for dict
  batches gets dict batches. Each example's digest covers every field: its
  path, dtype, shape and bytes (:func:`tree_digest`).

  >>> ds = Examples("toy", {"x": np.arange(6.0).reshape(3, 2), "y": np.array([0, 1, 1])})
  >>> sorted(ds.batch(np.array([[2, 0]])))
  ['x', 'y']
  >>> ds.batch(np.array([[2, 0]]))["y"].tolist()
  [[1, 0]]
  """

  def __init__(self, name: str, tree):
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
      raise ValueError(f"Examples {name!r}: expected a pytree of arrays, got no arrays.")
    arrays = [np.asarray(leaf) for _, leaf in leaves]
    bad = [jax.tree_util.keystr(p) for (p, _), a in zip(leaves, arrays, strict=True) if a.dtype.kind not in "biuf"]
    if bad:
      raise ValueError(f"Examples {name!r}: field {bad[0]} is not numeric; encode it as numbers first.")
    sizes = {len(a) if a.ndim else None for a in arrays}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(f"Examples {name!r}: every field needs the same leading length, got {sorted(map(str, sizes))}.")
    self.name = name
    self.tree = jax.tree.unflatten(jax.tree.structure(tree), arrays)
    self._paths = [jax.tree_util.keystr(p) for p, _ in leaves]
    self._arrays = arrays

  def __len__(self) -> int:
    return len(self._arrays[0])

  def batch(self, indices: np.ndarray):
    """The examples at ``indices`` (any shape), in the examples' own structure."""
    import jax

    return jax.tree.map(lambda a: a[indices], self.tree)

  def digest(self, index: int) -> bytes:
    """SHA-256 of example ``index``: every field's path, dtype, shape and bytes."""
    return tree_digest(self._paths, [a[index] for a in self._arrays])

  def digests(self, indices: np.ndarray | None = None) -> np.ndarray:
    """``uint8 [n, 32]`` digests of the examples at ``indices`` (all by default)."""
    return _digests(self, indices)


class Source:
  """An index-addressable source, read on demand: only the examples a batch or a digest needs.

  ``source`` has ``__len__`` and ``__getitem__(i)`` returning one example (a
  dict, tuple or array pytree): a Grain ``MapDataset`` or data source, a
  ``tfds.data_source``, a Hugging Face ``datasets.Dataset`` with numeric
  columns (``.with_format("numpy")``), a list. ``batch(indices)`` stacks the
  examples field by field in the source's own structure; each digest is the
  one :class:`Examples` gives the same example (every field's path, dtype,
  shape and bytes). Nothing is held in memory but the example being read, so
  the source may be larger than memory; recording reads every example once
  for its digest, a verifier only the examples its segments use.

  The index order stays pol-jax's (a permutation the committed seed derives,
  which the verifier recomputes), not a data loader's sampler: a sampler's
  algorithm may change between its versions, and the data order check must
  not.
  """

  def __init__(self, name: str, source):
    import jax

    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
      raise TypeError(
        f"{type(source).__name__} is not index-addressable: pass a source with __len__ and __getitem__(i) "
        "(a Grain MapDataset, tfds.data_source, a datasets.Dataset, a list, or data.Examples of a dict of "
        "arrays), not an iterator: a proof names every step's examples by index"
      )
    self.name, self.source, self._size = name, source, len(source)
    if not self._size:
      raise ValueError(f"Examples {name!r}: the source is empty.")
    leaves, self._structure = jax.tree_util.tree_flatten_with_path(source[0])
    self._paths = [jax.tree_util.keystr(p) for p, _ in leaves]
    if not leaves:
      raise ValueError(f"Examples {name!r}: example 0 holds no arrays.")

  def __len__(self) -> int:
    return self._size

  def example(self, index: int) -> list[np.ndarray]:
    """The fields of example ``index``, in the order of the first example's."""
    import jax

    leaves, structure = jax.tree.flatten(self.source[index])
    if structure != self._structure:
      raise ValueError(f"Examples {self.name!r}: example {index} has another structure than example 0: {structure}")
    arrays = [np.asarray(leaf) for leaf in leaves]
    bad = [p for p, a in zip(self._paths, arrays, strict=True) if a.dtype.kind not in "biuf"]
    if bad:
      raise ValueError(f"Examples {self.name!r}: field {bad[0]} of example {index} is not numeric.")
    return arrays

  def batch(self, indices: np.ndarray):
    """The examples at ``indices`` (any shape), in the source's own structure."""
    import jax

    indices = np.asarray(indices)
    rows = [self.example(int(i)) for i in indices.ravel()] or [[a[:0] for a in self.example(0)]]
    fields = [np.stack(column).reshape(indices.shape + column[0].shape) for column in zip(*rows, strict=True)]
    return jax.tree.unflatten(self._structure, fields)

  def digest(self, index: int) -> bytes:
    """SHA-256 of example ``index``: every field's path, dtype, shape and bytes."""
    return tree_digest(self._paths, self.example(index))

  def digests(self, indices: np.ndarray | None = None) -> np.ndarray:
    """``uint8 [n, 32]`` digests of the examples at ``indices`` (all by default)."""
    return _digests(self, indices)


def from_source(name: str, source) -> Source:
  """The examples of an index-addressable ``source``, read on demand (see :class:`Source`).

  Raises:
    TypeError: ``source`` cannot be indexed (a generator or an iterator: a
      proof must name each step's examples by index).
  """
  return Source(name, source)


def tree_digest(paths: list[str], arrays: list[np.ndarray]) -> bytes:
  """The digest of one example given as named fields (domain-separated, canonical encoding)."""
  h = hashlib.sha256(b"pol-jax/example-tree/v1\x00")
  for path, a in zip(paths, arrays, strict=True):
    a = np.asarray(a)
    h.update(f"{len(path)}:{path}{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.digest()


def _digests(dataset, indices: np.ndarray | None) -> np.ndarray:
  indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
  out = np.empty((len(indices), DIGEST_SIZE), np.uint8)
  for row, i in enumerate(indices):
    out[row] = np.frombuffer(dataset.digest(int(i)), np.uint8)
  return out


def example_digest(x: np.ndarray, y: np.ndarray) -> bytes:
  """The digest of one example (domain-separated, canonical encoding)."""
  h = hashlib.sha256(_EXAMPLE_TAG)
  for a in (np.asarray(x), np.asarray(y)):
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.digest()


def merkle_root(leaves: np.ndarray) -> str:
  """RFC 6962 Merkle tree hash over ``uint8 [N, 32]`` leaves, as hex.

  Leaves and inner nodes are domain-separated (0x00 / 0x01 prefixes), so no
  inner node can be passed off as a leaf.

  >>> merkle_root(np.zeros((1, 32), np.uint8))[:16]
  '7f9c9e31ac8256ca'
  """
  level = [hashlib.sha256(_LEAF_TAG + bytes(row)).digest() for row in np.asarray(leaves, np.uint8)]
  if not level:
    return hashlib.sha256(b"").hexdigest()
  while len(level) > 1:
    # Pairing left to right and promoting an odd last node gives the same
    # tree as RFC 6962's split at the largest power of two.
    nxt = [hashlib.sha256(_NODE_TAG + a + b).digest() for a, b in zip(level[0::2], level[1::2], strict=False)]
    if len(level) % 2:
      nxt.append(level[-1])
    level = nxt
  return level[0].hex()


def load_digits(split: str = "train") -> Dataset:
  """scikit-learn's digits (1797 real 8x8 images, 17 grey levels), offline.

  ``train`` is the first 1437 examples and ``test`` the last 360: the split is
  by position, fixed, and drawn from no random number generator.
  """
  from sklearn import datasets

  if split not in ("train", "test"):
    raise ValueError(f"Expected split 'train' or 'test', got {split!r}.")
  bunch = datasets.load_digits()
  inputs = bunch.images.astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  cut = 1437
  part = slice(0, cut) if split == "train" else slice(cut, None)
  return Dataset(f"sklearn/digits:{split}", inputs[part], labels[part])


class DataUnavailable(Exception):
  """A dataset is not installed or prepared here; the message says how to get it."""


TFDS_DATASETS = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10}


def load_tfds(name: str, split: str = "train", data_dir: str | None = None) -> Dataset:
  """A TFDS dataset read by index through ``tfds.data_source`` (ArrayRecord, no TensorFlow).

  The whole split is read into memory once (CIFAR-10's training split is 150 MB);
  digests are then taken over each example's stored pixel bytes and label.
  The name recorded in a proof is ``tfds/<name>:<version>:<split>``.

  Raises:
    DataUnavailable: tensorflow-datasets is not installed, or the dataset is
      not prepared in ``data_dir``; nothing is downloaded.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataUnavailable("tensorflow-datasets is not installed: pip install 'pol-jax[tfds]'") from None
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises several kinds for data that is not there.
    where = data_dir or "~/tensorflow_datasets"
    raise DataUnavailable(
      f"TFDS dataset {name!r} (split {split!r}) is not prepared in {where} ({type(e).__name__}); on a machine with "
      f"internet run: pip install tensorflow tensorflow-datasets && tfds build {name} --data_dir={where} "
      "--file_format=array_record, then copy that directory here and pass its path as data_dir (or set TFDS_DATA_DIR)"
    ) from None
  version = tfds.builder(name, data_dir=data_dir).info.version
  records = [source[i] for i in range(len(source))]
  inputs = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  labels = np.asarray([int(r["label"]) for r in records], np.int32)
  return Dataset(f"tfds/{name}:{version}:{split}", inputs, labels)
