"""Ownership disputes: the owner with an honest proof and commitment wins; thieves, copiers, spoofers lose; hostile
commitments and model files are refused in one line."""

from __future__ import annotations

import datetime
import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (
  OWNER,
  OWNER_KEY,
  check_one_line,
  huge_orbax_model,
  reseal,
  run_cli,
  run_limited,
  smoke_config,
  within,
)
from conftest import record as record_proof

from experiments import attack, cli
from pol_jax import build, challenge, ownership, proof, safeio, store, training

LATER = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
  """An owner (the attack module's victim, bound to the test key), thieves, a spoofer and a fine-tuner, with files."""
  root = tmp_path_factory.mktemp("dispute")
  v = attack.victim(smoke_config("cnn"), str(root))
  thief_key = ownership.load_key(_new_key(root / "thief.key"))
  files = {"owner": v.proof_dir}
  files["owner_commitment"] = _write(root / "owner.json", ownership.commit(v.proof_dir, OWNER_KEY, now=LATER))
  files["copy"] = str(root / "copy")
  shutil.copytree(v.proof_dir, files["copy"])
  files["spoof"] = attack.spoof("infinitesimal-update", v, str(root))["proof"]
  files["finetune"] = attack.spoof("retrain-stolen", v, str(root))["proof"]
  files["model"] = str(root / "model.safetensors")
  ownership.export_safetensors(v.stolen, files["model"])
  files["msgpack"] = str(root / "model.msgpack")
  ownership.export_msgpack(v.stolen, files["msgpack"])
  return v, files, root, thief_key


def _new_key(path) -> str:
  ownership.new_key(str(path))
  return str(path)


def _write(path, record) -> str:
  proof.write_json_atomic(str(path), record)
  return str(path)


def _signed(key, body: dict) -> dict:
  """A commitment record signed by ``key``, however its fields were chosen (a forger signs whatever it likes)."""
  body = {**body, "public_key": ownership.public_key_of(key)}
  body.pop("signature", None)
  return {**body, "signature": key.sign(proof.canonical_json(body)).hex()}


def settle(model, *claims, challenge=None):
  return ownership.settle(model, [ownership.Claim(*c) for c in claims], build.rebuild, challenge=challenge)


def by_name(findings):
  return {f.name: f for f in findings}


def test_the_owner_wins_against_no_proof_a_backdated_copy_a_rerun_a_reseal_a_spoof_and_a_fine_tune(scene):
  v, files, root, thief_key = scene
  owner_record = json.loads(open(files["owner_commitment"]).read())
  # The thief copies the proof and signs it with its own key, with a time from 2020.
  backdated = _write(root / "backdated.json", _signed(thief_key, dict(owner_record, time="2020-01-01T00:00:00Z")))
  # One hour after the owner, but written with a negative offset, so that it sorts first as a string.
  offset = _write(root / "offset.json", _signed(thief_key, dict(owner_record, time="2029-12-31T03:03:48-11:00")))
  # A re-run of the owner's public config and nonce: a bit-identical proof, nothing copied, bound to the owner's key.
  rerun = str(root / "rerun" / "proof")
  record_proof(rerun, smoke_config("cnn"))
  rerun_commitment = _write(root / "rerun.json", _signed(thief_key, dict(owner_record, time="2020-01-01T00:00:00Z")))
  # The copy with an unused config field added, resealed: a new root.
  resealed = str(root / "resealed")
  shutil.copytree(files["owner"], resealed)
  reseal(resealed, lambda m: m["config"].update(note="mine"))
  challenge = "dispute 2031-06-01 #1"
  answer = _write(root / "owner-answer.json", ownership.commit(files["owner"], OWNER_KEY, challenge=challenge))
  findings, verdict, status = settle(
    files["model"],
    ("owner", files["owner"], answer),
    ("no-proof", str(root / "nothing")),
    ("copier", files["copy"], backdated),
    ("offset", files["copy"], offset),
    ("rerunner", rerun, rerun_commitment),
    ("resealer", resealed),
    ("spoofer", files["spoof"]),
    ("fine-tuner", files["finetune"]),
    challenge=challenge,
  )
  f = by_name(findings)
  assert status == 0 and verdict.startswith("ESTABLISHED: owner (signed this dispute's challenge)"), verdict
  assert "decide nothing" in verdict
  assert f["owner"].established and f["owner"].model == "equal" and f["owner"].origin == "seed"
  assert f["owner"].commitment == "valid" and f["owner"].owner == OWNER
  assert not f["no-proof"].usable and "no such proof directory" in f["no-proof"].reason
  # The copy and the re-run verify and end on the model, but they are bound to the owner's key, not the thief's.
  for name in ("copier", "rerunner"):
    assert f[name].verified and f[name].owner == OWNER and not f[name].established, f[name]
    assert f[name].commitment.startswith("invalid: signed by key"), f[name].commitment
    assert f[name].training == f["owner"].training and "the same training as" in f[name].note
  assert f["offset"].commitment.startswith("unreadable") and "expected a UTC time" in f["offset"].commitment
  # The reseal is refused by its unknown config field, and it is still recognised as the owner's training.
  assert not f["resealer"].usable and "config.note: unknown field" in f["resealer"].reason, f["resealer"]
  # The spoof claims the very model but fails our checks.
  assert f["spoofer"].model == "equal" and not f["spoofer"].verified and "init" in f["spoofer"].failed_checks
  # The fine-tuner's honest proof replays, but starts from the owner's model.
  assert f["fine-tuner"].failed_checks == ["init"] and f["fine-tuner"].model == "different"
  assert f["fine-tuner"].origin == "derived from owner's final state"


def test_without_a_challenge_the_key_is_established_and_no_claimant_is_named(scene):
  """A thief presenting copies of the owner's proof and commitment, the owner presenting no commitment, was named."""
  _, files, root, thief_key = scene
  later = json.loads(open(files["owner_commitment"]).read())
  thief = _write(root / "thief-later.json", _signed(thief_key, dict(later, time="2031-01-01T00:00:00Z")))
  for claims in (
    [("owner", files["owner"]), ("thief", files["copy"], files["owner_commitment"])],
    [("thief", files["copy"], files["owner_commitment"])],  # the owner absent
    [("owner", files["owner"]), ("thief", files["copy"], thief)],
  ):
    findings, verdict, status = settle(files["model"], *claims)
    assert status == 0 and verdict.startswith(f"ESTABLISHED: key {OWNER[:16]}... trained the disputed model"), verdict
    assert "which does not show who holds the key" in verdict and "challenge=TEXT" in verdict, verdict
    assert not any(f.established for f in findings)
  assert by_name(findings)["thief"].commitment.startswith("invalid: signed by key")


def test_a_copied_commitment_names_no_claimant_until_a_challenge_only_the_key_holder_can_answer(scene):
  _, files, root, thief_key = scene
  findings, verdict, status = settle(
    files["model"],
    ("owner", files["owner"], files["owner_commitment"]),
    ("thief", files["copy"], files["owner_commitment"]),
  )
  assert status == 0 and verdict.startswith("ESTABLISHED: key ") and "challenge=TEXT" in verdict, verdict
  assert not any(f.established for f in findings)
  assert "--challenge=TEXT" in cli.in_flags(verdict)  # what experiments.dispute prints
  challenge = "dispute 2031-06-01 #7"
  answer = _write(root / "answer.json", ownership.commit(files["owner"], OWNER_KEY, challenge=challenge))
  with pytest.raises(ownership.DisputeError, match="only the proof's owner can commit"):
    ownership.commit(files["copy"], thief_key, challenge=challenge)
  findings, verdict, status = settle(
    files["model"],
    ("owner", files["owner"], answer),
    ("thief", files["copy"], files["owner_commitment"]),
    challenge=challenge,
  )
  f = by_name(findings)
  assert status == 0 and verdict.startswith("ESTABLISHED: owner (signed this dispute's challenge)"), verdict
  assert f["thief"].commitment.startswith("stale") and not f["thief"].established


def test_times_are_utc_instants_and_only_z_times_are_read(scene, tmp_path):
  _, files, _, thief_key = scene
  record = json.loads(open(files["owner_commitment"]).read())
  for time in (
    "2029-12-31T03:03:48-11:00",
    "2029-12-31T03:03:48+00:00",
    "2029-12-31 03:03:48Z",
    "2029-13-01T00:00:00Z",
  ):
    path = _write(tmp_path / "t.json", _signed(thief_key, dict(record, time=time)))
    with pytest.raises(ownership.DisputeError, match="expected a UTC time"):
      ownership.read_commitment(path)
    os.remove(path)
  assert ownership.read_commitment(files["owner_commitment"])["time"].endswith("Z")


def test_a_proof_cannot_be_moved_to_another_key(scene, copy_of):
  _, files, _, thief_key = scene
  moved = copy_of(files["owner"])
  thief = ownership.public_key_of(thief_key)
  reseal(moved, lambda m: (m["owner"].update(public_key=thief), m["config"].update(owner=thief)))
  with pytest.raises(proof.IntegrityError, match="not the seed bound to owner"):
    proof.validate_manifest(json.loads(open(os.path.join(moved, proof.MANIFEST)).read()))
  program, train = build.rebuild(files["owner"])
  from pol_jax import verifier

  verdict = verifier.verify(moved, program, train, challenge=challenge.All())
  assert not verdict.accepted and verdict.failed[0].name == "integrity", verdict.table()


def test_a_fine_tuned_model_is_reported_as_derived_not_independent(scene):
  v, files, root, _ = scene
  program, _ = build.rebuild(files["finetune"])
  from pol_jax import recorder

  tuned = recorder.final_state(files["finetune"], program, proof.read_manifest(files["finetune"]))
  path = str(root / "tuned.safetensors")
  ownership.export_safetensors(tuned, path)
  findings, verdict, status = settle(path, ("owner", files["owner"]), ("fine-tuner", files["finetune"]))
  f = by_name(findings)
  assert status == 1 and "NOT ESTABLISHED" in verdict
  assert f["fine-tuner"].model == "equal" and f["fine-tuner"].origin == "derived from owner's final state"
  assert f["owner"].model == "different"


@pytest.mark.parametrize("fmt", ["model", "msgpack"])
def test_exported_models_match_their_proof_and_one_changed_weight_does_not(scene, fmt, tmp_path):
  _, files, _, _ = scene
  findings, _, status = settle(files[fmt], ("owner", files["owner"]))
  assert status == 0 and findings[0].model == "equal", findings[0]
  kind, arrays = ownership.load_model(files[fmt])
  name = next(k for k in sorted(arrays) if k.startswith("params/"))
  arrays[name] = arrays[name].copy()
  arrays[name].flat[0] = np.nextafter(arrays[name].flat[0], np.inf)
  changed = str(tmp_path / "changed.safetensors")
  from safetensors.numpy import save_file

  save_file(arrays, changed)
  findings, verdict, status = settle(changed, ("owner", files["owner"]))
  assert status == 1 and findings[0].model == "different" and name in findings[0].model_detail, verdict


def test_the_model_may_be_the_proof_itself_or_its_final_checkpoint_directory(scene):
  _, files, _, _ = scene
  final = os.path.join(files["owner"], proof.CHECKPOINTS, str(proof.read_json(
    os.path.join(files["owner"], proof.MANIFEST), proof.MANIFEST)["steps"]))  # fmt: skip
  _, exported = ownership.load_model(files["model"])
  for model in (files["owner"], final):
    fmt, arrays = ownership.load_model(model)
    ours = {k: v for k, v in arrays.items() if k.split("/", 1)[0] in ownership.MODEL_PARTS}
    assert fmt == "orbax" and ours.keys() == exported.keys(), model
    assert all(ours[k].tobytes() == exported[k].tobytes() for k in ours), model
  findings, verdict, status = settle(final, ("owner", files["owner"]))
  assert status == 0 and findings[0].model == "equal", verdict


def test_a_lower_precision_release_matches_after_the_stated_cast(scene, tmp_path):
  v, files, _, _ = scene
  import jax
  import ml_dtypes

  half = v.stolen.replace(params=jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), v.stolen.params))
  path = str(tmp_path / "bf16.safetensors")
  ownership.export_safetensors(half.replace(model_state=v.stolen.model_state), path)
  findings, _, status = settle(path, ("owner", files["owner"]))
  assert status == 0 and findings[0].model == "equal-after-cast" and "bfloat16" in findings[0].model_detail


def test_a_forged_signature_and_a_commitment_to_another_root_are_caught(scene, tmp_path):
  _, files, _, _ = scene
  record = json.loads(open(files["owner_commitment"]).read())
  forged = dict(record, signature=("00" if record["signature"][:2] != "00" else "11") + record["signature"][2:])
  backdated = dict(record, time="2001-01-01T00:00:00Z")  # an edited time breaks the signature too
  claims = []
  for name, rec in (("forged", forged), ("backdated", backdated)):
    claims.append((name, files["owner"], _write(tmp_path / f"{name}.json", rec)))
  # A valid signature by the owner's key over the spoof's root (the spoof is bound to it), attached to the proof.
  resigned = ownership.commit(files["spoof"], OWNER_KEY)
  claims.append(("resigned", files["owner"], _write(tmp_path / "resigned.json", resigned)))
  f = by_name(settle(files["model"], *claims)[0])
  for name in ("forged", "backdated"):
    assert f[name].commitment.startswith("invalid: the signature does not verify"), f[name]
  assert f["resigned"].commitment == "invalid: its proof root is not this proof's"
  assert ownership.check_signature(record) is None


def test_bad_input_is_reported_per_claimant_and_the_dispute_goes_on(scene, tmp_path):
  _, files, _, _ = scene
  mlp_dir = str(tmp_path / "mlp")
  from conftest import record as record_proof

  record_proof(mlp_dir, smoke_config("mlp"))
  garbage = tmp_path / "garbage.json"
  garbage.write_text("{not json")
  f = by_name(
    settle(
      files["model"],
      ("owner", files["owner"], str(garbage)),
      ("other-model", mlp_dir),
      ("missing-commitment", files["owner"], str(tmp_path / "nope.json")),
    )[0]
  )
  # A claim whose commitment does not hold up is reported, verified as far as it goes, and not established.
  assert f["owner"].commitment.startswith("unreadable") and f["owner"].verified and not f["owner"].established
  assert f["other-model"].model == "mismatch" and "do not match" in f["other-model"].model_detail
  assert (
    f["missing-commitment"].commitment.startswith("unreadable") and "not found" in f["missing-commitment"].commitment
  )


def test_dispute_cli_reports_and_exits_0_or_2(scene, tmp_path):
  _, files, root, _ = scene
  won = run_cli(
    "experiments.dispute",
    f"--model={files['model']}",
    f"--claim=owner:{files['owner']}:{files['owner_commitment']}",
    f"--claim=spoofer:{files['spoof']}",
    f"--report={tmp_path / 'report.json'}",
  )
  assert won.returncode == 0 and "ESTABLISHED: key " in won.stdout, won.stdout + won.stderr
  assert json.loads((tmp_path / "report.json").read_text())["status"] == 0
  unusable = run_cli("experiments.dispute", f"--model={tmp_path / 'none.safetensors'}", f"--claim=a:{files['owner']}")
  assert unusable.returncode == 2 and "not found" in unusable.stderr and "Traceback" not in unusable.stderr


def test_a_recorded_state_inside_a_batch_is_loaded_by_its_step_and_an_old_proof_is_named(scene, tmp_path):
  _, files, _, _ = scene
  owner = files["owner"]
  manifest = proof.read_json(os.path.join(owner, proof.MANIFEST), proof.MANIFEST)
  step = int(manifest["k"])  # a state inside the batch that ends at the last step
  program, _ = build.rebuild(owner)
  template = training.to_host(program.init(training.derive_keys(manifest["seed"]).init))
  state, _ = store.restore(owner, step, template, manifest["checkpoints"][str(step)])
  fmt, arrays = ownership.load_model(os.path.join(owner, proof.CHECKPOINTS, str(step)))
  assert fmt == "orbax" and ownership.compare(arrays, state)[0] == "equal"
  with pytest.raises(ownership.DisputeError, match="no recorded state at step"):
    ownership.load_model(os.path.join(owner, proof.CHECKPOINTS, str(manifest["steps"] + 1)))
  old = str(tmp_path / "old")
  shutil.copytree(owner, old)
  reseal(old, lambda body: body.update(schema="pol-jax/proof/v3"))
  with pytest.raises(ownership.DisputeError, match=r"schema 'pol-jax/proof/v3' is not supported .*'pol-jax/proof/v4'"):
    ownership.load_model(os.path.join(old, proof.CHECKPOINTS, str(step)))
  # A batch whose (resealed) layout claims a leaf of 10^18 elements is refused in one line, nothing allocated.
  huge = str(tmp_path / "huge")
  shutil.copytree(owner, huge)
  meta_path = os.path.join(huge, proof.CHECKPOINTS, str(manifest["steps"]), "meta", "metadata")
  with open(meta_path) as f:
    meta = json.load(f)
  meta["layout"][1][2] = [10**9, 10**9]
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  reseal(huge, lambda body: None)
  with pytest.raises(ownership.DisputeError, match="layout sizes .* do not match the stored buffers"):
    ownership.load_model(huge)


# ------------------------------------------------------------------ hostile commitments and model files


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
  error = within(lambda: ownership.read_commitment(path), path)
  check_one_line(error, ownership.DisputeError, path, words)


def test_orbax_model_declaring_a_huge_array_is_refused_before_restoring(tmp_path):
  """In a child limited to 3 GiB of address space: restoring it would allocate 14.4 GB (it aborted)."""
  path = str(tmp_path / "model")
  huge_orbax_model(path)
  assert sum(safeio.walk(path).values()) < 2000
  result = run_limited("from pol_jax import ownership\nownership.load_model(sys.argv[1])", path, "DisputeError")
  assert result.returncode == 2, result.stdout + result.stderr[-2000:]
  assert "w declares shape (60000, 60000)" in result.stdout, result.stdout


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
  result = run_limited("from pol_jax import ownership\nownership.load_model(sys.argv[1])", path, "DisputeError")
  assert result.returncode == 2 and len(result.stdout.splitlines()) == 1, result.stdout + result.stderr[-2000:]
  assert words in result.stdout, result.stdout


def test_a_model_file_naming_one_path_twice_is_refused(tmp_path):
  """A loader that kept one of two arrays of one path compared other weights than a program reading the file."""
  from flax import serialization
  from safetensors.numpy import save_file

  w, v = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
  path = str(tmp_path / "aliased.msgpack")  # flax reads the nested w; a flat key "convs/w" aliased it
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize({"params": {"convs": {"w": w}, "convs/w": v}}))
  with pytest.raises(ownership.DisputeError, match=r"keys are not distinct strings without '/'"):
    ownership.load_model(path)
  path = str(tmp_path / "aliased.safetensors")
  save_file({"params.convs.w": w, "params/convs/w": v}, path)
  with pytest.raises(ownership.DisputeError, match=r"two arrays name 'params/convs/w'"):
    ownership.load_model(path)


def test_a_msgpack_model_of_more_arrays_than_the_limit_is_refused_while_it_is_unpacked(tmp_path, monkeypatch):
  from flax import serialization

  monkeypatch.setattr(ownership, "MAX_MODEL_ARRAYS", 100)
  path = str(tmp_path / "many.msgpack")
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize({"params": {f"w{i}": float(i) for i in range(300)}}))
  with pytest.raises(ownership.DisputeError, match=r"over 100 arrays in the msgpack tree"):
    ownership.load_model(path)


def test_orbax_chunks_larger_than_their_arrays_count_against_the_model_limit(tmp_path, monkeypatch):
  """A chunk may exceed its array, and TensorStore reads a whole chunk: four 2x3 arrays in 30000x30000 chunks took 7 GB."""
  import tensorstore as ts

  path = str(tmp_path / "model")
  ocp.PyTreeCheckpointer().save(path, {"params": {f"w{i}": np.ones((2, 3), np.float32) for i in range(2)}})
  kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{path}/"}).result()
  for i in range(2):
    key = f"params.w{i}/.zarray".encode()
    kv.write(key, json.dumps({**json.loads(kv.read(key).result().value), "chunks": [40, 40]}).encode()).result()
  del kv
  monkeypatch.setattr(ownership, "MAX_MODEL_BYTES", 10_000)  # each 6400-byte chunk fits; the two do not
  with pytest.raises(ownership.DisputeError, match=r"params/w1 declares shape \(2, 3\) in chunks \(40, 40\)"):
    ownership.load_model(path)


def test_only_a_float_export_dtype_is_a_lower_precision_release():
  """All-True bools matched every proof with non-zero weights "after casting"."""
  import types

  state = types.SimpleNamespace(**{part: {} for part in ownership.MODEL_PARTS})
  state.params = {"w": np.full((2, 3), 0.5, np.float32)}
  assert ownership.compare({"params/w": np.ones((2, 3), bool)}, state)[0] == "mismatch"
  assert ownership.compare({"params/w": np.zeros((2, 3), np.int8)}, state)[0] == "mismatch"
  assert ownership.compare({"params/w": np.full((2, 3), 0.5, np.float16)}, state)[0] == "equal-after-cast"


def test_a_key_file_is_read_without_following_links_or_opening_fifos(tmp_path):
  path = str(tmp_path / "owner.key")
  ownership.new_key(path)
  os.symlink(path, str(tmp_path / "link.key"))
  os.mkfifo(str(tmp_path / "fifo.key"))
  for name, words in (("link.key", "a symbolic link, refused"), ("fifo.key", "a FIFO, refused")):
    error = within(lambda n=name: ownership.load_key(str(tmp_path / n)), str(tmp_path / "fifo.key"))
    check_one_line(error, ownership.DisputeError, name, words)
  os.symlink(str(tmp_path / "victim"), str(tmp_path / "new.key.pub"))  # a planted .pub is never written through
  with pytest.raises(ownership.DisputeError, match=r"new\.key\.pub: already there"):
    ownership.new_key(str(tmp_path / "new.key"))
  assert not os.path.exists(tmp_path / "victim")
