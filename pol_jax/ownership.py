"""Model ownership: proofs bound to keys, commitments, and settling who trained a model.

The paper's first application. A proof is bound to its owner's Ed25519 key:
its seed is derived from the owner's public key (``proof.bound_seed``), and
every recorded state follows from that seed, so a copied proof stays bound
to the original key, and so does a bit-identical re-run from the public
config: another key gives another seed, another initialisation and another
training. A prover publishes a small signed :func:`commit` record (the
proof's root, the digest of the final model, a time, an Ed25519 signature
by the proof's own key); in a dispute, :func:`settle` takes the disputed
model file (an Orbax checkpoint, safetensors or Flax msgpack) and any number
of claims, and reports for each whether its proof verifies (every segment
replayed), whether its final state is the disputed model (bit for bit, or
after a stated cast to the file's lower precision), where its initial state
comes from (its key's seed, another claimant's final state, the disputed
model) and what its commitment shows.

What a dispute establishes: that the holder of one key trained the model
(the proof bound to that key verifies from its seed and ends on the model).
Proofs and commitments can be copied, so a claimant is established only by
answering the arbitrator's fresh ``challenge`` with a commitment signed over
it, which only the key's holder can make; without a challenge the verdict
names the key and no claimant. Commitment
times are the signer's own claim: they are parsed as UTC instants (only
``Z`` times are accepted) and reported, but never decide anything; only a
trusted timestamp (an RFC 3161 authority) or a transparency log could order
two claims in time.

Model digests are computed from leaf digests (``proof.leaf_digest``: path,
dtype, shape and bytes of every parameter), so a commitment can be checked
against a proof's recorded final checkpoint without restoring it.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import stat
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from pol_jax import challenge, proof, safeio, store, training, verifier

SCHEMA = "pol-jax/commitment/v2"
TIME = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
MAX_CHALLENGE = 256
MAX_MODEL_BYTES = 4 << 30
MAX_COMMITMENT_BYTES = 64 << 10
MAX_MODEL_ARRAYS = 1 << 16
MAX_MODEL_FILES = 1 << 16
MAX_SAFETENSORS_HEADER = 100 << 20
EVERY_SEGMENT = challenge.All()
"""A dispute replays every segment of each claimant's proof (``challenge`` below is a dispute's text)."""
_SAFETENSORS_DTYPES = {
  "BOOL": np.bool_,
  "U8": np.uint8,
  "I8": np.int8,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "U16": np.uint16,
  "I16": np.int16,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "U32": np.uint32,
  "I32": np.int32,
  "F32": np.float32,
  "U64": np.uint64,
  "I64": np.int64,
  "F64": np.float64,
  "C64": np.complex64,
}
MODEL_PARTS = ("params", "model_state")


class DisputeError(Exception):
  """A claim or model that cannot be used, with the reason (reported, not raised past the dispute)."""


# ---------------------------------------------------------------- keys and commitments


def new_key(path: str) -> str:
  """Writes a new Ed25519 private key to ``path`` (PEM, mode 0600) and its public key to ``path.pub``; returns the public key hex."""
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ed25519

  if os.path.exists(path):
    raise DisputeError(f"{path}: a key is already there; it is never overwritten")
  key = ed25519.Ed25519PrivateKey.generate()
  pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
  public = _public_hex(key)
  for name, data, mode in ((path, pem, 0o600), (path + ".pub", (public + "\n").encode(), 0o644)):
    try:  # never through a planted link, never over an existing file
      fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
      raise DisputeError(f"{name}: already there; a key and its .pub are never overwritten") from None
    with os.fdopen(fd, "wb") as f:
      f.write(data)
  return public


def load_key(path: str):
  """The Ed25519 private key in ``path`` (PEM)."""
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ed25519

  try:
    data = safeio.read_bytes(path, 4096, path)  # no link followed, no FIFO opened, a PEM key's size at most
  except safeio.Refused as e:
    raise DisputeError(str(e)) from None
  try:
    key = serialization.load_pem_private_key(data, password=None)
  except (ValueError, TypeError) as e:
    raise DisputeError(f"{path}: not a readable PEM private key ({type(e).__name__})") from None
  if not isinstance(key, ed25519.Ed25519PrivateKey):
    raise DisputeError(f"{path}: not an Ed25519 key")
  return key


def ensure_key(path: str) -> tuple[str, bool]:
  """``(public key hex, created)`` of the Ed25519 key at ``path``, created (mode 0600) when missing.

  The public key is what a proof is bound to (``proof.Plan(owner=...)``);
  keep the private key: only it can commit to the proof or answer a dispute.
  """
  if os.path.lexists(path):
    return public_key_of(load_key(path)), False
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return new_key(path), True


def public_key_of(key) -> str:
  """The hex public key of an Ed25519 private key: what a proof is bound to (``config.owner``)."""
  return _public_hex(key)


def _public_hex(key) -> str:
  from cryptography.hazmat.primitives import serialization

  return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def final_leaves(proof_dir: str) -> dict[str, str]:
  """The leaf digests of the model parts of the proof's final checkpoint, checked against its manifest."""
  manifest = proof.read_manifest(proof_dir)
  step = int(manifest["steps"])
  try:
    meta = store.read_meta(proof_dir, step, manifest["checkpoints"].get(str(step)))
  except proof.IntegrityError as e:
    raise proof.ProofError(f"{proof.CHECKPOINTS}/{step}", "meta", str(e)) from None
  return {p: d for p, d in meta["leaves"].items() if p.split("/", 1)[0] in MODEL_PARTS}


def model_digest(leaves: dict[str, str]) -> str:
  """SHA-256 over the sorted ``{path: leaf digest}`` of a model: what a commitment names."""
  return proof.digest_json(dict(sorted(leaves.items())))


def commit(proof_dir: str, key, *, now: datetime.datetime | None = None, challenge: str | None = None) -> dict:
  """A signed commitment to the proof in ``proof_dir``: its root, its final model's digest, the time.

  ``key`` must be the proof's owner key (the one its seed is bound to).
  ``challenge``: an arbitrator's fresh text, answered to show that the signer
  holds the key now (a past commitment can be copied by anyone). The
  signature covers the canonical JSON of every other field.

  Raises:
    DisputeError: ``key`` is not the proof's owner key, or the challenge is unusable.
  """
  manifest = proof.read_manifest(proof_dir)
  proof.validate_manifest(manifest)
  owner = manifest["owner"]["public_key"]
  if _public_hex(key) != owner:
    raise DisputeError(
      f"{proof_dir}: the proof is bound to key {owner[:16]}..., not to this key ({_public_hex(key)[:16]}...): "
      "only the proof's owner can commit to it"
    )
  now = now or datetime.datetime.now(datetime.UTC)
  body = {
    "schema": SCHEMA,
    "proof_root": manifest["root"],
    "model_digest": model_digest(final_leaves(proof_dir)),
    "time": now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "public_key": _public_hex(key),
  }
  if challenge is not None:
    _check_challenge(challenge, "challenge")
    body["challenge"] = challenge
  return {**body, "signature": key.sign(proof.canonical_json(body)).hex()}


def _check_challenge(challenge, label: str) -> None:
  if not isinstance(challenge, str) or not 1 <= len(challenge) <= MAX_CHALLENGE or not challenge.isprintable():
    raise DisputeError(f"{label}: expected 1 to {MAX_CHALLENGE} printable characters")


def read_commitment(path: str) -> dict:
  """A commitment record, size- and field-checked (not its signature).

  Read without following a link or blocking on a FIFO, at most
  :data:`MAX_COMMITMENT_BYTES`, as strict JSON (``safeio.loads_json``).
  """
  try:
    record = safeio.loads_json(safeio.read_bytes(path, MAX_COMMITMENT_BYTES, path), path)
  except safeio.Refused as e:
    raise DisputeError(f"{path}: not found" if e.reason == "missing" else str(e)) from None
  if not isinstance(record, dict) or record.get("schema") != SCHEMA:
    raise DisputeError(f"{path}: schema: expected {SCHEMA!r}")
  allowed = {"schema", "proof_root", "model_digest", "public_key", "signature", "time", "challenge"}
  if set(record) - allowed:
    raise DisputeError(f"{path}: unexpected fields {sorted(set(record) - allowed)[:3]}")
  for name in ("proof_root", "model_digest", "public_key", "signature", "time"):
    if not isinstance(record.get(name), str):
      raise DisputeError(f"{path}: {name}: missing or not a string")
  if "challenge" in record:
    _check_challenge(record["challenge"], f"{path}: challenge")
  try:
    _time(record)
  except ValueError:
    raise DisputeError(f"{path}: time: expected a UTC time YYYY-MM-DDTHH:MM:SSZ, got {record['time']!r:.40}") from None
  return record


def _time(record: dict) -> datetime.datetime:
  """The record's time as a UTC instant; only ``Z`` times (no offsets) are accepted."""
  if not TIME.match(record["time"]):
    raise ValueError("not a Z time")
  return datetime.datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def check_signature(record: dict) -> str | None:
  """Why the record's Ed25519 signature does not verify, or None."""
  from cryptography.exceptions import InvalidSignature
  from cryptography.hazmat.primitives.asymmetric import ed25519

  body = {k: v for k, v in record.items() if k != "signature"}
  try:
    public = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(record["public_key"]))
    public.verify(bytes.fromhex(record["signature"]), proof.canonical_json(body))
  except (ValueError, InvalidSignature):
    return "the signature does not verify with the record's public key"
  return None


# ---------------------------------------------------------------- model files


def export_safetensors(state: Any, path: str) -> None:
  """Writes a state's model parts (``params``, ``model_state``) as safetensors, keys ``params/...``."""
  from safetensors.numpy import save_file

  save_file(_model_arrays(state), path)


def export_msgpack(state: Any, path: str) -> None:
  """Writes a state's model parts as Flax msgpack (``flax.serialization.msgpack_serialize``)."""
  from flax import serialization

  nested: dict = {}
  for p, array in _model_arrays(state).items():
    node = nested
    *parents, leaf = p.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = array
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(nested))


def _model_arrays(state: Any) -> dict[str, np.ndarray]:
  """The model's arrays: ``params`` and ``model_state``, without PRNG keys (random state, not weights)."""
  return {
    proof.path_str(names): np.ascontiguousarray(np.asarray(leaf))
    for part in MODEL_PARTS
    for names, leaf in proof.flatten({part: getattr(state, part)})
    if not training.is_key(leaf)
  }


def load_model(path: str) -> tuple[str, dict[str, np.ndarray]]:
  """``(format, {path: array})`` of a model file: safetensors, Flax msgpack, or an Orbax checkpoint directory.

  An Orbax directory may also be a proof (its final state) or a recorded
  state of one, ``proof/checkpoints/<step>``: the state at that step, read
  from the batch that holds it (since ``pol-jax/proof/v4`` a directory
  ``checkpoints/<b>`` holds a batch of states, the last at step b).

  Keys are ``/``-separated (``.`` in safetensors keys is accepted too). The
  model is hostile input: a link, FIFO or device (anywhere in an Orbax
  directory) is refused, a file is read once through a no-follow descriptor
  and at most :data:`MAX_MODEL_BYTES`, and the sizes an Orbax or safetensors
  header declares are checked against that bound before anything is
  allocated.

  Raises:
    DisputeError: the model is missing, refused or unreadable (one line).
  """
  recorded = _recorded_state(path)
  if recorded is not None:
    return "orbax", _load_recorded(*recorded)
  try:
    mode = os.lstat(path).st_mode
  except OSError as e:
    raise DisputeError(f"{path}: not found" if isinstance(e, FileNotFoundError) else f"{path}: {e.strerror}") from None
  if stat.S_ISDIR(mode):
    return "orbax", _load_orbax(_state_dir(path))
  try:
    data = safeio.read_bytes(path, MAX_MODEL_BYTES, path)
  except safeio.Refused as e:
    raise DisputeError(str(e)) from None
  head = int.from_bytes(data[:8], "little") if len(data) >= 8 else None
  try:
    if path.endswith(".safetensors") or (head is not None and head < len(data)):
      try:
        return "safetensors", _load_safetensors(data, path)
      except DisputeError:
        if path.endswith(".safetensors"):
          raise
    return "msgpack", _load_msgpack(data, path)
  except DisputeError:
    raise
  except Exception as e:  # the parsers raise many kinds on a damaged file
    raise DisputeError(f"{path}: unreadable model file ({type(e).__name__})") from None


def _recorded_state(path: str) -> tuple[str, int] | None:
  """``(batch directory, step)`` of a model given as a proof (its final state) or ``proof/checkpoints/<step>``.

  None for any other path.
  """
  parent, name = os.path.split(os.path.normpath(path))
  if os.path.lexists(os.path.join(path, proof.MANIFEST)):
    proof_dir, step = path, None
  elif (
    os.path.basename(parent) == proof.CHECKPOINTS
    and name.isascii()
    and name.isdigit()
    and os.path.lexists(os.path.join(os.path.dirname(parent), proof.MANIFEST))
  ):
    proof_dir, step = os.path.dirname(parent), int(name)
  else:
    return None
  try:  # the proof's layout is its schema's: an older one is named, not misread
    manifest = proof.read_manifest(proof_dir)
  except proof.ProofError as e:
    raise DisputeError(f"{path}: in a proof directory, but {e}") from None
  step = int(manifest["steps"]) if step is None else step
  try:
    batch = store.batch_of(step, store.batches(proof_dir))
  except (proof.IntegrityError, proof.ProofError) as e:
    raise DisputeError(f"{path}: {e}") from None
  if batch is None:
    raise DisputeError(
      f"{path}: no recorded state at step {step} (checkpoints/<b> holds the batch of states up to step b; "
      "give the proof directory for its final state)"
    )
  return os.path.join(proof_dir, proof.CHECKPOINTS, str(batch)), step


def _load_recorded(batch_dir: str, step: int) -> dict[str, np.ndarray]:
  """The state at ``step`` in a proof's batch directory, split by the batch's layout once its sizes are bounded."""
  try:
    files = safeio.walk(batch_dir, max_entries=MAX_MODEL_FILES)
    for name in ("meta/metadata", "state/_METADATA", "_CHECKPOINT_METADATA"):  # strict JSON before Orbax parses
      if name in files:
        safeio.loads_json(safeio.read_bytes(os.path.join(batch_dir, name), proof.MAX_JSON_BYTES, name), name)
  except safeio.Refused as e:
    raise DisputeError(f"{batch_dir}: {e}") from None
  label = f"{batch_dir} (the state at step {step})"
  try:
    meta = store.read_batch_meta(os.path.dirname(os.path.dirname(batch_dir)), int(os.path.basename(batch_dir)))
    if str(step) not in meta["states"]:
      raise proof.IntegrityError(f"holds no state at step {step}")
    import orbax.checkpoint as ocp

    state_dir = os.path.join(batch_dir, "state")
    tree = ocp.PyTreeCheckpointer().metadata(os.path.abspath(state_dir)).item_metadata.tree
    if not isinstance(tree, dict):
      raise proof.IntegrityError("holds no stored buffers")
    _check_declared(tree, label)  # the whole batch is read: its arrays are bounded
    if any(len(getattr(m, "shape", ()) or ()) != 2 for m in tree.values()):
      raise proof.IntegrityError("a stored buffer is not [states, elements]")
    per_state = {d: int(m.shape[1]) for d, m in tree.items()}
    buffers = store.stored_buffers(state_dir, store.batch_rows(meta), [step], per_state, label)[step]
    return store.unpack_layout(meta["layout"], buffers, label, MAX_MODEL_ARRAYS)
  except DisputeError:
    raise
  except proof.IntegrityError as e:
    raise DisputeError(f"{label}: {e}") from None
  except Exception as e:  # Orbax raises many kinds on a damaged directory
    raise DisputeError(f"{label}: not a readable Orbax checkpoint ({type(e).__name__})") from None


def _state_dir(path: str) -> str:
  """The Orbax directory of a model: a checkpoint's ``state`` item, or the directory itself."""
  if safeio.is_real_dir(os.path.join(path, "state")) and safeio.is_real_dir(os.path.join(path, "meta")):
    return os.path.join(path, "state")
  return path


def _load_safetensors(data: bytes, path: str) -> dict[str, np.ndarray]:
  from safetensors import deserialize

  _check_safetensors(data, path)
  try:
    views = deserialize(data)
  except Exception as e:
    raise DisputeError(f"{path}: not a safetensors file ({type(e).__name__})") from None
  return _by_path(
    ((name.replace(".", "/"), np.frombuffer(v["data"], _SAFETENSORS_DTYPES[v["dtype"]]).reshape(v["shape"]))
     for name, v in views),
    path,
  )  # fmt: skip


def _by_path(pairs, path: str) -> dict[str, np.ndarray]:
  """``{path: array}``, refusing a file in which two arrays name one path.

  A loader that kept one of them would compare other arrays than a program
  reading the file does (``params.w`` beside ``params/w`` in safetensors, a
  key ``"convs/0/kernel"`` beside the nested ``convs/0/kernel`` in msgpack).
  """
  out: dict[str, np.ndarray] = {}
  for name, array in pairs:
    if name in out:
      raise DisputeError(f"{path}: two arrays name {name!r:.80} (with / and . as separators alike); refused")
    out[name] = array
  return out


def _check_safetensors(data: bytes, path: str) -> None:
  """Checks the header's declared sizes against the data before the library allocates anything."""
  n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
  if not 0 <= n <= min(len(data) - 8, MAX_SAFETENSORS_HEADER):
    raise DisputeError(f"{path}: not a safetensors file (header length {n} of a {len(data)}-byte file)")
  try:
    header = safeio.loads_json(data[8 : 8 + n], path)
  except safeio.Refused as e:
    raise DisputeError(f"{path}: not a safetensors file (header: {e.reason})") from None
  if not isinstance(header, dict) or len(header) > MAX_MODEL_ARRAYS + 1:
    raise DisputeError(f"{path}: not a safetensors file (the header is not an object of at most {MAX_MODEL_ARRAYS})")
  spans = sorted(_safetensors_span(name, entry, path) for name, entry in header.items() if name != "__metadata__")
  end = 0
  for begin, stop in spans:
    if begin != end:
      raise DisputeError(f"{path}: safetensors arrays do not tile the data (a gap or overlap at byte {begin})")
    end = stop
  if end != len(data) - 8 - n:
    raise DisputeError(f"{path}: safetensors arrays declare {end} data bytes, the file holds {len(data) - 8 - n}")


def _safetensors_span(name: str, entry: Any, path: str) -> tuple[int, int]:
  """``(begin, end)`` of one array's bytes, checked: its shape times its dtype's size."""
  where = f"{path}: safetensors array {name!r:.60}"
  dtype = entry.get("dtype") if isinstance(entry, dict) else None
  if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
    raise DisputeError(f"{where}: expected a known dtype, shape and data_offsets")
  shape, offsets = entry.get("shape"), entry.get("data_offsets")
  if not (isinstance(shape, list) and len(shape) <= 32 and all(_natural(d) for d in shape)):
    raise DisputeError(f"{where}: shape {shape!r:.60} is not a list of non-negative integers")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
    raise DisputeError(f"{where}: data_offsets {offsets!r:.60} is not two non-negative integers")
  nbytes = math.prod(shape) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
  if offsets[1] - offsets[0] != nbytes:
    raise DisputeError(f"{where}: shape {shape} of {dtype} is {nbytes} bytes, data_offsets span {offsets}")
  return offsets[0], offsets[1]


def _natural(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _load_msgpack(data: bytes, path: str) -> dict[str, np.ndarray]:
  """A Flax msgpack file (``flax.serialization.msgpack_restore``'s format), unpacked under bounds.

  At most :data:`MAX_MODEL_ARRAYS` map entries and arrays in all, counted as
  they are unpacked (a 62 MB file of three million scalars took 2.5 GB); no
  msgpack list longer than a shape (Flax writes sequences as maps); a map
  key is a string without ``/`` that appears once in its map.
  """
  import msgpack
  from flax import serialization

  count = [0]

  def counted(n: int) -> None:
    count[0] += n
    if count[0] > 2 * MAX_MODEL_ARRAYS:
      raise DisputeError(f"{path}: over {MAX_MODEL_ARRAYS} arrays in the msgpack tree")

  def ext(code, payload):
    counted(1)
    return serialization._msgpack_ext_unpack(code, payload)

  def pairs(items):
    counted(len(items))
    keys = [k for k, _ in items]
    if not all(isinstance(k, str) and "/" not in k for k in keys) or len(set(keys)) != len(keys):
      raise DisputeError(f"{path}: a msgpack map whose keys are not distinct strings without '/'")
    return dict(items)

  try:
    tree = msgpack.unpackb(
      data, ext_hook=ext, object_pairs_hook=pairs, raw=False, strict_map_key=False, max_array_len=64
    )
    tree = serialization._unchunk_array_leaves_in_place(tree)
  except DisputeError:
    raise
  except Exception as e:  # msgpack and NumPy raise many kinds on a damaged file
    raise DisputeError(f"{path}: not a Flax msgpack file ({type(e).__name__})") from None
  if not isinstance(tree, dict):
    raise DisputeError(f"{path}: a msgpack file, but not a tree of arrays")
  return _by_path(((proof.path_str(names), np.asarray(leaf)) for names, leaf in proof.flatten(tree)), path)


def _load_orbax(path: str) -> dict[str, np.ndarray]:
  """Restores an Orbax checkpoint directory once its files and declared arrays are within bounds."""
  import orbax.checkpoint as ocp

  try:
    files = safeio.walk(path, max_entries=MAX_MODEL_FILES)
  except safeio.Refused as e:
    raise DisputeError(f"{path}: {e}") from None
  if sum(files.values()) > MAX_MODEL_BYTES:
    raise DisputeError(f"{path}: {sum(files.values())} bytes of files, over the {MAX_MODEL_BYTES}-byte limit")
  for name in ("_METADATA", "_CHECKPOINT_METADATA"):  # strict JSON before Orbax parses them
    if name in files:
      try:
        safeio.loads_json(safeio.read_bytes(os.path.join(path, name), proof.MAX_JSON_BYTES, name), name)
      except safeio.Refused as e:
        raise DisputeError(f"{path}: {e}") from None
  try:
    metadata = ocp.PyTreeCheckpointer().metadata(os.path.abspath(path))
    declared = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
  except Exception as e:
    raise DisputeError(f"{path}: not a readable Orbax checkpoint ({type(e).__name__})") from None
  _check_declared(declared, path)
  try:
    tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
  except Exception as e:
    raise DisputeError(f"{path}: not a readable Orbax checkpoint ({type(e).__name__})") from None
  return _by_path(((proof.path_str(names), np.asarray(leaf)) for names, leaf in proof.flatten(tree)), path)


def _check_declared(declared: Any, path: str) -> None:
  """Refuses an Orbax tree whose declared arrays, or their storage chunks, exceed :data:`MAX_MODEL_BYTES` in all.

  TensorStore allocates a whole chunk to read one, and a chunk may be larger
  than its array: the chunks count, not just the shapes (four arrays of 2x3
  in chunks of 30000x30000 took 7 GB).
  """
  leaves = proof.flatten(declared)
  if len(leaves) > MAX_MODEL_ARRAYS:
    raise DisputeError(f"{path}: {len(leaves)} arrays, over the {MAX_MODEL_ARRAYS} limit")
  total = 0
  for names, leaf in leaves:
    try:
      itemsize = np.dtype(getattr(leaf, "dtype", None) or "V1").itemsize
      shape = tuple(int(d) for d in getattr(leaf, "shape", ()) or ())
      chunk = getattr(getattr(leaf, "storage", None), "chunk_shape", None) or shape
      chunk_bytes = math.prod(int(d) for d in chunk) * itemsize
    except (TypeError, ValueError):
      raise DisputeError(f"{path}: {proof.path_str(names)} declares no usable shape and dtype") from None
    total += max(math.prod(shape) * itemsize, chunk_bytes)
    if total > MAX_MODEL_BYTES or min(shape, default=0) < 0 or min(chunk, default=1) < 1:
      raise DisputeError(
        f"{path}: {proof.path_str(names)} declares shape {shape} in chunks {tuple(chunk)} of {itemsize}-byte items; "
        f"the arrays and their chunks would exceed the {MAX_MODEL_BYTES}-byte limit"
      )


_EXPORT_DTYPES = ("bfloat16", "float16")
"""What ``experiments.export --dtype`` casts to: the only casts a model file may be "equal after"."""


def _lower_precision(theirs, mine) -> bool:
  """A float array stored in a narrower float export dtype (a cast to bool or int8 would match almost anything)."""
  return (
    np.issubdtype(mine, np.floating)
    and np.dtype(theirs).name in _EXPORT_DTYPES
    and np.dtype(theirs).itemsize < np.dtype(mine).itemsize
  )


def compare(model: dict[str, np.ndarray], state: Any) -> tuple[str, str]:
  """How a model file relates to a state: ``("equal" | "equal-after-cast" | "different" | "mismatch", detail)``.

  The file may hold the parameters alone or also the model state (BatchNorm
  statistics); either way every array it holds is compared. ``mismatch``: its
  arrays are not the state's (names or shapes differ).
  """
  ours = _model_arrays(state)
  tops = {k.split("/", 1)[0] for k in model}
  if "params" in tops:  # a whole training state (an Orbax checkpoint of one): its model parts only
    model = {k: v for k, v in model.items() if k.split("/", 1)[0] in MODEL_PARTS}
  else:  # a file of bare parameters
    ours = {k.split("/", 1)[1]: v for k, v in ours.items() if k.startswith("params/")}
  missing = sorted(set(ours) - set(model))
  extra = sorted(set(model) - set(ours))
  if extra or (missing and any(not m.startswith("model_state/") for m in missing)):
    return "mismatch", f"arrays differ from the proof's: missing {missing[:3]}, unexpected {extra[:3]}"
  casts, differ = set(), []
  for name, theirs in model.items():
    mine = ours[name]
    if theirs.shape != mine.shape:
      return "mismatch", f"{name} has shape {theirs.shape}, the proof's {mine.shape}"
    if theirs.dtype == mine.dtype:
      if not np.array_equal(theirs, mine) or theirs.tobytes() != mine.tobytes():
        differ.append(name)
    elif _lower_precision(theirs.dtype, mine.dtype):
      casts.add(str(theirs.dtype))
      if mine.astype(theirs.dtype).tobytes() != theirs.tobytes():
        differ.append(name)
    else:
      return "mismatch", f"{name} is {theirs.dtype}, the proof's {mine.dtype}"
  if differ:
    return "different", f"{len(differ)} of {len(model)} arrays differ, first {differ[0]}"
  if casts:
    return (
      "equal-after-cast",
      f"equal after casting the proof's float32 to {', '.join(sorted(casts))} (the file's precision)",
    )
  return "equal", f"all {len(model)} arrays equal bit for bit"


# ---------------------------------------------------------------- the dispute


@dataclasses.dataclass
class Claim:
  name: str
  proof_dir: str
  commitment: str | None = None


@dataclasses.dataclass
class Finding:
  """What the dispute found about one claimant."""

  name: str
  usable: bool = True
  reason: str = ""
  verified: bool | None = None
  verdict: str = ""
  failed_checks: list[str] = dataclasses.field(default_factory=list)
  model: str = ""
  model_detail: str = ""
  origin: str = ""
  """``seed`` or ``derived from NAME's final state`` / ``derived from the disputed model`` / ``unknown``."""
  root: str | None = None
  owner: str | None = None
  """The public key the proof is bound to."""
  training: str | None = None
  """Digest of the proof's checkpoint digests: equal for copies of one training, whatever their root."""
  commitment: str = "none"
  committed_at: str | None = None
  established: bool = False
  note: str = ""


TIMES_DECIDE_NOTHING = (
  "commitment times are self-claimed and decide nothing (a trusted timestamp, RFC 3161, or a transparency log "
  "would order them)"
)


def settle(
  model_path: str,
  claims: list[Claim],
  rebuild: Callable[[str], tuple[training.Program, Any]],
  *,
  challenge: str | None = None,
  builder: str | None = None,
) -> tuple[list[Finding], str, int]:
  """Settles who trained the model at ``model_path``; returns ``(findings, verdict line, exit status)``.

  Every claimant's proof is replayed whole. The key established is the one
  whose proof verifies from the seed bound to it and ends on the model; with
  ``challenge``, the claimant established is the one who presents it with a
  commitment answering the challenge (only the key's holder can sign one);
  without, no claimant is (proofs and commitments can be copied). Times
  decide nothing.

  ``rebuild(proof_dir)`` gives the program and training data a claimant's
  proof describes (``pol_jax.build.rebuild``); ``builder`` is passed to
  ``verify.verify`` (worker processes reproduce a proof's thread count and
  flags). Exit status: 0 when the key is established (and, with
  ``challenge``, one claimant), 1 when not, 2 when the model itself is unusable. A claim that cannot be used is reported
  for that claimant.
  """
  if challenge is not None:
    try:
      _check_challenge(challenge, "challenge")
    except DisputeError as e:
      return [], str(e), 2
  try:
    fmt, model = load_model(model_path)
  except DisputeError as e:
    return [], f"unusable model: {e}", 2
  findings, finals, starts = [], {}, {}
  for claim in claims:
    f = Finding(claim.name)
    findings.append(f)
    try:
      _examine(claim, f, model, fmt, rebuild, finals, starts, builder, challenge)
    except (DisputeError, proof.ProofError, proof.IntegrityError) as e:
      f.usable, f.reason = False, str(e)
  _trace_origins(findings, starts, finals, model)
  _mark_twins(findings)
  line, status = _decide(findings, challenge)
  return findings, line, status


def _trace_origins(findings: list[Finding], starts: dict, finals: dict, model: Any) -> None:
  """Where each initial state that is not its key's seed's comes from: another claimant's model, the disputed one."""
  for f in findings:
    if not f.usable or f.name not in starts or f.origin == "seed":
      continue
    sources = [
      g.name for g in findings if g.name != f.name and g.name in finals and _same(starts[f.name], finals[g.name])
    ]
    if sources:
      f.origin = f"derived from {sources[0]}'s final state"
    elif compare(model, starts[f.name])[0] in ("equal", "equal-after-cast"):
      f.origin = "derived from the disputed model"
    else:
      f.origin = "unknown (neither the seed's initialisation nor another claimant's model)"


def _mark_twins(findings: list[Finding]) -> None:
  """Notes the claimants that present the same training: copies are recognised by checkpoint digests, not root."""
  for f in findings:
    twins = [g.name for g in findings if g is not f and g.usable and f.usable and g.training == f.training]
    if twins:
      f.note = f"the same training as {', '.join(twins)} (identical checkpoint digests)"


def _decide(findings: list[Finding], challenge: str | None) -> tuple[str, int]:
  """The verdict line and exit status: the key whose proof ends on the model, and which claimant holds it.

  A proof and a commitment can both be copied, so only a signature over this
  dispute's fresh ``challenge`` shows that a claimant holds the key: without
  one the verdict establishes the key and names no claimant (a thief who
  presented a copy of the owner's proof and commitment, the owner absent or
  without a commitment, had been named).
  """
  candidates = [f for f in findings if f.usable and f.verified and f.origin == "seed" and f.model.startswith("equal")]
  keys = sorted({f.owner for f in candidates})
  if not keys:
    return "NOT ESTABLISHED: no claimant has a verifying proof from its key's seed that ends on the model", 1
  if len(keys) > 1:
    names = ", ".join(f.name for f in candidates)
    return f"NOT ESTABLISHED: proofs bound to {len(keys)} different keys end on the disputed model ({names})", 1
  key = keys[0]
  presenting = [f for f in candidates if f.owner == key]
  how = "bit for bit" if presenting[0].model == "equal" else "after a cast to the file's precision"
  trained = f"key {key[:16]}... trained the disputed model: its proof verifies from the key's seed and ends on it {how}"
  if challenge is None:
    verb = "presents" if len(presenting) == 1 else "present"
    return (
      f"ESTABLISHED: {trained}; {_and(f.name for f in presenting)} {verb} it, which does not show who holds the key "
      "(proofs and commitments can be copied): to name the holder, settle again with a fresh challenge=TEXT that each "
      f"claimant signs with ownership.commit(..., challenge=TEXT); {TIMES_DECIDE_NOTHING}",
      0,
    )
  standing = [f for f in presenting if f.commitment == "valid"]  # _examine checked that it answers the challenge
  names = ", ".join(f.name for f in presenting)
  if not standing:
    return f"NOT ESTABLISHED as a claimant: {trained}, but none of {names} answered this dispute's challenge", 1
  if len(standing) > 1:
    return (
      f"NOT ESTABLISHED as a claimant: {trained}; {_and(f.name for f in standing)} all answered this dispute's "
      "challenge with the key (they share it)",
      1,
    )
  (w,) = standing
  w.established = True
  others = [f.name for f in presenting if f is not w]
  verb = "presents" if len(others) == 1 else "present"
  tail = f"; {_and(others)} {verb} the same key's proof with no answer to the challenge" if others else ""
  return f"ESTABLISHED: {w.name} (signed this dispute's challenge): {trained}{tail}; {TIMES_DECIDE_NOTHING}", 0


def _and(names) -> str:
  names = list(names)
  return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def _same(a: Any, b: Any) -> bool:
  x, y = _model_arrays(a), _model_arrays(b)
  x = {k: v for k, v in x.items() if k.startswith("params/")}
  y = {k: v for k, v in y.items() if k.startswith("params/")}
  return x.keys() == y.keys() and all(x[k].shape == y[k].shape and x[k].tobytes() == y[k].tobytes() for k in x)


def _examine(claim, f, model, fmt, rebuild, finals, starts, builder=None, challenge=None) -> None:
  from pol_jax import recorder

  if not os.path.isdir(claim.proof_dir):
    raise DisputeError(f"{claim.proof_dir}: no such proof directory")
  manifest = proof.read_manifest(claim.proof_dir)
  f.root = manifest.get("root")
  f.owner = manifest["owner"]["public_key"]
  f.training = proof.digest_json(manifest.get("checkpoints"))
  if claim.commitment:
    f.commitment, f.committed_at = _judge_commitment(claim, f, challenge)
  elif challenge is not None:
    f.commitment = "none: no answer to this dispute's challenge"
  program, train = rebuild(claim.proof_dir)
  verdict = verifier.verify(claim.proof_dir, program, train, challenge=EVERY_SEGMENT, builder=builder)
  f.verified = verdict.accepted
  f.failed_checks = [c.name for c in verdict.failed]
  f.verdict = verdict.summary()
  if "integrity" in f.failed_checks:  # nothing more is read from a proof that fails its own digests
    f.origin, f.model, f.model_detail = "unknown (the proof fails integrity)", "unchecked", "the proof fails integrity"
    return
  template = training.to_host(program.init(training.derive_keys(manifest["seed"]).init))
  start, _ = store.restore(claim.proof_dir, 0, template, manifest["checkpoints"].get("0"))
  starts[claim.name] = start
  f.origin = "seed" if "init" not in f.failed_checks and "integrity" not in f.failed_checks else ""
  final = recorder.final_state(claim.proof_dir, program, manifest)
  finals[claim.name] = final
  f.model, f.model_detail = compare(model, final)
  if f.model == "mismatch":
    f.model_detail = f"the model's shapes do not match the proof's: {f.model_detail}"
  f.model_detail += f" ({fmt})"


def _judge_commitment(claim, f: Finding, challenge: str | None) -> tuple[str, str | None]:
  """``(status, time)`` of a claimant's commitment: "valid" or why not."""
  try:
    record = read_commitment(claim.commitment)
  except DisputeError as e:
    return f"unreadable: {e}", None
  bad = check_signature(record)
  if bad:
    return f"invalid: {bad}", None
  if record["public_key"] != f.owner:
    return (
      f"invalid: signed by key {record['public_key'][:16]}..., but the proof is bound to key {f.owner[:16]}... "
      "(a proof cannot be claimed by another key)",
      None,
    )
  if record["proof_root"] != f.root:
    return "invalid: its proof root is not this proof's", None
  if record["model_digest"] != model_digest(final_leaves(claim.proof_dir)):
    return "invalid: its model digest is not this proof's final model", None
  if challenge is not None and record.get("challenge") != challenge:
    return "stale: it does not answer this dispute's challenge (anyone can copy a past commitment)", None
  return "valid", _time(record).strftime("%Y-%m-%dT%H:%M:%SZ")
