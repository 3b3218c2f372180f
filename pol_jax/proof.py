"""The proof on disk: layout, digests, manifest; the recorded states themselves are :mod:`pol_jax.store`'s.

A proof is a directory::

  proof/
    run.json            what the run committed to at its start (resume checks it)
    checkpoints/<b>/    the recorded states, batched Orbax checkpoints named by
                        the last step they hold (:mod:`pol_jax.store`); a
                        state's meta is its step, the SHA-256 of every state
                        leaf and its segment metrics
    indices.npy         int32 [T, B] index log (read with allow_pickle=False)
    data_digests.npy    uint8 [N, 32] per-example SHA-256, the Merkle leaves
    programs/           the lowered text of every program the run executes
    manifest.json       written last, atomically: everything above by digest
                        (``checkpoints``: the digest of every state's meta),
                        ``files``, the size and SHA-256 of every other file,
                        and ``root``, the SHA-256 of the canonical manifest body

Two kinds of failure are told apart. :class:`ProofError` means the input is
unusable (no manifest, a manifest that does not parse or validate, another
schema): the CLI exits 2. :class:`IntegrityError` means a well-formed proof
whose content contradicts its own digests: a failed check, exit 1. Nothing
from a proof is used before its digest is checked, no path outside the proof
directory is opened, and declared sizes are bounded before anything is
allocated. Files are read through :mod:`pol_jax.safeio`: a symbolic link, a
FIFO or a device anywhere in a proof is refused, never followed or opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from pol_jax import numerics, safeio, training

SCHEMA = "pol-jax/proof/v4"
MANIFEST = "manifest.json"
RUN = "run.json"
CHECKPOINTS = "checkpoints"
INDICES = "indices.npy"
DATA_DIGESTS = "data_digests.npy"

MAX_JSON_BYTES = 64 << 20
MAX_STEPS = 1 << 31
MAX_INDEX_ENTRIES = 1 << 31
MAX_EXAMPLES = 1 << 31
MAX_CHECKPOINTS = 1 << 20
MAX_LEAF_BYTES = 16 << 30
MAX_FILES = 1 << 20
MAX_FILE_BYTES = 1 << 40

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


MAX_MESSAGE = 1000
"""Errors and check details are clipped to this many characters: they may quote a proof's (hostile) values."""


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
  """``text`` cut to ``limit`` characters, saying how long it was.

  >>> clip("x" * 2000, 20)
  'xxxxxxxxxxxxxxxxxxxx... (clipped, 2000 characters)'
  """
  return text if len(text) <= limit else f"{text[:limit]}... (clipped, {len(text)} characters)"


class ProofError(Exception):
  """Unusable input: names the file and the field (CLI exit status 2)."""

  def __init__(self, file: str, field: str, message: str):
    super().__init__(clip(f"{file}: {field}: {message}"))
    self.file, self.field = file, field


class IntegrityError(Exception):
  """A proof's content contradicts its digests (a failed check, exit 1)."""


# ----------------------------------------------------------------------------
# Digests


def canonical_json(obj: Any) -> bytes:
  """The one byte encoding of a JSON value that digests are taken over."""
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def digest_json(obj: Any) -> str:
  return hashlib.sha256(canonical_json(obj)).hexdigest()


SEED_DOMAIN = b"pol-jax/seed/v1\x00"


def bound_seed(public_key: str, nonce: int) -> int:
  """The seed of a proof bound to the Ed25519 ``public_key`` (hex): 63 bits of SHA-256(domain, key, nonce).

  Every key of the run derives from this seed (its init, data order and
  per-step randomness), so the recorded states can only be reproduced under
  this key: another key gives another seed and another training. The binding
  is as strong as a 63-bit second preimage (JAX's threefry key holds 64 bits).

  >>> bound_seed("00" * 32, 0) == bound_seed("00" * 32, 0) != bound_seed("00" * 32, 1)
  True
  """
  if not (isinstance(public_key, str) and _HEX64.match(public_key)):
    raise ValueError(f"Expected an Ed25519 public key as 64 lowercase hex digits, got {public_key!r:.80}.")
  if isinstance(nonce, bool) or not isinstance(nonce, int) or not 0 <= nonce < 2**63:
    raise ValueError(f"Expected 0 <= nonce < 2**63, got nonce={nonce!r:.40}.")
  digest = hashlib.sha256(SEED_DOMAIN + bytes.fromhex(public_key) + nonce.to_bytes(8, "big")).digest()
  return int.from_bytes(digest[:8], "big") >> 1


def _key_name(entry) -> str:
  attr = _KEY_ATTRS.get(type(entry))
  if attr is not None:
    return str(getattr(entry, attr))
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


_KEY_ATTRS = {
  jax.tree_util.DictKey: "key",
  jax.tree_util.GetAttrKey: "name",
  jax.tree_util.SequenceKey: "idx",
  jax.tree_util.FlattenedIndexKey: "key",
}


def flatten(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  """``(path components, leaf)`` for every leaf, in tree order.

  NNX's ``.value`` attribute is dropped from paths, so a parameter reads
  ``params/hidden/0/kernel``.
  """
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = tuple(_key_name(e) for e in path)
    if len(names) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
      names = names[:-1]
    out.append((names, leaf))
  return out


def path_str(names: Iterable[str]) -> str:
  return "/".join(names)


def leaf_digest(path: str, array: np.ndarray) -> str:
  """SHA-256 of a leaf's tree path, dtype, shape and bytes.

  A typed PRNG key array is digested as its key data, under its key dtype
  (``key<fry>`` for threefry), so the implementation is part of the digest.
  """
  if training.is_key(array):
    dtype, shape, array = str(array.dtype), array.shape, stored(array)
  else:
    array = np.asarray(array)
    dtype, shape = array.dtype.str, array.shape
  h = hashlib.sha256(f"{path}\x00{dtype}\x00{shape}\x00".encode())
  contiguous = np.ascontiguousarray(array)
  h.update(contiguous.reshape(-1).view(np.uint8) if contiguous.size else b"")  # its bytes, not copied
  return h.hexdigest()


def stored(leaf: Any) -> np.ndarray:
  """The array a checkpoint stores for a state leaf: its key data for a typed PRNG key, else itself."""
  return np.asarray(jax.random.key_data(leaf)) if training.is_key(leaf) else np.asarray(leaf)


def leaf_digests(tree: Any) -> dict[str, str]:
  """``{path: digest}`` over every leaf of a host pytree."""
  return {path_str(n): leaf_digest(path_str(n), leaf) for n, leaf in flatten(tree)}


def checkpoint_steps(k: int, num_steps: int) -> list[int]:
  """The steps a proof records: 0, k, 2k, ... and ``num_steps``."""
  return sorted(set(range(0, num_steps, k)) | {num_steps})


# ----------------------------------------------------------------------------
# Files


def inside(proof_dir: str, *parts: str) -> str:
  """``proof_dir/parts``, refusing anything that resolves outside ``proof_dir``."""
  base = os.path.realpath(proof_dir)
  path = os.path.realpath(os.path.join(base, *parts))
  if path != base and not path.startswith(base + os.sep):
    raise ProofError(path_str(parts), "path", f"resolves outside the proof directory ({path})")
  return path


def size_bytes(proof_dir: str) -> int:
  """Bytes on disk of every file under ``proof_dir``."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(proof_dir) for f in files)


def list_files(proof_dir: str) -> dict[str, int]:
  """``{relative path: size}`` of every file of the proof but its manifest; nothing is followed.

  Raises:
    ProofError: a symbolic link, FIFO, device or socket anywhere in the proof
      (named), or too many entries.
  """
  try:
    files = safeio.walk(proof_dir, max_entries=MAX_FILES)
  except safeio.Refused as e:
    raise ProofError(e.file, e.field, e.reason) from None
  files.pop(MANIFEST, None)
  return files


def file_listing(proof_dir: str, exclude: Iterable[str] = (RUN,)) -> dict[str, dict]:
  """The manifest's ``files``: ``{path: {"size", "sha256"}}`` of every file but the manifest and ``exclude``."""
  return {
    path: {"size": size, "sha256": safeio.file_digest(os.path.join(proof_dir, path), size, path)}
    for path, size in list_files(proof_dir).items()
    if path not in exclude
  }


def check_files(proof_dir: str, manifest: dict) -> None:
  """Checks that the proof holds exactly the files its validated manifest lists, byte for byte.

  Walks the proof without following anything, then compares the set of paths,
  then the sizes, then the SHA-256 of every file. Once it returns, every file
  Orbax or TensorStore may open is a regular file whose bytes the root covers.

  Raises:
    ProofError: a symbolic link, FIFO or device in the proof.
    IntegrityError: an unlisted, missing, resized or changed file, named.
  """
  listed, found = manifest["files"], list_files(proof_dir)
  extra = sorted(set(found) - set(listed))
  if extra:
    raise IntegrityError(_file_message(extra[0], f"is not in the manifest's file listing ({len(extra)} unlisted)"))
  missing = sorted(set(listed) - set(found))
  if missing:
    raise IntegrityError(_file_message(missing[0], f"is listed in the manifest but missing ({len(missing)} missing)"))
  for path, size in found.items():
    if size != listed[path]["size"]:
      raise IntegrityError(_file_message(path, f"has {size} bytes, the manifest lists {listed[path]['size']}"))
  for path, size in found.items():
    try:
      digest = safeio.file_digest(os.path.join(proof_dir, path), size, path)
    except safeio.Refused as e:
      raise IntegrityError(_file_message(path, e.reason)) from None
    if digest != listed[path]["sha256"]:
      raise IntegrityError(_file_message(path, "does not match its SHA-256 in the manifest"))


def _file_message(path: str, what: str) -> str:
  parts = path.split("/")
  if len(parts) > 2 and parts[0] == CHECKPOINTS:
    return f"checkpoint batch {parts[1]}: {path} {what}"
  return f"{path}: {what}"


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to a temporary name, fsyncs it, renames it into place."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fsync_directory(os.path.dirname(path) or ".")


def fsync_directory(path: str) -> None:
  """Makes a rename or a new entry in directory ``path`` durable."""
  fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_npy_atomic(path: str, array: np.ndarray) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    np.save(f, array, allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str, label: str) -> Any:
  """Reads a JSON file of bounded size, strictly; any failure is a ProofError on ``label``.

  The file is opened without following a link or blocking on a FIFO, and
  parsed by ``safeio.loads_json`` (bounded depth and integers, finite
  numbers, no duplicate keys).
  """
  try:
    return safeio.loads_json(safeio.read_bytes(path, MAX_JSON_BYTES, label), label)
  except safeio.Refused as e:
    raise ProofError(e.file, e.field, e.reason) from None


def read_npy(path: str, label: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """Reads a .npy whose header must declare exactly ``shape`` and ``dtype``.

  The header is checked before the array is allocated; pickled objects are
  refused.
  """
  try:
    with safeio.open_regular(path, label) as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        header = np.lib.format.read_array_header_1_0(f)
      elif version in ((2, 0), (3, 0)):
        header = np.lib.format.read_array_header_2_0(f)
      else:
        raise ValueError(f"unsupported .npy version {version}")
      got_shape, fortran, got_dtype = header
      if tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype) or fortran:
        raise IntegrityError(
          f"{label}: declares {got_dtype}{list(got_shape)}, the manifest says {np.dtype(dtype)}{list(shape)}"
        )
      count = math.prod(shape)
      remaining = os.fstat(f.fileno()).st_size - f.tell()
      if remaining != count * np.dtype(dtype).itemsize:  # Before a buffer of the declared size is allocated.
        raise IntegrityError(f"{label}: {remaining} data bytes, expected {count * np.dtype(dtype).itemsize}")
      data = f.read(count * np.dtype(dtype).itemsize + 1)
  except safeio.Refused as e:
    raise IntegrityError(f"{label}: {e.reason}") from None
  except (OSError, ValueError) as e:
    raise IntegrityError(f"{label}: unreadable ({e})") from None
  if len(data) != count * np.dtype(dtype).itemsize:
    raise IntegrityError(f"{label}: {len(data)} data bytes, expected {count * np.dtype(dtype).itemsize}")
  return np.frombuffer(data, dtype).reshape(shape)


PROGRAMS = "programs"
MAX_PROGRAM_BYTES = 64 << 20


def write_program(proof_dir: str, name: str, text: str) -> None:
  """Stores a lowered program's text (gzip, no timestamp: the same bytes on every run) in ``programs/``."""
  import gzip

  os.makedirs(os.path.join(proof_dir, PROGRAMS), exist_ok=True)
  path = os.path.join(proof_dir, PROGRAMS, f"{name}.stablehlo.gz")
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(gzip.compress(text.encode(), mtime=0))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_program(proof_dir: str, name: str, expected_digest: str) -> str | None:
  """The recorded text of program ``name``, or None when absent, oversized or not the digested one.

  Bounded: at most :data:`MAX_PROGRAM_BYTES` read, and decompressed.
  """
  import zlib

  from pol_jax import safeio

  path = os.path.join(proof_dir, PROGRAMS, f"{name}.stablehlo.gz")
  try:
    packed = safeio.read_bytes(path, MAX_PROGRAM_BYTES, f"{PROGRAMS}/{name}.stablehlo.gz")
    inflate = zlib.decompressobj(wbits=31)
    raw = inflate.decompress(packed, MAX_PROGRAM_BYTES)
    if inflate.unconsumed_tail:
      return None
    text = raw.decode()
  except (safeio.Refused, OSError, zlib.error, UnicodeDecodeError):
    return None
  return text if hashlib.sha256(text.encode()).hexdigest() == expected_digest else None


def first_difference(recorded: str, ours: str) -> str:
  r"""Where two program texts first differ, as one line.

  >>> first_difference("a\nb\nc", "a\nx\nc")
  "line 2: recorded 'b', the verifier's 'x'"
  """
  a, b = recorded.splitlines(), ours.splitlines()
  for i, (x, y) in enumerate(zip(a, b, strict=False)):
    if x != y:
      return f"line {i + 1}: recorded {x.strip()[:160]!r}, the verifier's {y.strip()[:160]!r}"
  return f"the recorded program has {len(a)} lines, the verifier's {len(b)}"


# ----------------------------------------------------------------------------
# Manifest


def seal(body: dict) -> dict:
  """The manifest: ``body`` plus ``root``, the digest of its canonical form."""
  return {**body, "root": digest_json(body)}


def reseal(proof_dir: str, edit: Callable[[dict], None]) -> dict:
  """Edits the manifest body with ``edit(body)`` and recomputes the root: what a forger can do.

  For experiments and tests that play the forger (``experiments.forge``); a
  verifier never needs it.

  The ``files`` listing is re-hashed first (a forger who changed files can),
  so ``edit`` sees, and may still change, the listing of the files as they are.
  """
  manifest = read_json(os.path.join(proof_dir, MANIFEST), MANIFEST)
  body = {k: v for k, v in manifest.items() if k != "root"}
  if "files" in body:
    body["files"] = file_listing(proof_dir)
  edit(body)
  sealed = seal(body)
  write_json_atomic(os.path.join(proof_dir, MANIFEST), sealed)
  return sealed


def _field(obj: dict, name: str, kind, label: str = MANIFEST, prefix: str = ""):
  if name not in obj:
    raise ProofError(label, prefix + name, "missing")
  value = obj[name]
  if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
    raise ProofError(label, prefix + name, f"expected an integer, got {value!r:.60}")
  if kind is not int and not isinstance(value, kind):
    raise ProofError(label, prefix + name, f"expected {kind.__name__}, got {type(value).__name__}")
  return value


def _bounded(obj: dict, name: str, lo: int, hi: int, label: str = MANIFEST, prefix: str = "") -> int:
  value = _field(obj, name, int, label, prefix)
  if not lo <= value <= hi:
    raise ProofError(label, prefix + name, f"{value} is outside [{lo}, {hi}]")
  return value


def _hex(obj: dict, name: str, label: str = MANIFEST, prefix: str = "") -> str:
  value = _field(obj, name, str, label, prefix)
  if not _HEX64.match(value):
    raise ProofError(label, prefix + name, f"expected 64 lowercase hex digits, got {value!r:.80}")
  return value


_ENVIRONMENT_COUNTS = ("cpu_threads", "host_devices", "device_count", "process_count")
"""Environment fields that are counts (an integer, or null where the backend has none); x64 is a bool, the rest strings."""


def _check_environment(env: dict, label: str) -> None:
  """The environment's fields are of the types ``fingerprint.environment`` records: every check that reads one may trust it."""
  _field(env, "x64", bool, label, "environment.")
  for name, value in env.items():
    if name == "x64":
      continue
    if name in _ENVIRONMENT_COUNTS:
      ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1 << 20)
      what = "a count (an integer in [0, 2^20] or null)"
    else:
      ok = value is None or (isinstance(value, str) and len(value) <= 4096)
      what = "a string of at most 4096 characters or null"
    if not ok:
      raise ProofError(label, f"environment.{name}", f"expected {what}, got {value!r:.60}")


def validate_body(body: Any, label: str = MANIFEST) -> dict:
  """Checks the fields and bounds that a proof's body must have."""
  if not isinstance(body, dict):
    raise ProofError(label, "(top level)", f"expected a JSON object, got {type(body).__name__}")
  schema = _field(body, "schema", str, label)
  if schema != SCHEMA:
    raise ProofError(label, "schema", f"proof schema {schema!r:.60} is not supported (this pol-jax reads {SCHEMA!r})")
  _field(body, "config", dict, label)
  _bounded(body, "seed", 0, 2**63 - 1, label)
  owner = _field(body, "owner", dict, label)
  if sorted(owner) != ["nonce", "public_key"]:
    raise ProofError(label, "owner", f"expected the fields public_key and nonce, got {sorted(owner)!r:.80}")
  _hex(owner, "public_key", label, "owner.")
  _bounded(owner, "nonce", 0, 2**63 - 1, label, "owner.")
  steps = _bounded(body, "steps", 1, MAX_STEPS, label)
  k = _bounded(body, "k", 1, steps, label)
  if -(-steps // k) + 1 > MAX_CHECKPOINTS:
    raise ProofError(label, "k", f"steps / k = {-(-steps // k)} segments is over the {MAX_CHECKPOINTS} limit")
  batch = _bounded(body, "batch_size", 1, MAX_INDEX_ENTRIES, label)
  if steps * batch > MAX_INDEX_ENTRIES:
    raise ProofError(label, "steps", f"steps x batch_size = {steps * batch} is over the {MAX_INDEX_ENTRIES} limit")
  runner = _field(body, "runner", str, label)
  if runner not in ("scan", "loop"):
    raise ProofError(label, "runner", f"expected 'scan' or 'loop', got {runner!r:.40}")
  dataset = _field(body, "dataset", dict, label)
  _field(dataset, "name", str, label, "dataset.")
  size = _bounded(dataset, "size", 1, MAX_EXAMPLES, label, "dataset.")
  if batch > size:
    raise ProofError(label, "batch_size", f"{batch} is larger than the dataset ({size} examples)")
  _hex(dataset, "merkle_root", label, "dataset.")
  _check_environment(_field(body, "environment", dict, label), label)
  kind = _field(_field(body, "numerics", dict, label), "kind", str, label, "numerics.")
  if kind not in ("float32", "portable"):
    raise ProofError(label, "numerics.kind", f"expected 'float32' or 'portable', got {kind!r:.40}")
  if sorted(body["numerics"]) != ["kind", "protocol"]:
    raise ProofError(label, "numerics", f"expected the fields kind and protocol, got {sorted(body['numerics'])!r:.80}")
  expected = numerics.PROTOCOL if kind == "portable" else None
  if body["numerics"]["protocol"] != expected:
    raise ProofError(
      label,
      "numerics.protocol",
      f"{kind} protocol {body['numerics']['protocol']!r:.40} is not supported (this pol-jax reads {expected!r})",
    )
  programs = _field(body, "programs", dict, label)
  _hex(programs, "segment", label, "programs.")
  if "builder" in body:
    builder = _field(body, "builder", dict, label)
    if sorted(builder) != ["target", "version"]:
      raise ProofError(label, "builder", f"expected the fields target and version, got {sorted(builder)!r:.80}")
    target = _field(builder, "target", str, label, "builder.")
    if not _TARGET.match(target):
      raise ProofError(label, "builder.target", f"expected 'package.module:function', got {target!r:.80}")
    version = builder["version"]
    if version is not None and not (isinstance(version, str) and len(version) <= 64 and version.isprintable()):
      raise ProofError(label, "builder.version", f"expected a short version string or null, got {version!r:.40}")
  return body


def validate_manifest(manifest: Any) -> dict:
  """Validates a finished proof's manifest and its root; returns it."""
  body = validate_body(manifest)
  root = _hex(body, "root")
  rest = {k: v for k, v in body.items() if k != "root"}
  for name in ("indices", "data_digests"):
    _hex(_field(rest, name, dict), "sha256", MANIFEST, f"{name}.")
  checkpoints = _field(rest, "checkpoints", dict)
  expected = [str(s) for s in checkpoint_steps(rest["k"], rest["steps"])]
  if sorted(checkpoints, key=lambda s: (len(s), s)) != expected:
    missing = sorted(set(expected) - set(checkpoints), key=lambda s: (len(s), s))[:5]
    extra = sorted(set(checkpoints) - set(expected))[:5]
    raise ProofError(MANIFEST, "checkpoints", f"expected steps 0, k, 2k, ..., T; missing {missing}, unexpected {extra}")
  for step in checkpoints:
    _hex(checkpoints, step, MANIFEST, "checkpoints.")
  _validate_files(_field(rest, "files", dict), expected)
  if body["seed"] != bound_seed(body["owner"]["public_key"], body["owner"]["nonce"]):
    raise IntegrityError(
      f"{MANIFEST}: seed {body['seed']} is not the seed bound to owner.public_key and owner.nonce "
      "(a proof cannot be moved to another key)"
    )
  if digest_json(rest) != root:
    raise IntegrityError(
      f"{MANIFEST}: root {root[:16]}... is not the digest of the manifest body (edited after sealing)"
    )
  return manifest


def _validate_files(files: dict, steps: list[str]) -> None:
  """Checks the ``files`` listing: bounded, clean relative paths, sizes, digests, and the files a proof must have."""
  if len(files) > MAX_FILES:
    raise ProofError(MANIFEST, "files", f"{len(files)} entries is over the {MAX_FILES} limit")
  batches: dict[str, set] = {}
  step_names = set(steps)
  for path, entry in files.items():
    if not _clean_path(path):
      raise ProofError(MANIFEST, "files", f"{path!r:.80} is not a normalised relative path inside the proof")
    if not isinstance(entry, dict) or sorted(entry) != ["sha256", "size"]:
      raise ProofError(MANIFEST, f"files.{path}", "expected the fields size and sha256")
    _bounded(entry, "size", 0, MAX_FILE_BYTES, MANIFEST, f"files.{path}.")
    _hex(entry, "sha256", MANIFEST, f"files.{path}.")
    parts = path.split("/")
    if parts[0] == CHECKPOINTS:
      if len(parts) < 3 or parts[1] not in step_names:
        raise ProofError(MANIFEST, "files", f"{path!r:.80} is not in a batch {CHECKPOINTS}/<step>/")
      batches.setdefault(parts[1], set()).add(
        "state" if parts[2] == "state" and len(parts) > 3 else "/".join(parts[2:])
      )
  required = [INDICES, DATA_DIGESTS, f"{CHECKPOINTS}/{steps[-1]}/meta/metadata"]
  required += [f"{CHECKPOINTS}/{b}/meta/metadata" for b in sorted(batches, key=int)]
  missing = [p for p in dict.fromkeys(required) if p not in files]
  with_batch = dict.fromkeys([*sorted(batches, key=int), steps[-1]])
  missing += [f"{CHECKPOINTS}/{b}/state/" for b in with_batch if "state" not in batches.get(b, ())]
  if missing:
    raise ProofError(MANIFEST, "files", f"does not list {missing[0]} ({len(missing)} required entries missing)")


def _clean_path(path: str) -> bool:
  """A relative POSIX path of plain components: no ``..``, no leading ``/``, nothing empty."""
  parts = path.split("/")
  return (
    0 < len(path) <= 4096
    and path != MANIFEST
    and all(part not in ("", ".", "..") for part in parts)
    and not any(ord(c) < 32 or c in "\\\x7f" for c in path)
  )


def semantic_root(manifest: dict) -> str:
  """What a proof claims, as one digest: that of its manifest body without ``files`` and ``root``.

  ``root`` covers every byte of the proof, Orbax's bookkeeping files included,
  and those hold wall-clock timestamps and the path a checkpoint was first
  written to: two recordings of the same run, or a resumed and an
  uninterrupted recording, have different roots. Their semantic roots are
  equal: the same settings, environment, programs, and the same digests of
  every recorded state, of the index log and of the data. Compare runs by
  this; name a proof (commitments, Fiat-Shamir draws) by ``root``.

  >>> semantic_root({"k": 4, "files": {}, "root": "ab"}) == digest_json({"k": 4})
  True
  """
  return digest_json({k: v for k, v in manifest.items() if k not in ("files", "root")})


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run commits to besides its config.

  Attributes:
    owner: the Ed25519 public key (64 hex digits) the proof is bound to.
    nonce: the owner's choice of run (``config.seed``); with ``owner`` it
      derives :attr:`seed` (``bound_seed``).
    k: steps between recorded states.
    steps: T, the number of training steps.
    batch_size: B, examples per step.
    runner: "scan" (one compiled ``lax.scan`` per segment) or "loop" (a loop of
      one jitted step).
  """

  owner: str
  nonce: int
  k: int
  steps: int
  batch_size: int
  runner: str = "scan"

  def __post_init__(self):
    bound_seed(self.owner, self.nonce)  # validates both
    if self.steps < 1:
      raise ValueError(f"Expected steps >= 1, got steps={self.steps}.")
    if not 1 <= self.k <= self.steps:
      raise ValueError(f"Expected 1 <= k <= steps={self.steps}, got k={self.k}.")
    if self.batch_size < 1:
      raise ValueError(f"Expected batch_size >= 1, got batch_size={self.batch_size}.")
    if self.runner not in training.RUNNERS:
      raise ValueError(f"Expected runner in {training.RUNNERS}, got runner={self.runner!r}.")

  @property
  def seed(self) -> int:
    """The one seed every key derives from, bound to :attr:`owner`."""
    return bound_seed(self.owner, self.nonce)

  @classmethod
  def from_manifest(cls, manifest: dict) -> Plan:
    owner = manifest["owner"]
    return cls(
      owner["public_key"], owner["nonce"], manifest["k"], manifest["steps"], manifest["batch_size"], manifest["runner"]
    )


def segments(plan: Plan) -> list[tuple[int, int]]:
  """``(start, end)`` steps of every segment; the last may be shorter than k."""
  bounds = checkpoint_steps(plan.k, plan.steps)
  return list(zip(bounds[:-1], bounds[1:], strict=True))


def read_manifest(proof_dir: str) -> dict:
  """The manifest of a finished proof, parsed and field-checked (not its root).

  Raises:
    ProofError: the directory, the manifest or a field is unusable; a
      symbolic link, FIFO or device anywhere in the proof (nothing is followed
      or opened before the whole directory is walked).
  """
  if not os.path.isdir(proof_dir):
    raise ProofError(proof_dir, "directory", "not found (expected a proof directory holding manifest.json)")
  list_files(proof_dir)
  path = os.path.join(proof_dir, MANIFEST)
  if not os.path.exists(path) and os.path.exists(os.path.join(proof_dir, RUN)):
    raise ProofError(MANIFEST, "file", "missing: this is a partial proof (the recording did not finish)")
  return validate_body(read_json(path, MANIFEST))


def read_index_log(proof_dir: str, manifest: dict) -> np.ndarray:
  """The index log, checked against the (validated) manifest's shape and digest.

  Raises:
    IntegrityError: missing, malformed, or not the digested log.
  """
  shape = (manifest["steps"], manifest["batch_size"])
  log = read_npy(inside(proof_dir, INDICES), INDICES, shape, np.dtype("<i4"))
  if leaf_digest("indices", log) != manifest["indices"]["sha256"]:
    raise IntegrityError(f"{INDICES}: digest does not match the manifest")
  return log


def read_data_digests(proof_dir: str, manifest: dict) -> np.ndarray:
  """The per-example data digests, checked against the (validated) manifest's shape and digest.

  Raises:
    IntegrityError: missing, malformed, or not the digested array.
  """
  leaves = read_npy(inside(proof_dir, DATA_DIGESTS), DATA_DIGESTS, (manifest["dataset"]["size"], 32), np.uint8)
  if leaf_digest("data_digests", leaves) != manifest["data_digests"]["sha256"]:
    raise IntegrityError(f"{DATA_DIGESTS}: digest does not match the manifest")
  return leaves
