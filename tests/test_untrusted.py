"""Hostile files: a proof, a commitment or a model never hangs, crashes, exhausts or redirects a reader.

Every test is an attack that once succeeded: a FIFO where a file should be
(the reader blocked forever), a symbolic link (followed out of the proof),
JSON that overflows the parser, a declared size that aborts the process, a
byte the root did not cover.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, batch_path, record, reseal, run_cli, smoke_config

from pol_jax import build, challenge, ownership, proof, safeio, verifier

HANG_SECONDS = 30


@pytest.fixture(scope="module")
def rebuilt():
  config = smoke_config()
  train = build.dataset(config, "train")
  return build.program(config, train), train


def _ocdbt_data_file(p: str, step: int = 4) -> str:
  """A TensorStore data file of the batch that holds ``step`` (relative path): what a restore reads."""
  d = os.path.join(batch_path(p, step), "state", "ocdbt.process_0", "d")
  return os.path.join(d, sorted(os.listdir(os.path.join(p, d)))[0])


def _within(fn, fifo: str | None = None, seconds: float = HANG_SECONDS):
  """``fn()``'s exception (or None), failing the test if it runs past ``seconds`` (a hang)."""
  out: dict = {}

  def target():
    try:
      fn()
    except BaseException as e:  # noqa: BLE001 - handed to the test
      out["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    for _ in range(3):  # Unblock a reader stuck on the FIFO so the thread can end.
      try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
      except (OSError, TypeError):
        pass
    pytest.fail(f"hung for {seconds} s on {fifo}")
  return out.get("error")


def _check_one_line(error: BaseException | None, kind: type, *words: str) -> None:
  assert isinstance(error, kind), repr(error)
  assert "\n" not in str(error), str(error)
  for word in words:
    assert word in str(error), str(error)


def _check_cli_refuses(result, *words: str, status=(1, 2)) -> None:
  assert result.returncode in status, f"exit {result.returncode}: {result.stdout[-500:]} {result.stderr[-2000:]}"
  assert "Traceback" not in result.stderr, result.stderr
  if result.returncode == 2:
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  for word in words:
    assert word in result.stdout + result.stderr, result.stdout + result.stderr


def _check_integrity_fails(verdict, *words: str) -> None:
  assert not verdict.accepted
  assert [c.name for c in verdict.failed] == ["integrity"], verdict.table()
  detail = verdict.checks[0].detail
  assert "\n" not in detail
  for word in words:
    assert word in detail, detail


# ------------------------------------------------------------------ the honest proof


def test_the_honest_proof_lists_every_file_and_is_accepted(honest, rebuilt):
  manifest = proof.validate_manifest(proof.read_manifest(honest))
  on_disk = {p for p in safeio.walk(honest) if p != proof.MANIFEST}
  assert set(manifest["files"]) == on_disk
  assert any(p.endswith("_CHECKPOINT_METADATA") for p in on_disk)  # Orbax's bookkeeping is covered too
  proof.check_files(honest, manifest)
  verdict = verifier.verify(honest, *rebuilt, challenge=challenge.All())
  assert verdict.accepted, verdict.table()


def test_semantic_root_is_reproducible_and_root_is_not(honest, tmp_path):
  """Orbax's bookkeeping holds timestamps and paths: the root differs between two identical runs, not the claim."""
  again = record(str(tmp_path / "again"), smoke_config())
  first = proof.read_manifest(honest)
  assert again["root"] != first["root"]
  assert proof.semantic_root(again) == proof.semantic_root(first)
  assert again["checkpoints"] == first["checkpoints"]


# ------------------------------------------------------------------ FIFOs


FIFO_TARGETS = {
  "manifest": lambda p: proof.MANIFEST,
  "index log": lambda p: proof.INDICES,
  "meta": lambda p: f"{batch_path(p, 4)}/meta/metadata",
  "state metadata": lambda p: f"{batch_path(p, 4)}/state/_METADATA",
  "ocdbt data": _ocdbt_data_file,
}


def _plant_fifo(p: str, rel: str) -> str:
  path = os.path.join(p, rel)
  os.remove(path)
  os.mkfifo(path)
  return path


@pytest.mark.parametrize("target", sorted(FIFO_TARGETS))
def test_fifo_in_the_proof_is_refused_at_once(honest, copy_of, rebuilt, target):
  p = copy_of(honest)
  rel = FIFO_TARGETS[target](p)
  fifo = _plant_fifo(p, rel)
  error = _within(lambda: verifier.verify(p, *rebuilt, challenge=challenge.All()), fifo)
  _check_one_line(error, proof.ProofError, rel, "a FIFO, refused")


@pytest.mark.parametrize("target", ["manifest", "ocdbt data"])
def test_fifo_in_the_proof_cli(honest, copy_of, target):
  p = copy_of(honest)
  rel = FIFO_TARGETS[target](p)
  _plant_fifo(p, rel)
  result = run_cli("experiments.verify", f"--proof={p}", "--strategy=all", timeout=60)
  _check_cli_refuses(result, rel, "a FIFO", status=(2,))


# ------------------------------------------------------------------ symbolic links


def _run_limited(code: str, arg: str, error: str) -> subprocess.CompletedProcess:
  """Runs ``code`` in a child limited to 3 GiB of address space; ``error`` (a class name) exits 2, printed."""
  prelude = "import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\ntry:\n"
  body = "".join(f"  {line}\n" for line in code.splitlines())
  tail = f"except Exception as e:\n  if type(e).__name__ != {error!r}: raise\n  print(e)\n  sys.exit(2)\n"
  return subprocess.run(
    [sys.executable, "-c", prelude + body + tail, arg], cwd=ROOT, capture_output=True, text=True, timeout=60
  )


def test_manifest_linked_to_dev_zero_is_refused_in_bounded_memory(honest, copy_of):
  """In a child limited to 3 GiB of address space: following the link would read /dev/zero until MemoryError."""
  p = copy_of(honest)
  os.remove(os.path.join(p, proof.MANIFEST))
  os.symlink("/dev/zero", os.path.join(p, proof.MANIFEST))
  result = _run_limited("from pol_jax import proof\nproof.read_manifest(sys.argv[1])", p, "ProofError")
  assert result.returncode == 2, result.stdout + result.stderr[-2000:]
  assert result.stdout.startswith("manifest.json: file: a symbolic link, refused"), result.stdout


@pytest.mark.parametrize("where", ["manifest outside", "state file outside"])
def test_symbolic_link_in_the_proof_is_refused(honest, copy_of, rebuilt, tmp_path, where):
  """The link points at an exact copy of the file: the bytes are right, only following it is wrong."""
  p = copy_of(honest)
  rel = proof.MANIFEST if where == "manifest outside" else _ocdbt_data_file(p, 8)
  outside = str(tmp_path / "outside")
  shutil.move(os.path.join(p, rel), outside)
  os.symlink(outside, os.path.join(p, rel))
  error = _within(lambda: verifier.verify(p, *rebuilt, challenge=challenge.All()))
  _check_one_line(error, proof.ProofError, rel, "a symbolic link, refused")


def test_a_file_read_by_name_is_not_followed(tmp_path):
  """``read_json`` itself opens with O_NOFOLLOW: /etc/passwd through a link is never opened."""
  os.symlink("/etc/passwd", tmp_path / "manifest.json")
  with pytest.raises(proof.ProofError, match="manifest.json: file: a symbolic link, refused"):
    proof.read_json(str(tmp_path / "manifest.json"), "manifest.json")


# ------------------------------------------------------------------ hostile JSON


def _manifest_text(p: str) -> str:
  return open(os.path.join(p, proof.MANIFEST)).read()


JSON_ATTACKS = {
  "deep": (lambda text: "[" * 100_000 + "]" * 100_000, "nested 100000 levels deep"),
  "huge integer": (lambda text: text.replace('"steps": 12', '"steps": ' + "9" * 5000, 1), "integer of 5000 digits"),
  "infinite float": (
    lambda text: text.replace('"learning_rate": 0.1', '"learning_rate": 1e400', 1),
    "the number 1e400 is not finite",
  ),
  "duplicate key": (lambda text: text.replace('"steps": 12', '"steps": 12, "steps": 120', 1), "duplicate key 'steps'"),
}


@pytest.mark.parametrize("attack", sorted(JSON_ATTACKS))
def test_hostile_json_manifest_is_one_line(honest, copy_of, attack):
  p = copy_of(honest)
  edit, words = JSON_ATTACKS[attack]
  text = _manifest_text(p)
  hostile = edit(text)
  assert hostile != text, "the attack must change the manifest"
  open(os.path.join(p, proof.MANIFEST), "w").write(hostile)
  error = _within(lambda: proof.read_manifest(p))
  _check_one_line(error, proof.ProofError, "manifest.json: json:", words)


def test_hostile_json_manifest_cli(honest, copy_of):
  p = copy_of(honest)
  open(os.path.join(p, proof.MANIFEST), "w").write("[" * 100_000 + "]" * 100_000)
  result = run_cli("experiments.verify", f"--proof={p}", "--strategy=all", timeout=60)
  _check_cli_refuses(result, "manifest.json: json: nested 100000 levels deep", status=(2,))


def test_resealed_deep_json_in_a_checkpoint_meta_fails_integrity(honest, copy_of, rebuilt):
  """A forger re-hashes the listing: the file is covered, and still parsed strictly."""
  p = copy_of(honest)
  open(os.path.join(p, batch_path(p, 4), "meta/metadata"), "w").write("[" * 100_000 + "]" * 100_000)
  reseal(p, lambda body: None)
  _check_integrity_fails(verifier.verify(p, *rebuilt, challenge=challenge.All()), f"{batch_path(p, 4)}: meta", "nested")


# ------------------------------------------------------------------ every byte accounted for


def _flip(path: str, at: int = -3) -> None:
  data = bytearray(open(path, "rb").read())
  data[at] ^= 1
  open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
  "step, rel", [(4, "_CHECKPOINT_METADATA"), (4, "commit_success.txt"), (8, "state/commit_success.txt")]
)
def test_changed_byte_in_orbax_bookkeeping_fails_integrity(honest, copy_of, rebuilt, step, rel):
  p = copy_of(honest)
  rel = f"{batch_path(p, step)}/{rel}"
  _flip(os.path.join(p, rel))
  _check_integrity_fails(verifier.verify(p, *rebuilt, challenge=challenge.All()), rel, "does not match its SHA-256")


def test_extra_file_fails_integrity(honest, copy_of, rebuilt):
  p = copy_of(honest)
  open(os.path.join(p, batch_path(p, 4), "state/notes.txt"), "w").write("unlisted")
  _check_integrity_fails(
    verifier.verify(p, *rebuilt, challenge=challenge.All()),
    f"{batch_path(p, 4)}/state/notes.txt is not in the manifest's file listing",
  )


def test_missing_file_fails_integrity(honest, copy_of, rebuilt):
  p = copy_of(honest)
  os.remove(os.path.join(p, "checkpoints/12/_CHECKPOINT_METADATA"))
  _check_integrity_fails(
    verifier.verify(p, *rebuilt, challenge=challenge.All()),
    "checkpoints/12/_CHECKPOINT_METADATA is listed in the manifest but",
  )


def test_extra_file_cli_exits_1(honest, copy_of):
  p = copy_of(honest)
  open(os.path.join(p, "stray.bin"), "wb").write(b"\0" * 10)
  result = run_cli("experiments.verify", f"--proof={p}", "--strategy=all", timeout=60)
  _check_cli_refuses(result, "integrity", "stray.bin: is not in the manifest's file listing", status=(1,))


@pytest.mark.parametrize(
  "edit, words",
  [
    (lambda f: f.update({"../x": {"size": 1, "sha256": "0" * 64}}), "'../x' is not a normalised relative path"),
    (lambda f: f.update({"/etc/passwd": {"size": 1, "sha256": "0" * 64}}), "is not a normalised relative path"),
    (lambda f: f.update({"a//b": {"size": 1, "sha256": "0" * 64}}), "is not a normalised relative path"),
    (lambda f: f[proof.INDICES].update(size=-1), "files.indices.npy.size: -1 is outside"),
    (lambda f: f[proof.INDICES].update(sha256="zz"), "files.indices.npy.sha256: expected 64 lowercase hex"),
    (lambda f: f.pop(proof.DATA_DIGESTS), "files: does not list data_digests.npy"),
    (lambda f: f.pop("checkpoints/12/meta/metadata"), "files: does not list checkpoints/12/meta/metadata"),
  ],
)
def test_file_listing_is_validated(honest, edit, words):
  manifest = json.loads(_manifest_text(honest))
  body = {k: v for k, v in manifest.items() if k != "root"}
  edit(body["files"])
  with pytest.raises(proof.ProofError, match=words.replace(".", r"\.").replace("(", r"\(")):
    proof.validate_manifest(proof.seal(body))


# ------------------------------------------------------------------ the dispute tool


@pytest.mark.parametrize(
  "attack, words",
  [
    ("fifo", "a FIFO, refused"),
    ("deep", "nested 30000 levels deep"),
    ("infinite", "the number 1e400 is not finite"),
    ("link", "a symbolic link, refused"),
  ],
)
def test_hostile_commitment_is_one_line(tmp_path, attack, words):
  path = str(tmp_path / "commitment.json")
  if attack == "fifo":
    os.mkfifo(path)
  elif attack == "deep":  # under the size limit
    open(path, "w").write("[" * 30_000 + "]" * 30_000)
  elif attack == "infinite":
    open(path, "w").write('{"schema": "x", "time": 1e400}')
  else:
    os.symlink("/etc/passwd", path)
  error = _within(lambda: ownership.read_commitment(path), path)
  _check_one_line(error, ownership.DisputeError, path, words)


def _huge_orbax_model(path: str) -> None:
  """A real Orbax checkpoint of a 2x3 array whose metadata then declares 60000x60000 (14.4 GB)."""
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
  ocp.Checkpointer(handler).save(path, {"w": np.ones((2, 3), np.float32)})
  zarray = os.path.join(path, "w", ".zarray")
  meta = json.load(open(zarray))
  meta["shape"] = [60000, 60000]
  json.dump(meta, open(zarray, "w"))


def test_orbax_model_declaring_a_huge_array_is_refused_before_restoring(tmp_path):
  """In a child limited to 3 GiB of address space: restoring it would allocate 14.4 GB (it aborted)."""
  path = str(tmp_path / "model")
  _huge_orbax_model(path)
  assert sum(safeio.walk(path).values()) < 2000
  result = _run_limited("from pol_jax import ownership\nownership.load_model(sys.argv[1])", path, "DisputeError")
  assert result.returncode == 2, result.stdout + result.stderr[-2000:]
  assert "w declares shape (60000, 60000)" in result.stdout, result.stdout


def test_dispute_cli_refuses_a_huge_orbax_model_without_aborting(honest, tmp_path):
  path = str(tmp_path / "model")
  _huge_orbax_model(path)
  run = (  # `python -m experiments.dispute`, limited as above in case the restore is ever reached again
    "import resource, runpy, sys\nresource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
    "sys.argv[0] = 'dispute'\nrunpy.run_module('experiments.dispute', run_name='__main__')\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", run, f"--model={path}", f"--claim=a:{honest}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode != -signal.SIGABRT
  _check_cli_refuses(result, "unusable model", "declares shape (60000, 60000)", status=(2,))


@pytest.mark.parametrize("attack", ["shape over data", "link", "fifo", "orbax link"])
def test_hostile_model_files_are_one_line(tmp_path, attack):
  from safetensors.numpy import save_file

  path = str(tmp_path / "model.safetensors")
  save_file({"w": np.ones((2, 3), np.float32)}, path)
  if attack == "shape over data":  # 24 bytes of data under a header declaring 240 GB
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 30000000000], "data_offsets": [0, 24]}}).encode()
    open(path, "wb").write(len(header).to_bytes(8, "little") + header + b"\0" * 24)
    words = "shape [2, 30000000000] of F32 is 240000000000 bytes, data_offsets span [0, 24]"
  elif attack == "link":
    os.rename(path, path + ".real")
    os.symlink(path + ".real", path)
    words = "a symbolic link, refused"
  elif attack == "fifo":
    os.remove(path)
    os.mkfifo(path)
    words = "a FIFO, refused"
  else:
    path = str(tmp_path / "orbax")
    ocp.PyTreeCheckpointer().save(path, {"w": np.ones((2, 3), np.float32)})
    victim = os.path.join(path, "_METADATA")
    os.rename(victim, str(tmp_path / "elsewhere"))
    os.symlink(str(tmp_path / "elsewhere"), victim)
    words = "_METADATA: file: a symbolic link, refused"
  # In a child: a FIFO opened by the safetensors library blocks while holding the GIL.
  result = _run_limited("from pol_jax import ownership\nownership.load_model(sys.argv[1])", path, "DisputeError")
  assert result.returncode == 2 and len(result.stdout.splitlines()) == 1, result.stdout + result.stderr[-2000:]
  assert words in result.stdout, result.stdout
