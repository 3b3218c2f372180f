"""Ownership disputes: the owner with an honest proof and commitment wins; thieves, copiers, spoofers lose."""

from __future__ import annotations

import datetime
import json
import os
import shutil

import numpy as np
import pytest
from conftest import run_cli, smoke_config

from experiments import attack, build
from pol_jax import ownership, proof

LATER = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
EARLIER = datetime.datetime(2029, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
  """An owner (the attack module's victim), a copier, a spoofer and a fine-tuner, with their files."""
  root = tmp_path_factory.mktemp("dispute")
  v = attack.victim(smoke_config("cnn"), str(root))
  owner_key = ownership.load_key(_new_key(root / "owner.key"))
  thief_key = ownership.load_key(_new_key(root / "thief.key"))
  files = {"owner": v.proof_dir}
  files["owner_commitment"] = _write(root / "owner.json", ownership.commit(v.proof_dir, owner_key, now=EARLIER))
  files["copy"] = str(root / "copy")
  shutil.copytree(v.proof_dir, files["copy"])
  files["copy_commitment"] = _write(root / "copy.json", ownership.commit(files["copy"], thief_key, now=LATER))
  files["spoof"] = attack.spoof("infinitesimal-update", v, str(root))["proof"]
  files["finetune"] = attack.spoof("retrain-stolen", v, str(root))["proof"]
  files["model"] = str(root / "model.safetensors")
  ownership.export_safetensors(v.stolen, files["model"])
  files["msgpack"] = str(root / "model.msgpack")
  ownership.export_msgpack(v.stolen, files["msgpack"])
  return v, files, root


def _new_key(path) -> str:
  ownership.new_key(str(path))
  return str(path)


def _write(path, record) -> str:
  proof.write_json_atomic(str(path), record)
  return str(path)


def settle(model, *claims):
  return ownership.settle(model, [ownership.Claim(*c) for c in claims], build.rebuild)


def by_name(findings):
  return {f.name: f for f in findings}


def test_the_owner_wins_against_no_proof_a_later_copy_a_spoof_and_a_fine_tune(scene):
  _, files, root = scene
  findings, verdict, status = settle(
    files["model"],
    ("owner", files["owner"], files["owner_commitment"]),
    ("no-proof", str(root / "nothing")),
    ("copier", files["copy"], files["copy_commitment"]),
    ("spoofer", files["spoof"]),
    ("fine-tuner", files["finetune"]),
  )
  f = by_name(findings)
  assert status == 0 and verdict.startswith("ESTABLISHED: owner"), verdict
  assert f["owner"].established and f["owner"].model == "equal" and f["owner"].origin == "seed"
  assert f["owner"].commitment == "valid"
  assert not f["no-proof"].usable and "no such proof directory" in f["no-proof"].reason
  # The copy verifies and ends on the model, but its commitment is later: it is reported as a copy.
  assert f["copier"].verified and f["copier"].commitment == "valid" and not f["copier"].established
  assert "a copy of owner's proof" in f["copier"].note
  # The spoof claims the very model but fails our checks.
  assert f["spoofer"].model == "equal" and not f["spoofer"].verified and "init" in f["spoofer"].failed_checks
  # The fine-tuner's honest proof replays, but starts from the owner's model.
  assert f["fine-tuner"].failed_checks == ["init"] and f["fine-tuner"].model == "different"
  assert f["fine-tuner"].origin == "derived from owner's final state"


def test_a_fine_tuned_model_is_reported_as_derived_not_independent(scene):
  v, files, root = scene
  program, _ = build.rebuild(files["finetune"])
  from pol_jax import recorder, verify

  tuned = recorder.final_state(files["finetune"], program, verify.read_manifest(files["finetune"]))
  path = str(root / "tuned.safetensors")
  ownership.export_safetensors(tuned, path)
  findings, verdict, status = settle(path, ("owner", files["owner"]), ("fine-tuner", files["finetune"]))
  f = by_name(findings)
  assert status == 1 and "NOT ESTABLISHED" in verdict
  assert f["fine-tuner"].model == "equal" and f["fine-tuner"].origin == "derived from owner's final state"
  assert f["owner"].model == "different"


@pytest.mark.parametrize("fmt", ["model", "msgpack"])
def test_exported_models_match_their_proof_and_one_changed_weight_does_not(scene, fmt, tmp_path):
  _, files, _ = scene
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


def test_a_lower_precision_release_matches_after_the_stated_cast(scene, tmp_path):
  v, files, _ = scene
  import jax
  import ml_dtypes

  half = v.stolen.replace(params=jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), v.stolen.params))
  path = str(tmp_path / "bf16.safetensors")
  ownership.export_safetensors(half.replace(model_state=v.stolen.model_state), path)
  findings, _, status = settle(path, ("owner", files["owner"]))
  assert status == 0 and findings[0].model == "equal-after-cast" and "bfloat16" in findings[0].model_detail


def test_a_forged_signature_and_a_commitment_to_another_root_are_caught(scene, tmp_path):
  _, files, _ = scene
  record = json.loads(open(files["owner_commitment"]).read())
  forged = dict(record, signature=("00" if record["signature"][:2] != "00" else "11") + record["signature"][2:])
  backdated = dict(record, time="2001-01-01T00:00:00Z")  # an edited time breaks the signature too
  elsewhere = json.loads(open(files["copy_commitment"]).read())
  spoof_root = proof.read_json(os.path.join(files["spoof"], proof.MANIFEST), "m")["root"]
  other = dict(elsewhere, proof_root=spoof_root)
  claims = []
  for name, rec in (("forged", forged), ("backdated", backdated), ("other-root", other)):
    claims.append((name, files["owner"], _write(tmp_path / f"{name}.json", rec)))
  key = ownership.load_key(_new_key(tmp_path / "k"))
  resigned = ownership.commit(
    files["spoof"], key
  )  # a valid signature over the spoof's root, attached to the owner's proof
  claims.append(("resigned", files["owner"], _write(tmp_path / "resigned.json", resigned)))
  f = by_name(settle(files["model"], *claims)[0])
  for name in ("forged", "backdated"):
    assert f[name].commitment.startswith("invalid: the signature does not verify"), f[name]
  assert f["other-root"].commitment.startswith("invalid"), f["other-root"]
  assert f["resigned"].commitment == "invalid: its proof root is not this proof's"
  assert ownership.check_signature(record) is None


def test_bad_input_is_reported_per_claimant_and_the_dispute_goes_on(scene, tmp_path):
  _, files, _ = scene
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
  _, files, root = scene
  won = run_cli(
    "experiments.dispute",
    f"--model={files['model']}",
    f"--claim=owner:{files['owner']}:{files['owner_commitment']}",
    f"--claim=spoofer:{files['spoof']}",
    f"--report={tmp_path / 'report.json'}",
  )
  assert won.returncode == 0 and "ESTABLISHED: owner" in won.stdout, won.stdout + won.stderr
  assert json.loads((tmp_path / "report.json").read_text())["status"] == 0
  unusable = run_cli("experiments.dispute", f"--model={tmp_path / 'none.safetensors'}", f"--claim=a:{files['owner']}")
  assert unusable.returncode == 2 and "not found" in unusable.stderr and "Traceback" not in unusable.stderr
