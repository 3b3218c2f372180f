"""The proof on disk: digests, reads, the manifest, the layout of states in batches, and hostile files.

The hostile-file tests are attacks that once succeeded: a FIFO where a file
should be (the reader blocked forever), a symbolic link (followed out of the
proof), JSON that overflows the parser, a declared size that aborts the
process, a byte the root did not cover. The fuzzing test mutates proofs at
random: each is rejected with a one-line reason, never accepted, never a
crash (``POL_FUZZ_EXAMPLES`` sets the number of mutations: default 40, for
CI; use thousands for a long run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
from conftest import (
  batch_path,
  check_one_line,
  load_manifest,
  ocdbt_data_file,
  plant_fifo,
  record,
  reseal,
  run_limited,
  smoke_config,
  within,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pol_jax import build, challenge, fingerprint, proof, safeio, store, training, verifier

# ------------------------------------------------------------------ digests and reads


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


# ------------------------------------------------------------------ states in batches of flat buffers


def test_states_are_saved_in_few_batches_of_flat_buffers(honest):
  manifest = load_manifest(honest)
  batches = store.batches(honest)
  assert batches[-1] == manifest["steps"] and len(batches) < len(manifest["checkpoints"]), batches
  held = [int(s) for b in batches for s in store.read_batch_meta(honest, b)["states"]]
  assert held == [int(s) for s in sorted(manifest["checkpoints"], key=int)], held
  on_disk = [f for f in manifest["files"] if f.startswith(proof.CHECKPOINTS + "/")]
  assert len(on_disk) <= 10 * len(batches), on_disk  # Orbax writes 8 or 9 files a state item, and the meta
  layout = store.read_batch_meta(honest, batches[-1])["layout"]
  assert {dtype for _, dtype, _ in layout} == {"float32", "int32"}, layout  # one buffer per dtype


def test_a_writer_saves_a_batch_when_due_and_reads_back_every_state(tmp_path):
  path = str(tmp_path / "proof")
  writer = store.Writer(path, flush_states=2)
  states = {
    s: training.TrainState(np.int32(s), {"w": np.arange(3, dtype=np.float32) + s}, (np.zeros(2, np.float32),), {})
    for s in (0, 4, 8)
  }
  try:
    digests = {s: writer.save(state) for s, state in states.items()}
  finally:
    writer.close()
  assert store.batches(path) == [4, 8] and writer.completed_steps() == [0, 4, 8]
  for s, state in states.items():
    back, _ = store.restore(path, s, state, digests[s])
    assert proof.leaf_digests(back) == proof.leaf_digests(state)


def _states(*steps, offset=0.0):
  return {
    s: training.TrainState(
      np.int32(s), {"w": np.arange(3, dtype=np.float32) + s + offset}, (np.zeros(2, np.float32),), {}
    )
    for s in steps
  }


def test_a_batch_saved_again_replaces_the_old_one(tmp_path):
  """A coordinator that redoes a round after a crash saves the same step again: the new batch wins, whole."""
  path = str(tmp_path / "proof")
  for offset in (0.0, 0.5):
    writer = store.Writer(path, flush_states=2)
    try:
      digests = {s: writer.save(state) for s, state in _states(0, 4, offset=offset).items()}
    finally:
      writer.close()
  assert store.batches(path) == [4] and sorted(os.listdir(os.path.join(path, proof.CHECKPOINTS))) == ["4"]
  back, _ = store.restore(path, 4, _states(4)[4], digests[4])
  assert back.params["w"].tolist() == [4.5, 5.5, 6.5]


def test_a_writer_removes_what_killed_saves_left_and_follows_no_link(tmp_path):
  path = str(tmp_path / "proof")
  directory = os.path.join(path, proof.CHECKPOINTS)
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "keep.txt").write_text("not the writer's")
  os.makedirs(os.path.join(directory, "8.pol-jax-tmp-4242-0", "state"))
  # What Orbax's CheckpointManager left (proofs begun before the writer wrote its own batches).
  os.makedirs(os.path.join(directory, "16.orbax-checkpoint-tmp", "state"))
  os.makedirs(os.path.join(directory, "20.orbax-checkpoint-tmp-1700000000000000"))
  os.symlink(outside, os.path.join(directory, "24.pol-jax-tmp-1-0"))
  os.makedirs(os.path.join(directory, "notes"))  # not a temporary name: left alone
  store.Writer(path).close()
  assert sorted(os.listdir(directory)) == ["notes"]
  assert (outside / "keep.txt").read_text() == "not the writer's"


def test_orbax_temporary_names_are_the_ones_removed():
  from orbax.checkpoint._src.path import atomicity_types

  assert store._UNFINISHED.fullmatch("16" + atomicity_types.TMP_DIR_SUFFIX)


def test_a_writer_refuses_a_linked_checkpoints_directory(tmp_path):
  outside = tmp_path / "outside"
  outside.mkdir()
  path = tmp_path / "proof"
  path.mkdir()
  os.symlink(outside, path / proof.CHECKPOINTS)
  writer = store.Writer(str(path), flush_states=1)
  with pytest.raises(OSError, match="not a directory"):
    try:
      writer.save(_states(0)[0])
    finally:
      writer.close()
  assert os.listdir(outside) == []


def test_a_failed_save_is_raised_keeps_the_next_batch_and_its_leftovers_go(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  path = str(tmp_path / "proof")
  real = ocp.PyTreeCheckpointHandler.async_save
  calls = []

  async def broken_once(self, directory, args):
    calls.append(directory)
    if len(calls) == 1:
      raise OSError(28, "No space left on device")
    return await real(self, directory, args=args)

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", broken_once)
  states = _states(0, 4, 8)
  writer = store.Writer(path, flush_states=2)
  digests = {s: writer.save(state) for s, state in list(states.items())[:2]}  # the batch of 0 and 4: fails
  digests[8] = writer.save(states[8])
  with pytest.raises(OSError, match="No space left"):
    writer.wait()
  assert store.batches(path) == []
  writer.close()  # the state at 8, kept when the error was raised, is saved now
  assert store.batches(path) == [8]
  back, _ = store.restore(path, 8, states[8], digests[8])
  assert back.params["w"].tolist() == [8.0, 9.0, 10.0]
  assert any(".pol-jax-tmp-" in name for name in os.listdir(os.path.join(path, proof.CHECKPOINTS)))
  store.Writer(path).close()
  assert os.listdir(os.path.join(path, proof.CHECKPOINTS)) == ["8"]


def test_a_crash_while_replacing_a_batch_loses_that_batch_only(tmp_path, monkeypatch):
  """The window between moving the old batch aside and renaming the new one in: both go, the rest stays."""
  path = str(tmp_path / "proof")
  writer = store.Writer(path, flush_states=2)
  for state in _states(0, 4, 8, 12).values():
    writer.save(state)
  writer.close()
  renames = []
  real = os.rename

  def rename(src, dst):
    renames.append(dst)
    if len(renames) == 2:  # old batch aside, then the new one in: fails
      raise OSError(5, "Input/output error")
    return real(src, dst)

  writer = store.Writer(path, flush_states=2)
  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(OSError, match="Input/output"):
    try:
      for state in _states(8, 12, offset=0.5).values():  # steps 8 and 12 again: batch 12 is replaced
        writer.save(state)
    finally:
      writer.close()
  monkeypatch.setattr(os, "rename", real)
  store.Writer(path).close()
  assert os.listdir(os.path.join(path, proof.CHECKPOINTS)) == ["4"] and store.batches(path) == [4]


# ------------------------------------------------------------------ hostile files: the honest proof, then the attacks


@pytest.fixture(scope="module")
def rebuilt():
  config = smoke_config()
  train = build.dataset(config, "train")
  return build.program(config, train), train


def _check_integrity_fails(verdict, *words: str) -> None:
  assert not verdict.accepted
  assert [c.name for c in verdict.failed] == ["integrity"], verdict.table()
  detail = verdict.checks[0].detail
  assert "\n" not in detail
  for word in words:
    assert word in detail, detail


def test_the_honest_proof_lists_every_file_and_is_accepted(honest, rebuilt):
  manifest = proof.validate_manifest(proof.read_manifest(honest))
  on_disk = {p for p in safeio.walk(honest) if p != proof.MANIFEST}
  assert set(manifest["files"]) == on_disk
  assert any(p.endswith("state/_METADATA") for p in on_disk)  # Orbax's bookkeeping is covered too
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
  "ocdbt data": ocdbt_data_file,
}


@pytest.mark.parametrize("target", sorted(FIFO_TARGETS))
def test_fifo_in_the_proof_is_refused_at_once(honest, copy_of, rebuilt, target):
  p = copy_of(honest)
  rel = FIFO_TARGETS[target](p)
  fifo = plant_fifo(p, rel)
  error = within(lambda: verifier.verify(p, *rebuilt, challenge=challenge.All()), fifo)
  check_one_line(error, proof.ProofError, rel, "a FIFO, refused")


# ------------------------------------------------------------------ symbolic links


def test_manifest_linked_to_dev_zero_is_refused_in_bounded_memory(honest, copy_of):
  """In a child limited to 3 GiB of address space: following the link would read /dev/zero until MemoryError."""
  p = copy_of(honest)
  os.remove(os.path.join(p, proof.MANIFEST))
  os.symlink("/dev/zero", os.path.join(p, proof.MANIFEST))
  result = run_limited("from pol_jax import proof\nproof.read_manifest(sys.argv[1])", p, "ProofError")
  assert result.returncode == 2, result.stdout + result.stderr[-2000:]
  assert result.stdout.startswith("manifest.json: file: a symbolic link, refused"), result.stdout


@pytest.mark.parametrize("where", ["manifest outside", "state file outside"])
def test_symbolic_link_in_the_proof_is_refused(honest, copy_of, rebuilt, tmp_path, where):
  """The link points at an exact copy of the file: the bytes are right, only following it is wrong."""
  p = copy_of(honest)
  rel = proof.MANIFEST if where == "manifest outside" else ocdbt_data_file(p, 8)
  outside = str(tmp_path / "outside")
  shutil.move(os.path.join(p, rel), outside)
  os.symlink(outside, os.path.join(p, rel))
  error = within(lambda: verifier.verify(p, *rebuilt, challenge=challenge.All()))
  check_one_line(error, proof.ProofError, rel, "a symbolic link, refused")


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
  error = within(lambda: proof.read_manifest(p))
  check_one_line(error, proof.ProofError, "manifest.json: json:", words)


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
  "step, rel", [(4, "state/_METADATA"), (4, "state/manifest.ocdbt"), (8, "state/ocdbt.process_0/manifest.ocdbt")]
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
  os.remove(os.path.join(p, "checkpoints/12/state/_METADATA"))
  _check_integrity_fails(
    verifier.verify(p, *rebuilt, challenge=challenge.All()),
    "checkpoints/12/state/_METADATA is listed in the manifest but",
  )


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


# ------------------------------------------------------------------ fuzzing


EXAMPLES = int(os.environ.get("POL_FUZZ_EXAMPLES", "40"))
VALUES = st.one_of(
  st.none(),
  st.booleans(),
  st.integers(min_value=-(2**70), max_value=2**70),
  st.floats(allow_nan=True),
  st.text(max_size=20),
  st.lists(st.integers(), max_size=3),
  st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _files(root: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _mutate(p: str, kind: str, draw) -> str:
  files = _files(p)
  name = os.path.join(p, files[draw(st.integers(0, len(files) - 1))])
  if kind == "flip":
    data = bytearray(open(name, "rb").read())
    if data:
      data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
      open(name, "wb").write(bytes(data))
  elif kind == "truncate":
    data = open(name, "rb").read()
    open(name, "wb").write(data[: draw(st.integers(0, max(0, len(data) - 1)))])
  elif kind == "delete":
    os.remove(name)
  elif kind == "duplicate":
    source = os.path.join(p, files[draw(st.integers(0, len(files) - 1))])
    if source != name:
      shutil.copyfile(source, name)
  elif kind in ("json", "json-resealed"):
    path = os.path.join(p, proof.MANIFEST)
    manifest = json.load(open(path))
    body = {k: v for k, v in manifest.items() if k != "root"}
    target = body
    key = draw(st.sampled_from(sorted(body)))
    keys = [key]
    while isinstance(target[key], dict) and target[key] and draw(st.booleans()):
      target = target[key]
      key = draw(st.sampled_from(sorted(target)))
      keys.append(key)
    value = draw(VALUES)
    if type(value) is type(target[key]) and value == target[key]:
      return ".".join(keys)  # the same value: no mutation (the file stays as it was)
    target[key] = value
    out = proof.seal(body) if kind == "json-resealed" else {**body, "root": manifest["root"]}
    open(path, "w").write(json.dumps(out))
    return ".".join(keys)
  elif kind == "swap-checkpoints":  # two recorded states trade places: two batches, or two metas in a batch
    batches = [str(b) for b in store.batches(p)]
    if len(batches) >= 2 and draw(st.booleans()):
      a, b = draw(st.lists(st.sampled_from(batches), min_size=2, max_size=2, unique=True))
      ca, cb = (os.path.join(p, proof.CHECKPOINTS, s) for s in (a, b))
      os.rename(ca, ca + ".tmp")
      os.rename(cb, ca)
      os.rename(ca + ".tmp", cb)
    else:
      path = os.path.join(p, proof.CHECKPOINTS, draw(st.sampled_from(batches)), "meta", "metadata")
      meta = json.load(open(path))
      states = meta["states"]
      if len(states) >= 2:
        a, b = draw(st.lists(st.sampled_from(sorted(states, key=int)), min_size=2, max_size=2, unique=True))
        states[a], states[b] = states[b], states[a]
        open(path, "w").write(json.dumps(meta))
  elif kind == "absurd-shape":
    path = os.path.join(p, proof.INDICES)
    shape = draw(st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)))
    with open(path, "wb") as f:
      np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False, "shape": shape})
  return os.path.basename(name)


# Manifest fields that are reported, not checked: they change no bit of a CPU replay (measured), so a
# resealed proof that edits one claims nothing false about its states.
REPORTED = {f"environment.{f}" for f in (*fingerprint.INFO_FIELDS, *fingerprint.CPU_NEUTRAL_FIELDS)}


@settings(
  max_examples=EXAMPLES,
  deadline=None,
  derandomize=True,
  phases=[Phase.explicit, Phase.generate],  # Shrinking replays minutes of verifications; the example is printed.
  suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
  kind=st.sampled_from(
    ["flip", "truncate", "delete", "duplicate", "json", "json-resealed", "swap-checkpoints", "absurd-shape"]
  ),
  data=st.data(),
)
def test_mutated_proofs_are_rejected_cleanly(honest, kind, data):
  config = smoke_config()
  train = build.dataset(config, "train")
  program = build.program(config, train)
  with tempfile.TemporaryDirectory() as tmp:
    p = os.path.join(tmp, "proof")
    shutil.copytree(honest, p)
    before = _files(p)
    touched = _mutate(p, kind, data.draw)
    changed = _files(p) != before or any(
      open(os.path.join(p, f), "rb").read() != open(os.path.join(honest, f), "rb").read() for f in before
    )
    try:
      verdict = verifier.verify(p, program, train, challenge=challenge.All())
    except proof.ProofError as e:  # Unusable input: one line naming the file and the field.
      assert "\n" not in str(e) and e.file and e.field, repr(e)
      return
    if not changed:
      return
    if not verdict.accepted:
      if verdict.status == "undecided":  # A resealed environment this verifier cannot reproduce.
        assert kind == "json-resealed" and not verdict.failed, verdict.table()
        assert "\n" not in verdict.checks[1].detail
        return
      assert verdict.failed and all("\n" not in c.detail for c in verdict.failed)
      return
    # Accepted: the root covers every byte of the proof (its ``files`` listing), so only a resealed
    # reported-only field may have changed, or a config field the verdict says it did not check (this
    # verifier was given its program, builder=None); every proven array must be exactly the honest one.
    assert kind == "json-resealed", kind
    program_check = next(c for c in verdict.checks if c.name == "program")
    assert touched in REPORTED or (
      touched.startswith("config") and verifier.CONFIG_UNCHECKED in program_check.detail
    ), (
      touched,
      verdict.table(),
    )
    template = jax.eval_shape(program.init, jax.random.key(0))
    manifest = json.load(open(os.path.join(honest, proof.MANIFEST)))
    for step, digest in manifest["checkpoints"].items():
      ours, _ = store.restore(p, int(step), template, digest)
      theirs, _ = store.restore(honest, int(step), template, digest)
      for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
