"""Verification: honest proofs pass; each tampering is caught by the named check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, batch_path, load_manifest, reseal, run_cli, smoke_config

from experiments import forge
from pol_jax import build, challenge, data, fingerprint, proof, store, training, verifier


def _verify(proof_dir: str, dataset: data.Dataset | None = None, strategy: str = "all") -> verifier.Verdict:
  from ml_collections import ConfigDict

  config = ConfigDict(load_manifest(proof_dir)["config"])
  train = build.dataset(config, "train") if dataset is None else dataset
  # Rebuilt from the recorded config, as the CLI does (builder=): a program that differs shows the proof false.
  return verifier.verify(
    proof_dir, build.program(config, train), train, challenge=challenge.from_name(strategy), builder=build.BUILDER
  )


def _verify_own_program(proof_dir: str) -> verifier.Verdict:
  """Verifies with the verifier's own smoke program and no builder=, as a library user may."""
  config = smoke_config()
  train = build.dataset(config, "train")
  return verifier.verify(proof_dir, build.program(config, train), train, challenge=challenge.All())


def _check_rejected_by(verdict: verifier.Verdict, check: str, words: str = "") -> None:
  assert not verdict.accepted, verdict.table()
  failed = [c.name for c in verdict.failed]
  assert failed and failed[0] == check, verdict.table()
  assert words in verdict.failed[0].detail, verdict.table()


@pytest.mark.parametrize("strategy", ["top-q+uniform", "fiat-shamir", "uniform", "top-q", "all"])
def test_every_strategy_accepts_the_honest_proof(honest, strategy):
  from ml_collections import ConfigDict

  config = ConfigDict(load_manifest(honest)["config"])
  train = build.dataset(config, "train")
  verdict = verifier.verify(
    honest, build.program(config, train), train, challenge=challenge.from_name(strategy, n=2, seed=3)
  )
  assert verdict.accepted, verdict.table()
  chosen = [s.index for s in verdict.segments]
  if strategy == "top-q":  # One epoch: per metric the largest update, united over the four metrics.
    everything = verifier.verify(honest, build.program(config, train), train, challenge=challenge.All()).segments
    assert max(everything, key=lambda s: s.update["l2"]).index in chosen
    assert 1 <= len(chosen) <= 3
  else:
    assert len(chosen) == {"top-q+uniform": 3, "fiat-shamir": 2, "uniform": 2, "all": 3}[strategy]


def test_the_default_draw_is_top_q_and_uniform_from_a_fresh_verifier_seed_that_the_verdict_reports(honest):
  from ml_collections import ConfigDict

  from pol_jax import challenge

  config = ConfigDict(load_manifest(honest)["config"])
  train = build.dataset(config, "train")
  program = build.program(config, train)
  first = verifier.verify(honest, program, train, challenge=challenge.TopQUniform(n=2))
  assert first.strategy == challenge.DEFAULT and first.seed is not None and first.accepted
  seeds = {first.seed} | {
    verifier.verify(honest, program, train, challenge=challenge.TopQUniform(n=2)).seed for _ in range(2)
  }
  assert len(seeds) == 3, "the default seed must be fresh for every verification"
  drawn = verifier.verify(honest, program, train, challenge=challenge.Uniform(n=2, seed=first.seed))
  again = verifier.verify(honest, program, train, challenge=challenge.Uniform(n=2, seed=first.seed))
  assert [s.index for s in again.segments] == [s.index for s in drawn.segments]
  assert 2 in [s.index for s in drawn.segments]  # the last of 3 segments is always drawn
  # One false segment among the 2 others: a draw of 2 (the last and one more) misses it half the time.
  assert drawn.one_false_segment_passes == 0.5
  assert f"verifier seed {first.seed}" in drawn.summary() and "probability >= 0.500" in drawn.summary()
  assert first.to_json()["seed"] == first.seed and drawn.to_json()["guarantee"]["drawn"] == 1


def _flip_array_byte(proof_dir: str, step: int) -> None:
  """Flips one byte inside the stored data of the arrays of the batch that holds ``step``."""
  data_dir = os.path.join(proof_dir, batch_path(proof_dir, step), "state", "ocdbt.process_0", "d")
  name = max(os.listdir(data_dir), key=lambda n: os.path.getsize(os.path.join(data_dir, n)))
  path = os.path.join(data_dir, name)
  raw = bytearray(open(path, "rb").read())
  raw[len(raw) // 2] ^= 0x01
  open(path, "wb").write(bytes(raw))


def test_flipped_byte_in_a_checkpoint_array(honest, copy_of):
  p = copy_of(honest)
  _flip_array_byte(p, 8)
  _check_rejected_by(_verify(p), "integrity", f"checkpoint batch 12: {batch_path(p, 8)}/state/")


def _swap_index_rows(p: str, a: int, b: int) -> np.ndarray:
  log = np.load(os.path.join(p, proof.INDICES), allow_pickle=False).copy()
  log[[a, b]] = log[[b, a]]
  np.save(os.path.join(p, proof.INDICES), log, allow_pickle=False)
  return log


def test_swapped_index_rows_unsealed(honest, copy_of):
  p = copy_of(honest)
  _swap_index_rows(p, 2, 5)
  _check_rejected_by(_verify(p), "integrity", "indices.npy")


def test_swapped_index_rows_resealed(honest, copy_of):
  p = copy_of(honest)
  log = _swap_index_rows(p, 2, 5)
  reseal(p, lambda b: b["indices"].update(sha256=proof.leaf_digest("indices", log)))
  _check_rejected_by(_verify(p), "data order", "first step 2")


def test_learning_rate_edited_unsealed(honest, copy_of):
  p = copy_of(honest)
  manifest = load_manifest(p)
  manifest["config"]["learning_rate"] = 0.2
  proof.write_json_atomic(os.path.join(p, proof.MANIFEST), manifest)
  _check_rejected_by(_verify(p), "integrity", "root")


def test_learning_rate_edited_resealed(honest, copy_of):
  p = copy_of(honest)
  reseal(p, lambda b: b["config"].update(learning_rate=0.2))
  _check_rejected_by(_verify(p), "program", "is not the one its recorded config builds (first difference at line")


def test_config_edited_resealed_own_program(honest, copy_of):
  """A verifier given its program (builder=None) checks that program, and says the config was not checked."""
  p = copy_of(honest)
  reseal(p, lambda b: b["config"].update(momentum="not a float"))
  verdict = _verify_own_program(p)
  assert verdict.accepted, verdict.table()
  program = next(c for c in verdict.checks if c.name == "program")
  assert verifier.CONFIG_UNCHECKED in program.detail and "unchecked" in verdict.table()
  with pytest.raises(proof.ProofError, match="config.momentum"):  # rebuilt from the config: refused
    build.rebuild(p)


def test_learning_rate_edited_with_matching_program_digest(honest, copy_of):
  """A forger who also records the edited program's digest is caught by replay."""
  from ml_collections import ConfigDict

  from pol_jax import training

  p = copy_of(honest)
  config = ConfigDict(load_manifest(p)["config"])
  config.learning_rate = 0.2
  train = build.dataset(config, "train")
  program = build.program(config, train)
  plan = build.plan(config)
  keys = training.derive_keys(plan.seed)
  segment = training.make_segment(program.step, plan.runner)
  digests = fingerprint.program_digests(segment, training.to_host(program.init(keys.init)), train, plan, keys.step)
  reseal(p, lambda b: (b["config"].update(learning_rate=0.2), b.update(programs=digests)))
  _check_rejected_by(_verify(p), "replay", "does not reproduce")


def _splice(p: str, source: str, step: int) -> None:
  """Puts ``source``'s batch that holds ``step`` in place of ``p``'s."""
  shutil.rmtree(os.path.join(p, batch_path(p, step)))
  shutil.copytree(os.path.join(source, batch_path(source, step)), os.path.join(p, batch_path(source, step)))


def _splice_resealed(p: str, source: str, step: int) -> None:
  """Splices ``source``'s state at ``step`` in and records its digest, as a forger would."""
  program, _ = build.rebuild(source)
  manifest = load_manifest(source)
  template = training.to_host(program.init(training.derive_keys(manifest["seed"]).init))
  state, meta = store.restore(source, step, template, manifest["checkpoints"][str(step)])
  forge.replace_checkpoint(p, state, meta.get("fingerprints"))


def test_spliced_checkpoint_unsealed(honest, other_seed, copy_of):
  p = copy_of(honest)
  _splice(p, other_seed, 8)
  # the first file unlike the listing
  _check_rejected_by(_verify(p), "integrity", f"checkpoint batch 12: {batch_path(p, 8)}/")


def test_spliced_checkpoint_resealed(honest, other_seed, copy_of):
  p = copy_of(honest)
  _splice_resealed(p, other_seed, 8)
  _check_rejected_by(_verify(p), "replay", "segment 1 (steps 4-8)")


def test_initial_state_not_derived_from_the_seed(honest, other_seed, copy_of):
  p = copy_of(honest)
  _splice_resealed(p, other_seed, 0)
  _check_rejected_by(_verify(p), "init", "not the seed's initialisation")


def test_changed_example_in_the_verifiers_data(honest):
  from ml_collections import ConfigDict

  config = ConfigDict(load_manifest(honest)["config"])
  train = build.dataset(config, "train")
  used = int(np.load(os.path.join(honest, proof.INDICES))[0, 0])
  inputs = train.inputs.copy()
  inputs[used, 3, 3, 0] ^= 1
  changed = data.Dataset(train.name, inputs, train.labels)
  _check_rejected_by(_verify(honest, changed), "data", f"first index {used}")


def test_environment_mismatch_is_undecided_and_reported_field_by_field(honest, copy_of):
  p = copy_of(honest)
  reseal(p, lambda b: b["environment"].update(jax="0.0.1", cpu_threads=96))
  verdict = _verify(p)
  assert verdict.status == "undecided" and not verdict.failed, verdict.table()
  environment = next(c for c in verdict.checks if c.name == "environment")
  assert environment.passed is None and "jax: proof '0.0.1'" in environment.detail
  assert "cpu_threads: proof 96" in environment.detail
  assert {r["field"]: r["how"].split(":")[0] for r in verdict.reproduction}["jax"] == "not reproduced"
  assert verdict.segments == [], "no replay may decide on a mismatched environment"
  assert verdict.summary().startswith("UNDECIDED by the environment check")


def test_partial_proof_is_never_accepted(honest, copy_of):
  from ml_collections import ConfigDict

  config = ConfigDict(load_manifest(honest)["config"])
  train = build.dataset(config, "train")
  p = copy_of(honest)
  os.remove(os.path.join(p, proof.MANIFEST))
  open(os.path.join(p, proof.RUN), "w").write("{}")
  with pytest.raises(proof.ProofError, match="partial proof"):
    verifier.verify(p, build.program(config, train), train)
  result = run_cli("experiments.verify", f"--proof={p}")
  assert result.returncode == 2 and "partial proof" in result.stderr, result.stderr


def test_a_leaf_changed_at_one_step_is_named_with_its_step(tmp_path):
  """A forger changes one leaf after step 6 inside segment 4-8 and records the true fingerprints
  of its own run: the verifier names step 6 and that leaf."""
  import jax
  from conftest import record

  from experiments.forge import replace_checkpoint
  from pol_jax import training

  p = str(tmp_path / "proof")
  record(p, smoke_config("cnn"))
  program, train = build.rebuild(p)
  manifest = load_manifest(p)
  plan = proof.Plan.from_manifest(manifest)
  keys = training.derive_keys(plan.seed)
  template = training.to_host(program.init(keys.init))
  state, _ = store.restore(p, 4, template, manifest["checkpoints"]["4"])
  log = proof.read_index_log(p, manifest)
  segment = training.make_segment(program.step, "loop")
  state, first = segment.run(state, train.batch(log[4:6]), keys.step)
  leaf = (
    "params/head/bias"
    if "params/head/bias" in proof.leaf_digests(template)
    else sorted(proof.leaf_digests(template))[-1]
  )
  names = dict((proof.path_str(n), i) for i, (n, _) in enumerate(proof.flatten(template)))
  leaves = jax.tree.leaves(training.to_host(state))
  leaves[names[leaf]] = leaves[names[leaf]] + np.float32(1e-3)
  state = jax.tree.unflatten(jax.tree.structure(template), leaves)
  fingerprints = np.array(first[training.STATE_FINGERPRINT])
  fingerprints[1] = np.asarray(training.state_fingerprint(state))  # the changed state's, after step 6
  state, rest = segment.run(state, train.batch(log[6:8]), keys.step)
  fingerprints = np.concatenate([fingerprints, np.asarray(rest[training.STATE_FINGERPRINT])])
  replace_checkpoint(p, training.to_host(state), fingerprints)
  verdict = _verify(p)
  _check_rejected_by(verdict, "replay", "segment 1 (steps 4-8)")
  bad = next(s for s in verdict.segments if s.index == 1)
  assert (bad.diverged_step, bad.diverged_leaf) == (6, leaf), bad
  assert f"first diverged at step 6 in {leaf}" in verdict.failed[0].detail


def test_cnn_loop_runner_proof_verifies_with_batchnorm_statistics(tmp_path):
  from conftest import record

  config = smoke_config("cnn")
  p = str(tmp_path / "proof")
  record(p, config)
  verdict = _verify(p)
  assert verdict.accepted, verdict.table()
  leaves = store.read_meta(p, 12, None)["leaves"]
  assert any(path.startswith("model_state/") and "mean" in path for path in leaves), sorted(leaves)


def test_sampled_integrity_checks_the_arrays_replay_uses(honest, copy_of):
  from ml_collections import ConfigDict

  p = copy_of(honest)
  _flip_array_byte(p, 8)
  config = ConfigDict(load_manifest(p)["config"])
  train = build.dataset(config, "train")
  program = build.program(config, train)
  full = verifier.verify(p, program, train, challenge=challenge.FiatShamir(n=1))
  assert [c.name for c in full.failed] == ["integrity"], full.table()
  chosen = verifier.challenge.including_last(3, 1, lambda c, m: verifier.challenge.fiat_shamir(c, m, full.root))
  sampled = verifier.verify(p, program, train, challenge=challenge.FiatShamir(n=1), integrity="sampled")
  if 8 in {4 * chosen[0], 4 * chosen[0] + 4}:
    assert [c.name for c in sampled.failed] == ["integrity"], sampled.table()
  else:  # The damaged checkpoint is not used by the sampled segment, as documented.
    assert sampled.accepted, sampled.table()
  every = verifier.verify(p, program, train, challenge=challenge.All(), integrity="sampled")
  _check_rejected_by(every, "integrity", f"checkpoint batch 12: {batch_path(p, 8)}/state/")


@pytest.mark.parametrize("strategy", ["all", "top-q+uniform", "uniform"])
def test_each_batch_is_restored_once_and_replay_uses_the_checked_states(honest, monkeypatch, strategy):
  reads = []
  restore_batch = store.restore_batch
  monkeypatch.setattr(store, "restore_batch", lambda *a, **k: reads.append(a[1]) or restore_batch(*a, **k))
  monkeypatch.setattr(store, "restore", lambda *a, **k: pytest.fail("a state was restored a second time"))
  verdict = _verify(honest, strategy=strategy)
  assert verdict.accepted, verdict.table()
  assert sorted(reads) == store.batches(honest), reads  # the integrity pass, once per batch; replay reads nothing


def test_a_state_missing_from_its_batch_is_named(honest, copy_of):
  p = copy_of(honest)
  path = os.path.join(p, batch_path(p, 8), "meta", "metadata")
  meta = json.load(open(path))
  del meta["states"]["8"]
  open(path, "w").write(json.dumps(meta))
  reseal(p, lambda body: None)
  _check_rejected_by(_verify(p), "integrity", f"checkpoint 8: not in {batch_path(p, 8)}, the batch that must hold it")


def test_sampled_integrity_reads_each_batch_the_chosen_segments_use_once(honest, monkeypatch):
  from ml_collections import ConfigDict

  reads = []
  restore_batch = store.restore_batch
  monkeypatch.setattr(store, "restore_batch", lambda *a, **k: reads.append(a[1]) or restore_batch(*a, **k))
  config = ConfigDict(load_manifest(honest)["config"])
  train = build.dataset(config, "train")
  verdict = verifier.verify(honest, build.program(config, train), train, challenge=challenge.All(), integrity="sampled")
  assert verdict.accepted, verdict.table()
  assert sorted(reads) == store.batches(honest), reads


def test_settings_are_typed_values_and_impossible_ones_are_refused_before_any_work(tmp_path):
  from pol_jax import replay

  nowhere = str(tmp_path / "no proof here")  # the settings are refused before the proof is read
  with pytest.raises(TypeError, match="Expected challenge=All"):
    verifier.verify(nowhere, None, None, challenge="all")
  with pytest.raises(TypeError, match="Expected replay=Exact"):
    verifier.verify(nowhere, None, None, replay="tolerance")
  with pytest.raises(ValueError, match=r"replay=Tolerance\(delta=None\): tolerance mode needs a delta"):
    verifier.verify(nowhere, None, None, replay=replay.Tolerance())
  with pytest.raises(
    ValueError, match=r"asked for 4096 devices, .*; pass Exact\(devices=N\) or Tolerance\(devices=N\)"
  ):
    verifier.verify(nowhere, None, None, replay=replay.Exact(devices=4096))
  with pytest.raises(ValueError, match="Expected integrity 'full' or 'sampled'"):
    verifier.verify(nowhere, None, None, integrity="most")


_VERIFY_IN_LIBRARY = """
import sys, pol_jax
from pol_jax import build
program, train = build.rebuild(sys.argv[1])
verdict = pol_jax.verify(sys.argv[1], program, train, challenge=pol_jax.All(), builder=build.BUILDER)
print(verdict.summary())
print(verdict.table())
"""


def test_a_proof_recorded_with_x64_is_judged_by_workers_with_x64_not_by_this_processs_lowering(tmp_path, copy_of):
  # x64 changes the lowered program text and the seed's data order: a library verifier whose process
  # has x64 off once rejected an honest x64 proof by the program check. The text is not comparable
  # here; the order is derived in a child with the prover's x64, the program checked and the segments
  # replayed in workers with it.
  def run(*args, x64):
    env = {**os.environ, "JAX_ENABLE_X64": "1" if x64 else "0"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

  config = ["--config=experiments/configs/default.py:smoke", "--config.model=mlp", "--config.runner=scan"]
  trained = run("-m", "experiments.train", *config, f"--workdir={tmp_path}", x64=True)
  assert trained.returncode == 0, trained.stderr
  honest = str(tmp_path / "proof")
  assert load_manifest(honest)["environment"]["x64"] is True
  verified = run("-c", _VERIFY_IN_LIBRARY, honest, x64=False)
  assert verified.stdout.startswith("ACCEPTED"), verified.stdout + verified.stderr
  assert "its x64 differs from the prover's" in verified.stdout, verified.stdout
  assert "derived with x64 True, as recorded" in verified.stdout, verified.stdout
  forged = copy_of(honest)
  reseal(forged, lambda b: b["config"].update(learning_rate=b["config"]["learning_rate"] * 2))
  rejected = run("-c", _VERIFY_IN_LIBRARY, forged, x64=False)
  assert rejected.stdout.startswith("REJECTED by the program check: the recorded program is not the one its "), (
    rejected.stdout + rejected.stderr
  )


@pytest.mark.parametrize("value", ["yes", None, 1])
def test_a_manifest_whose_x64_is_not_a_bool_is_refused_naming_the_field(honest, copy_of, value):
  """A null x64 once kept the data order check from running, and tolerance mode accepted a forged order."""
  p = copy_of(honest)
  reseal(p, lambda b: b["environment"].update(x64=value))
  with pytest.raises(proof.ProofError, match=r"^manifest\.json: environment\.x64: expected bool, got "):
    _verify_own_program(p)


def test_an_environment_of_the_wrong_shape_is_one_line_and_exit_2(honest, copy_of):
  p = copy_of(honest)
  reseal(p, lambda b: b.update(environment=["cpu"]))
  done = run_cli("experiments.verify", f"--proof={p}")
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
  assert "manifest.json: environment: expected dict, got list" in done.stderr, done.stderr[-2000:]
  q = copy_of(honest)
  reseal(q, lambda b: b["environment"].update(cpu_threads=[2]))
  with pytest.raises(proof.ProofError, match=r"environment\.cpu_threads: expected a count"):
    _verify_own_program(q)


def test_only_the_checks_a_replay_decides_may_stay_undecided_in_an_accepted_verdict():
  def decide(undecided, skipped=frozenset()):
    checks = {name: verifier.Check(name, None if name in undecided else True, "") for name in verifier.CHECKS}
    return verifier._decide(verifier.Verdict(False, "tolerance", "all", None, [], [], 1), checks, skipped).accepted

  assert decide(set()) and decide({"environment", "program"})
  for name in ("integrity", "init", "data order", "data", "progress", "replay"):
    assert not decide({name}), name
  assert not decide({"replay", "program"})  # nothing decided the program
  assert decide({"data order", "progress"}, frozenset({"data order", "progress"}))  # the paper's verifier


def test_a_chunk_shape_edited_inside_the_state_store_is_rejected_not_an_abort(cnn_proof, copy_of):
  """The array's shape left as declared, its zarr chunks 2^30 elements wide: TensorStore allocated a chunk and aborted (std::bad_alloc)."""
  import tensorstore as ts

  p = copy_of(cnn_proof)
  batch = store.batches(p)[-1]
  kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{p}/checkpoints/{batch}/state/"}).result()
  meta = json.loads(kv.read(b"float32/.zarray").result().value)
  kv.write(b"float32/.zarray", json.dumps({**meta, "chunks": [meta["shape"][0], 1 << 30]}).encode()).result()
  del kv
  reseal(p, lambda body: None)
  done = run_cli("experiments.verify", f"--proof={p}")
  assert done.returncode == 1, (done.returncode, done.stdout[-500:], done.stderr[-1500:])
  assert done.stdout.startswith("REJECTED by the integrity check: ") and "float32/.zarray is not" in done.stdout


@pytest.mark.parametrize("integrity", ["full", "sampled"])
def test_a_batch_listing_states_the_manifest_does_not_record_is_rejected_before_its_rows_are_read(
  honest, copy_of, integrity
):
  """Unrecorded entries are never digested, yet every read of the batch allocated a row for each."""
  p = copy_of(honest)
  path = os.path.join(p, batch_path(p, 0), "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  first = min(meta["states"], key=int)
  for step in range(1, int(max(meta["states"], key=int))):
    meta["states"].setdefault(str(step), {**meta["states"][first], "step": step})
  with open(path, "w") as f:
    json.dump(meta, f)
  reseal(p, lambda body: None)
  config = smoke_config()
  train = build.dataset(config, "train")
  verdict = verifier.verify(p, build.program(config, train), train, challenge=challenge.All(), integrity=integrity)
  _check_rejected_by(verdict, "integrity", f"lists {len(meta['states'])} states, the manifest records ")


def test_an_empty_directory_named_by_a_step_takes_no_state_from_its_batch(honest, copy_of):
  """No file digest covers an empty directory: anyone could add one to an honest proof, which stays accepted."""
  p = copy_of(honest)
  os.mkdir(os.path.join(p, proof.CHECKPOINTS, "0"))
  verdict = _verify_own_program(p)
  assert verdict.accepted, verdict.table()
