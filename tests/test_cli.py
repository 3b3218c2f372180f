"""The experiments' command lines: flags, output, exit status 0/1/2 and one-line errors.

One section per command (``python -m experiments.<name>``), after the flag
handling they share (``experiments/cli.py``). Tests that run a command only as
the way to get a process of their own (pinned to a core, killed, with other
versions) stay with the module they test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import (
  ROOT,
  huge_orbax_model,
  load_manifest,
  ocdbt_data_file,
  plant_fifo,
  reseal,
  run_cli,
)

from experiments import cli
from pol_jax import fingerprint, proof


def _check_cli_refuses(result, *words: str, status=(1, 2)) -> None:
  assert result.returncode in status, f"exit {result.returncode}: {result.stdout[-500:]} {result.stderr[-2000:]}"
  assert "Traceback" not in result.stderr, result.stderr
  if result.returncode == 2:
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  for word in words:
    assert word in result.stdout + result.stderr, result.stdout + result.stderr


# ------------------------------------------------------------------ what every command shares (experiments/cli.py)


def test_deterministic_gpu_flags_and_the_cpu_speed_flags_are_added_once():
  assert cli.deterministic_xla_flags("--xla_foo=1", has_cuda=False) == "--xla_foo=1"
  flags = cli.deterministic_xla_flags("--xla_foo=1", has_cuda=True)
  assert flags == "--xla_foo=1 --xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0"
  assert cli.deterministic_xla_flags(flags, has_cuda=True) == flags
  assert "--xla_gpu_autotune_level=2" in cli.deterministic_xla_flags("--xla_gpu_autotune_level=2", True)
  speed = fingerprint.CPU_SPEED_FLAGS
  assert cli.deterministic_xla_flags("", False, speed=speed) == " ".join(speed)
  assert cli.deterministic_xla_flags("--xla_cpu_experimental_ynn_fusion_type=", False, speed=speed).count("ynn") == 1
  assert all(f.split("=")[0] in fingerprint.REPRODUCIBLE_FLAGS for f in speed)  # a verifier sets them again


def test_every_cli_pins_the_cpu_isa():
  assert fingerprint.cpu_isa_flag("x86_64") == "--xla_cpu_max_isa=AVX2"
  assert fingerprint.cpu_isa_flag("aarch64") == "--xla_cpu_max_isa=NEON"
  flags = cli.deterministic_xla_flags("--xla_foo=1", has_cuda=False, isa=fingerprint.cpu_isa_flag("x86_64"))
  assert flags == "--xla_foo=1 --xla_cpu_max_isa=AVX2"
  assert cli.deterministic_xla_flags("--xla_cpu_max_isa=AVX512", False, "--xla_cpu_max_isa=AVX2").count("isa") == 1
  assert fingerprint.reproducible_flags({"xla_flags": flags.replace("--xla_foo=1 ", "")}) == "--xla_cpu_max_isa=AVX2"


@pytest.mark.parametrize("module", ["experiments.train", "experiments.attack", "experiments.reproduce"])
def test_an_unknown_override_without_config_is_one_line_too(tmp_path, module):
  result = run_cli(module, "--config.lr=0.1", f"--workdir={tmp_path}")
  assert result.returncode == 2 and result.stderr.strip() == "error: --config.lr: the config has no field 'lr'", (
    result.stderr
  )


# ------------------------------------------------------------------ experiments.train


def test_train_cli_prints_steps_size_root_and_accuracy(tmp_path):
  result = run_cli("experiments.train", "--config=experiments/configs/default.py:smoke", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  root = load_manifest(str(tmp_path / "proof"))["root"]
  assert "recorded 12 steps" in result.stdout and f"root:   {root}" in result.stdout
  assert "bytes/step" in result.stdout and "held-out accuracy" in result.stdout


@pytest.mark.parametrize(
  "args, words",
  [
    (
      ["--config=experiments/configs/cifar10_resnet20.py:smoke", "--data_dir=/nonexistent"],
      "config.dataset: TFDS dataset 'cifar10' (split 'train') is not prepared in /nonexistent",
    ),
    (["--config.dataset=imagenet"], "config.dataset: unknown dataset 'imagenet' (known: digits, cifar10"),
    (["--config.model=vgg"], "config.model: unknown model 'vgg' (known: mlp, cnn, resnet20"),
    (["--config.learning_rate=abc"], "flag --config.learning_rate=abc: could not convert string to float"),
    (["--config.lr=0.1"], "--config.lr: the config has no field 'lr'"),
    (["--config.k=0"], "config.k: Expected 1 <= k <= steps=12, got k=0."),
    (["--config.runner=eager"], "config.runner: unknown runner 'eager' (known: scan, loop)"),
  ],
)
def test_bad_config_fails_before_training_with_one_line(tmp_path, args, words):
  if not args[0].startswith("--config="):
    args = ["--config=experiments/configs/default.py:smoke", *args]
  result = run_cli("experiments.train", *args, f"--workdir={tmp_path}")
  assert result.returncode == 2, result.stdout + result.stderr
  assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  assert not os.path.exists(tmp_path / "proof")


# ------------------------------------------------------------------ a user's own program (--program)


@pytest.mark.parametrize("example", ["nnx_tutorial", "linen_flax_style"])
def test_flax_style_examples_record_and_verify_from_the_cli(tmp_path, example):
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "examples"), os.environ.get("PYTHONPATH", "")]),
  }

  def cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True)

  trained = cli(
    "experiments.train", f"--program={example}:build", f"--config=examples/{example}.py",
    "--config.steps=60", f"--workdir={tmp_path}",
  )  # fmt: skip
  assert trained.returncode == 0 and "WARNING" not in trained.stderr, trained.stderr
  verified = cli("experiments.verify", f"--proof={tmp_path}/proof", f"--program={example}:build")
  assert verified.returncode == 0 and verified.stdout.startswith("ACCEPTED: 3 of 3"), verified.stdout + verified.stderr
  assert "WARNING" not in verified.stderr, verified.stderr


def _cli(module: str, *args: str):
  """``python -m module args`` with ``tests/`` on the path, where the package ``user_project`` lives."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_a_third_party_verifies_a_user_programs_proof_with_one_command_naming_the_program(tmp_path):
  config = f"--config={ROOT}/tests/user_project/config.py"
  trained = _cli("experiments.train", "--program=user_project:build", config, f"--workdir={tmp_path}")
  assert trained.returncode == 0, trained.stderr
  path = str(tmp_path / "proof")
  assert proof.read_manifest(path)["builder"] == {"target": "user_project:build", "version": None}
  unnamed = _cli("experiments.verify", f"--proof={path}")  # the proof names its builder; it is never imported
  assert unnamed.returncode == 2 and unnamed.stderr.strip().splitlines() == [
    "error: manifest.json: builder: recorded by user_project:build (version None); install that package and pass "
    "--program=user_project:build (pol-jax never imports code a proof names)"
  ], unnamed.stderr
  named = _cli("experiments.verify", f"--proof={path}", "--program=user_project:build", "--strategy=all")
  assert named.returncode == 0 and named.stdout.startswith("ACCEPTED: 3 of 3 segments"), named.stdout + named.stderr
  missing = _cli("experiments.verify", f"--proof={path}", "--program=no_such_project:build")
  assert missing.returncode == 2 and "--program: builder 'no_such_project:build': cannot import it" in missing.stderr
  # A proof whose recorded program is not the one its recorded config builds (trained at another learning
  # rate, the manifest resealed to claim this one) is false: exit 1, with the first differing line.
  reseal(path, lambda m: m["config"].update(learning_rate=0.02))
  tampered = _cli("experiments.verify", f"--proof={path}", "--program=user_project:build", "--strategy=all")
  assert tampered.returncode == 1, tampered.stdout + tampered.stderr
  assert tampered.stdout.startswith(
    "REJECTED by the program check: the recorded segment program is not the one its "
    "recorded config builds (first difference at line"
  ), tampered.stdout


# ------------------------------------------------------------------ experiments.verify


def test_honest_proof_is_accepted_by_a_verifier_in_another_process(honest, tmp_path):
  report = tmp_path / "report.json"
  result = run_cli("experiments.verify", f"--proof={honest}", "--strategy=all", f"--report={report}")
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.startswith("ACCEPTED: 3 of 3 segments")
  verdict = json.loads(report.read_text())
  assert verdict["accepted"] and all(c["passed"] for c in verdict["checks"])
  assert [s["distance"]["l2"] for s in verdict["segments"]] == [0.0, 0.0, 0.0]
  assert all(s["update"]["l2"] > 0 for s in verdict["segments"])


@pytest.mark.parametrize("which, status", [("honest", 0), ("missing", 2)])
def test_a_reader_that_leaves_early_never_changes_the_exit_status(honest, tmp_path, which, status):
  """``experiments.verify ... | head``: the pipe's reader gone before the verdict is printed (a
  BrokenPipeError once made an accepted proof exit 1, the status of a rejected one)."""
  p = honest if which == "honest" else str(tmp_path / "nowhere")
  child = subprocess.Popen(
    [sys.executable, "-m", "experiments.verify", f"--proof={p}", f"--report={tmp_path}/r.json"],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  try:
    child.stdout.close()  # both readers leave before the verifier writes a byte
    child.stderr.close()
    assert child.wait(timeout=300) == status
  finally:
    child.kill()
  if status == 0:
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "accepted"


@pytest.mark.parametrize(
  "damage, words",
  [
    ("missing", "not found"),
    ("unparseable", "manifest.json: json: does not parse"),
    (
      "schema",  # a proof in the previous layout (one checkpoint per state)
      "manifest.json: schema: proof schema 'pol-jax/proof/v3' is not supported (this pol-jax reads 'pol-jax/proof/v4')",
    ),
    ("model", "manifest.json: config.model: unknown model 'resnet9000' (known: mlp, cnn, resnet20"),
    ("steps", "manifest.json: steps: expected an integer"),
    ("truncated", "indices.npy"),
  ],
)
def test_bad_input_gives_one_line_and_exit_status(honest, copy_of, tmp_path, damage, words):
  p = copy_of(honest)
  m = os.path.join(p, proof.MANIFEST)
  if damage == "missing":
    p = str(tmp_path / "nowhere")
  elif damage == "unparseable":
    open(m, "w").write('{"schema": "pol-jax/proof/v1", ')
  elif damage == "schema":
    reseal(p, lambda b: b.update(schema="pol-jax/proof/v3"))
  elif damage == "model":
    reseal(p, lambda b: b["config"].update(model="resnet9000"))
  elif damage == "steps":
    reseal(p, lambda b: b.update(steps="12"))
  elif damage == "truncated":
    path = os.path.join(p, proof.INDICES)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-7])
  result = run_cli("experiments.verify", f"--proof={p}")
  expected_status = 1 if damage == "truncated" else 2
  assert result.returncode == expected_status, result.stdout + result.stderr
  out = result.stderr if expected_status == 2 else result.stdout
  assert words in out, out
  assert "Traceback" not in result.stderr, result.stderr
  if expected_status == 2:
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_exits_2_when_the_environment_cannot_replay_exactly(honest, copy_of):
  p = copy_of(honest)
  reseal(p, lambda b: b["environment"].update(jaxlib="9.9.9", machine="riscv64"))
  result = run_cli("experiments.verify", f"--proof={p}")
  assert result.returncode == 2, result.stdout + result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert "exact replay needs the prover's hardware" in result.stderr
  assert "jaxlib: proof '9.9.9'" in result.stderr and "machine: proof 'riscv64'" in result.stderr


def test_version_mismatch_is_undecided_never_rejected(honest, copy_of, tmp_path):
  p = copy_of(honest)
  reseal(p, lambda b: b["environment"].update(jax="0.0.1", jaxlib="0.0.1"))
  done = run_cli("experiments.verify", f"--proof={p}", f"--report={tmp_path}/r.json", timeout=600)
  assert done.returncode == 2, done.stdout + done.stderr
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["status"] == "undecided"
  checks = {c["name"]: c["passed"] for c in report["checks"]}
  assert checks["environment"] is None and checks["program"] is not False, checks
  assert "--env=match" in done.stderr


def test_verify_cli_refuses_a_huge_model_with_one_line_and_max_params_is_the_verifiers(honest, copy_of):
  forged = copy_of(honest)
  reseal(forged, lambda m: m["config"].update(features=[100_000_000]))
  t0 = time.perf_counter()
  result = run_cli("experiments.verify", f"--proof={forged}", "--strategy=all")
  assert result.returncode == 2 and time.perf_counter() - t0 < 60, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "parameters is over this verifier's limit" in lines[0], result.stderr
  small = run_cli("experiments.verify", f"--proof={honest}", "--strategy=all", "--max_params=1000")
  assert small.returncode == 2 and "over this verifier's limit of 1,000" in small.stderr, small.stderr


def test_tolerance_mode_accepts_the_honest_proof_with_the_calibrated_delta(cnn_proof, calibration):
  path, _ = calibration
  result = run_cli(
    "experiments.verify",
    f"--proof={cnn_proof}",
    "--mode=tolerance",
    f"--calibration={path}",
    "--strategy=all",
    "--chunk=3",
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.startswith("ACCEPTED in tolerance mode: 6 of 6 segments within delta")
  assert f"calibrated in {path}: 10.0x the honest noise of 6 segments" in result.stdout


def test_tolerance_mode_serves_a_different_environment_when_asked(cnn_proof, calibration, copy_of):
  path, _ = calibration
  p = copy_of(cnn_proof)
  reseal(p, lambda b: b["environment"].update(jax="0.0.1"))
  assert run_cli("experiments.verify", f"--proof={p}").returncode == 2
  result = run_cli("experiments.verify", f"--proof={p}", "--mode=tolerance", f"--calibration={path}", "--chunk=4")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "differs (jax: proof '0.0.1'" in result.stdout and "tolerance mode decides by distance" in result.stdout


@pytest.mark.parametrize(
  "args, words",
  [
    (["--mode=tolerance"], "--mode=tolerance needs a delta"),
    (["--mode=tolerance", "--delta=l2=1e-3", "--chunk=1000000000"], "pass --chunk="),
    (["--mode=tolerance", "--delta=l7=1"], "Expected delta for metrics among"),
    (["--delta=l2=1"], "apply to --mode=tolerance only"),
    (["--devices=64"], "asked for 64 devices, this process has 1"),
  ],
)
def test_bad_tolerance_requests_get_one_line(cnn_proof, args, words):
  result = run_cli("experiments.verify", f"--proof={cnn_proof}", *args)
  assert result.returncode == 2, result.stdout + result.stderr
  assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("target", ["manifest", "ocdbt data"])
def test_fifo_in_the_proof_cli(honest, copy_of, target):
  p = copy_of(honest)
  rel = proof.MANIFEST if target == "manifest" else ocdbt_data_file(p)
  plant_fifo(p, rel)
  result = run_cli("experiments.verify", f"--proof={p}", "--strategy=all", timeout=60)
  _check_cli_refuses(result, rel, "a FIFO", status=(2,))


def test_hostile_json_manifest_cli(honest, copy_of):
  p = copy_of(honest)
  open(os.path.join(p, proof.MANIFEST), "w").write("[" * 100_000 + "]" * 100_000)
  result = run_cli("experiments.verify", f"--proof={p}", "--strategy=all", timeout=60)
  _check_cli_refuses(result, "manifest.json: json: nested 100000 levels deep", status=(2,))


def test_extra_file_cli_exits_1(honest, copy_of):
  p = copy_of(honest)
  open(os.path.join(p, "stray.bin"), "wb").write(b"\0" * 10)
  result = run_cli("experiments.verify", f"--proof={p}", "--strategy=all", timeout=60)
  _check_cli_refuses(result, "integrity", "stray.bin: is not in the manifest's file listing", status=(1,))


# ------------------------------------------------------------------ experiments.dispute


def test_dispute_cli_refuses_a_huge_orbax_model_without_aborting(honest, tmp_path):
  path = str(tmp_path / "model")
  huge_orbax_model(path)
  run = (  # `python -m experiments.dispute`, limited as run_limited does, in case the restore is ever reached again
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


# ------------------------------------------------------------------ experiments.reproduce


def test_reproduce_cli_writes_json_and_png_and_rejects_bad_flags(tmp_path):
  out = tmp_path / "r"
  done = run_cli(
    "experiments.reproduce",
    "--config=experiments/configs/digits_mlp.py:smoke",
    f"--workdir={out}",
    "--ks=4",
    "--counts=1",
    "--noprogress",
  )
  assert done.returncode == 0, done.stderr[-2000:]
  with open(out / "reproduce.json") as f:
    result = json.load(f)
  assert result["per_k"]["4"]["summary"]["exact_bitwise"] == 3
  assert (out / "reproduce.png").stat().st_size > 10_000
  again = run_cli("experiments.reproduce", "--config=experiments/configs/digits_mlp.py:smoke", f"--workdir={out}")
  assert again.returncode == 2 and "choose an empty --workdir" in again.stderr, again.stderr
  bad = run_cli("experiments.reproduce", f"--workdir={tmp_path / 'b'}", "--ks=4,x")
  assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--ks" in bad.stderr, bad.stderr


# ------------------------------------------------------------------ experiments.benchmark


def test_the_torch_comparison_says_what_to_install_when_torch_is_absent():
  hide_torch = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['benchmark', '--torch', '--step_time=1']; "
    "runpy.run_module('experiments.benchmark', run_name='__main__', alter_sys=True)"
  )
  done = subprocess.run([sys.executable, "-c", hide_torch], cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 2 and done.stderr.strip().splitlines() == [
    "error: --torch needs PyTorch: pip install 'pol-jax[bench]' (the CPU wheel: pip install torch "
    "--index-url https://download.pytorch.org/whl/cpu)"
  ], done.stderr
