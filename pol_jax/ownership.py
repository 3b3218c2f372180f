"""Model ownership: commit to a proof when training ends, settle who trained a model later.

The paper's first application. A prover publishes a small signed
:func:`commit` record (the proof's root, the digest of the final model, the
time, an Ed25519 signature); in a dispute, :func:`settle` takes the disputed
model file (an Orbax checkpoint, safetensors or Flax msgpack) and any number
of claims, and reports for each whether its proof verifies, whether its final
state is the disputed model (bit for bit, or after a stated cast to the
file's lower precision), where its initial state comes from (its seed,
another claimant's final state, the disputed model) and what its commitment
shows. The claimant established is the one whose proof verifies from its
seed and ends on the model; a copy of that proof is identified by its later
commitment.

Model digests are computed from leaf digests (``proof.leaf_digest``: path,
dtype, shape and bytes of every parameter), so a commitment can be checked
against a proof's recorded final checkpoint without restoring it.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from pol_jax import proof, training
from pol_jax import verify as verify_lib

SCHEMA = "pol-jax/commitment/v1"
MAX_MODEL_BYTES = 4 << 30
MAX_COMMITMENT_BYTES = 64 << 10
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
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  with os.fdopen(fd, "wb") as f:
    f.write(pem)
  public = _public_hex(key)
  with open(path + ".pub", "w") as f:
    f.write(public + "\n")
  return public


def load_key(path: str):
  """The Ed25519 private key in ``path`` (PEM)."""
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ed25519

  try:
    with open(path, "rb") as f:
      key = serialization.load_pem_private_key(f.read(), password=None)
  except (OSError, ValueError, TypeError) as e:
    raise DisputeError(f"{path}: not a readable PEM private key ({type(e).__name__})") from None
  if not isinstance(key, ed25519.Ed25519PrivateKey):
    raise DisputeError(f"{path}: not an Ed25519 key")
  return key


def _public_hex(key) -> str:
  from cryptography.hazmat.primitives import serialization

  return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def final_leaves(proof_dir: str) -> dict[str, str]:
  """The leaf digests of the model parts of the proof's final checkpoint, checked against its manifest."""
  manifest = verify_lib.read_manifest(proof_dir)
  step = int(manifest["steps"])
  try:
    meta = proof.read_meta(proof_dir, step, manifest["checkpoints"].get(str(step)))
  except proof.IntegrityError as e:
    raise proof.ProofError(f"{proof.CHECKPOINTS}/{step}", "meta", str(e)) from None
  return {p: d for p, d in meta["leaves"].items() if p.split("/", 1)[0] in MODEL_PARTS}


def model_digest(leaves: dict[str, str]) -> str:
  """SHA-256 over the sorted ``{path: leaf digest}`` of a model: what a commitment names."""
  return proof.digest_json(dict(sorted(leaves.items())))


def commit(proof_dir: str, key, *, now: datetime.datetime | None = None) -> dict:
  """A signed commitment to the proof in ``proof_dir``: its root, its final model's digest, the time.

  The signature covers the canonical JSON of every other field.
  """
  manifest = verify_lib.read_manifest(proof_dir)
  proof.validate_manifest(manifest)
  now = now or datetime.datetime.now(datetime.UTC)
  body = {
    "schema": SCHEMA,
    "proof_root": manifest["root"],
    "model_digest": model_digest(final_leaves(proof_dir)),
    "time": now.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    "public_key": _public_hex(key),
  }
  return {**body, "signature": key.sign(proof.canonical_json(body)).hex()}


def read_commitment(path: str) -> dict:
  """A commitment record, size- and field-checked (not its signature)."""
  try:
    if os.path.getsize(path) > MAX_COMMITMENT_BYTES:
      raise DisputeError(f"{path}: larger than {MAX_COMMITMENT_BYTES} bytes, not a commitment")
  except OSError:
    raise DisputeError(f"{path}: not found") from None
  try:
    record = proof.read_json(path, os.path.basename(path))
  except proof.ProofError as e:
    raise DisputeError(f"{path}: {str(e).split(': ', 1)[-1]}") from None
  if not isinstance(record, dict) or record.get("schema") != SCHEMA:
    raise DisputeError(f"{path}: schema: expected {SCHEMA!r}")
  for name in ("proof_root", "model_digest", "public_key", "signature", "time"):
    if not isinstance(record.get(name), str):
      raise DisputeError(f"{path}: {name}: missing or not a string")
  try:
    _time(record)
  except ValueError:
    raise DisputeError(f"{path}: time: not an ISO 8601 time") from None
  return record


def _time(record: dict) -> datetime.datetime:
  return datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00"))


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
  return {
    proof.path_str(names): np.ascontiguousarray(np.asarray(leaf))
    for part in MODEL_PARTS
    for names, leaf in proof.flatten({part: getattr(state, part)})
  }


def load_model(path: str) -> tuple[str, dict[str, np.ndarray]]:
  """``(format, {path: array})`` of a model file: safetensors, Flax msgpack, or an Orbax checkpoint directory.

  Keys are ``/``-separated (``.`` in safetensors keys is accepted too). Files
  over :data:`MAX_MODEL_BYTES` are refused before they are read.
  """
  if not os.path.exists(path):
    raise DisputeError(f"{path}: not found")
  if os.path.isdir(path):
    return "orbax", _load_orbax(path)
  if os.path.getsize(path) > MAX_MODEL_BYTES:
    raise DisputeError(f"{path}: larger than {MAX_MODEL_BYTES} bytes")
  with open(path, "rb") as f:
    head = f.read(8)
  try:
    if path.endswith(".safetensors") or (len(head) == 8 and int.from_bytes(head, "little") < os.path.getsize(path)):
      try:
        return "safetensors", _load_safetensors(path)
      except DisputeError:
        if path.endswith(".safetensors"):
          raise
    return "msgpack", _load_msgpack(path)
  except DisputeError:
    raise
  except Exception as e:  # the parsers raise many kinds on a damaged file
    raise DisputeError(f"{path}: unreadable model file ({type(e).__name__})") from None


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  try:
    arrays = load_file(path)
  except Exception as e:
    raise DisputeError(f"{path}: not a safetensors file ({type(e).__name__})") from None
  return {k.replace(".", "/"): v for k, v in arrays.items()}


def _load_msgpack(path: str) -> dict[str, np.ndarray]:
  from flax import serialization

  with open(path, "rb") as f:
    tree = serialization.msgpack_restore(f.read())
  if not isinstance(tree, dict):
    raise DisputeError(f"{path}: a msgpack file, but not a tree of arrays")
  return {proof.path_str(names): np.asarray(leaf) for names, leaf in proof.flatten(tree)}


def _load_orbax(path: str) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp

  try:
    tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
  except Exception as e:
    raise DisputeError(f"{path}: not a readable Orbax checkpoint ({type(e).__name__})") from None
  return {proof.path_str(names): np.asarray(leaf) for names, leaf in proof.flatten(tree)}


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
    elif np.issubdtype(mine.dtype, np.floating) and np.dtype(theirs.dtype).itemsize < mine.dtype.itemsize:
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
  commitment: str = "none"
  committed_at: str | None = None
  established: bool = False
  note: str = ""


def settle(
  model_path: str,
  claims: list[Claim],
  rebuild: Callable[[str], tuple[training.Program, Any]],
  *,
  strategy: str = "all",
  num_segments: int = 8,
  builder: str | None = None,
) -> tuple[list[Finding], str, int]:
  """Settles who trained the model at ``model_path``; returns ``(findings, verdict line, exit status)``.

  ``rebuild(proof_dir)`` gives the program and training data a claimant's
  proof describes (``experiments.build.rebuild``); ``builder`` is passed to
  ``verify.verify`` (worker processes reproduce a proof's thread count and
  flags). Exit status: 0 when one
  claimant is established, 1 when none is, 2 when the model itself is
  unusable. A claim that cannot be used is reported for that claimant.
  """
  try:
    fmt, model = load_model(model_path)
  except DisputeError as e:
    return [], f"unusable model: {e}", 2
  findings, finals, starts = [], {}, {}
  for claim in claims:
    f = Finding(claim.name)
    findings.append(f)
    try:
      _examine(claim, f, model, fmt, rebuild, strategy, num_segments, finals, starts, builder)
    except (DisputeError, proof.ProofError, proof.IntegrityError) as e:
      f.usable, f.reason = False, str(e)
  for f in findings:  # where does each initial state come from?
    if not f.usable or f.name not in starts:
      continue
    if f.origin == "seed":
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
  candidates = [f for f in findings if f.usable and f.verified and f.origin == "seed" and f.model.startswith("equal")]
  candidates = [f for f in candidates if f.commitment in ("none", "valid")]
  # The same proof presented twice: the earliest valid commitment to it wins, the others are copies.
  by_root: dict[str, list[Finding]] = {}
  for f in candidates:
    by_root.setdefault(f.root, []).append(f)
  winners = []
  for group in by_root.values():
    committed = sorted((f for f in group if f.committed_at), key=lambda f: f.committed_at)
    first = committed[0] if committed else group[0]
    if len(group) > 1 and not committed:
      for f in group:
        f.note = "the same proof as another claimant's, with no commitment to tell who had it first"
      continue
    for f in group:
      if f is not first:
        f.note = f"a copy of {first.name}'s proof, committed later ({f.committed_at or 'never'})"
    winners.append(first)
  if len(winners) == 1:
    winners[0].established = True
    w = winners[0]
    how = "bit for bit" if w.model == "equal" else "after a cast to the file's precision"
    return (
      findings,
      (
        f"ESTABLISHED: {w.name} trained the disputed model: its proof verifies from its seed and ends on the model "
        f"{how}" + (f"; committed {w.committed_at}" if w.committed_at else "; no commitment")
      ),
      0,
    )
  if not winners:
    return (
      findings,
      "NOT ESTABLISHED: no claimant has a verifying proof from its seed that ends on the disputed model",
      1,
    )
  names = ", ".join(w.name for w in winners)
  return findings, f"NOT ESTABLISHED: several independent proofs end on the disputed model ({names})", 1


def _same(a: Any, b: Any) -> bool:
  x, y = _model_arrays(a), _model_arrays(b)
  x = {k: v for k, v in x.items() if k.startswith("params/")}
  y = {k: v for k, v in y.items() if k.startswith("params/")}
  return x.keys() == y.keys() and all(x[k].shape == y[k].shape and x[k].tobytes() == y[k].tobytes() for k in x)


def _examine(claim, f, model, fmt, rebuild, strategy, num_segments, finals, starts, builder=None) -> None:
  from pol_jax import recorder

  if not os.path.isdir(claim.proof_dir):
    raise DisputeError(f"{claim.proof_dir}: no such proof directory")
  manifest = verify_lib.read_manifest(claim.proof_dir)
  f.root = manifest.get("root")
  if claim.commitment:
    try:
      record = read_commitment(claim.commitment)
      bad = check_signature(record)
      if bad:
        f.commitment = f"invalid: {bad}"
      elif record["proof_root"] != f.root:
        f.commitment = "invalid: its proof root is not this proof's"
      elif record["model_digest"] != model_digest(final_leaves(claim.proof_dir)):
        f.commitment = "invalid: its model digest is not this proof's final model"
      else:
        f.commitment, f.committed_at = "valid", record["time"]
    except DisputeError as e:
      f.commitment = f"unreadable: {e}"
  program, train = rebuild(claim.proof_dir)
  verdict = verify_lib.verify(
    claim.proof_dir, program, train, strategy=strategy, num_segments=num_segments, builder=builder
  )
  f.verified = verdict.accepted
  f.failed_checks = [c.name for c in verdict.failed]
  f.verdict = verdict.summary()
  template = training.to_host(program.init(training.derive_keys(manifest["seed"]).init))
  start, _ = proof.restore(claim.proof_dir, 0, template, manifest["checkpoints"].get("0"))
  starts[claim.name] = start
  f.origin = "seed" if "init" not in f.failed_checks else ""
  final = recorder.final_state(claim.proof_dir, program, manifest)
  finals[claim.name] = final
  f.model, f.model_detail = compare(model, final)
  if f.model == "mismatch":
    f.model_detail = f"the model's shapes do not match the proof's: {f.model_detail}"
  f.model_detail += f" ({fmt})"
