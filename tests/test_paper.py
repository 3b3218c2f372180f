"""The paper's setting: CIFAR ResNets, TFDS data, deterministic augmentation, configs."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import OWNER, record, run_cli, smoke_config

from experiments.configs import cifar10_resnet20, cifar100_resnet50
from pol_jax import augment, build, challenge, data, proof, verifier
from pol_jax.models import resnet


@pytest.mark.parametrize(
  "name, count",
  [("resnet20", 269722), ("resnet32", 464154), ("resnet44", 658586), ("resnet56", 853018), ("resnet110", 1727962)],
)
def test_cifar_resnets_have_the_papers_sizes(name, count):
  _, init_fn = resnet.build(name)
  params, _ = jax.eval_shape(init_fn, jax.random.key(0))
  # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M parameters.
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == count


@pytest.mark.parametrize("model", ["tiny_resnet20", "tiny_resnet18", "tiny_resnet50"])
def test_every_resnet_records_and_verifies_exactly_with_batchnorm_statistics(tmp_path, model):
  config = smoke_config(model, augment="crop_flip", steps=8, k=4)
  path = str(tmp_path / "proof")
  record(path, config)
  program, train = build.rebuild(path)
  verdict = verifier.verify(path, program, train, challenge=challenge.All())
  assert verdict.accepted, verdict.table()
  stats = [p for p in proof.read_meta(path, 8, None)["leaves"] if p.startswith("model_state/")]
  assert any(p.endswith("/mean") for p in stats) and any(p.endswith("/var") for p in stats), stats


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50"])
def test_no_max_pool_in_the_training_step(name):
  import optax

  from pol_jax import training

  apply_fn, init_fn = resnet.build(name)
  tx = optax.sgd(0.1)
  params, model_state = init_fn(jax.random.key(0))
  state = training.init_state(params, tx, model_state)
  step = training.make_step(apply_fn, training.cross_entropy, tx)
  batch = (np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int32))
  text = jax.jit(step).lower(state, batch, jax.random.key(0)).as_text()
  # Max-pool lowers to reduce_window and its gradient to select_and_scatter (no deterministic GPU kernel).
  assert "reduce_window" not in text and "select_and_scatter" not in text


def test_augmentation_differs_between_steps_and_repeats_for_the_same_key():
  x = np.arange(8 * 6 * 6 * 3, dtype=np.uint8).reshape(8, 6, 6, 3)
  a = np.asarray(augment.crop_and_flip(x, jax.random.key(1), padding=2))
  b = np.asarray(augment.crop_and_flip(x, jax.random.key(1), padding=2))
  c = np.asarray(augment.crop_and_flip(x, jax.random.key(2), padding=2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == x.shape and a.dtype == x.dtype
  for i in range(8):  # every output pixel is an input pixel or padding
    assert set(np.unique(a[i])) <= set(np.unique(x[i])) | {0}


@pytest.mark.parametrize("module", [cifar10_resnet20, cifar100_resnet50])
def test_tfds_path_records_and_verifies_on_mock_data_and_catches_a_changed_example(tmp_path, module):
  with tfds.testing.mock_data(num_examples=64):
    config = module.get_config("smoke")
    train = build.dataset(config, "train")
    assert train.name.startswith(f"tfds/{config.dataset}:") and train.name.endswith(":train")
    path = str(tmp_path / "proof")
    record(path, config)
    program, ours = build.rebuild(path)
    assert verifier.verify(path, program, ours, challenge=challenge.All()).accepted
    used = int(np.load(os.path.join(path, proof.INDICES))[0, 0])
    inputs = ours.inputs.copy()
    inputs[used, 0, 0, 0] ^= 1
    verdict = verifier.verify(path, program, data.Dataset(ours.name, inputs, ours.labels), challenge=challenge.All())
  assert [c.name for c in verdict.failed] == ["data"], verdict.table()


def test_paper_configs_have_the_papers_settings():
  c10, c100 = cifar10_resnet20.get_config(), cifar100_resnet50.get_config()
  for c in (c10, c100):
    assert (c.batch_size, c.momentum, c.k, c.steps, c.schedule) == (128, 0.9, 100, 200 * 390, "step")
    assert c.augment == "crop_flip"
  assert (c10.model, c10.dataset, c10.weight_decay) == ("resnet20", "cifar10", 1e-4)
  assert (c100.model, c100.dataset, c100.weight_decay) == ("resnet50", "cifar100", 5e-4)


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
  ],
)
def test_bad_config_fails_before_training_with_one_line(tmp_path, args, words):
  if not args[0].startswith("--config="):
    args = ["--config=experiments/configs/default.py:smoke", *args]
  result = run_cli("experiments.train", *args, f"--workdir={tmp_path}")
  assert result.returncode == 2, result.stderr
  assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not os.path.exists(tmp_path / "proof")


@pytest.mark.parametrize("module", ["experiments.train", "experiments.attack", "experiments.reproduce"])
def test_an_unknown_override_without_config_is_one_line_too(tmp_path, module):
  result = run_cli(module, "--config.lr=0.1", f"--workdir={tmp_path}")
  assert result.returncode == 2 and result.stderr.strip() == "error: --config.lr: the config has no field 'lr'", (
    result.stderr
  )


def test_step_time_uses_random_images_of_the_shape_when_the_data_is_absent(tmp_path, monkeypatch):
  from experiments import benchmark

  config = cifar10_resnet20.get_config("smoke")
  config.model = "tiny_resnet20"
  config.batch_size = 8
  config.owner = OWNER
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # holds no prepared cifar10
  result = benchmark.step_time(config, steps=2)
  assert "random uint8 images (32, 32, 3)" in result["data"] and "cifar10 is not prepared" in result["data"]
  assert len(result["step_seconds"]) == 2 and all(t > 0 for t in result["step_seconds"])
  assert result["runner"] == "loop" and result["augment"] == "crop_flip"


def test_the_torch_comparison_says_what_to_install_when_torch_is_absent():
  import subprocess
  import sys

  from conftest import ROOT

  hide_torch = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['benchmark', '--torch', '--step_time=1']; "
    "runpy.run_module('experiments.benchmark', run_name='__main__', alter_sys=True)"
  )
  done = subprocess.run([sys.executable, "-c", hide_torch], cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 2 and done.stderr.strip().splitlines() == [
    "error: --torch needs PyTorch: pip install 'pol-jax[bench]' (the CPU wheel: pip install torch "
    "--index-url https://download.pytorch.org/whl/cpu)"
  ], done.stderr
