"""experiments/benchmark.py: the step time (random images where the data is absent) and the measured figures."""

from __future__ import annotations

import pytest
from conftest import OWNER

from experiments.configs import cifar10_resnet20


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


def test_measure_times_recording_and_replay_against_the_compiled_training_step():
  from experiments import benchmark
  from experiments.configs import default

  config = default.get_config("smoke")
  config.owner = OWNER
  result = benchmark.measure(config, repeats=1, devices=1, brief=True, pairs=1)
  assert len(result["timings"]["train"]) == len(result["timings"]["record"]) == 1
  # Ratios are the median of each repeat's own ratio (one repeat here: that repeat's).
  assert result["recording_overhead"] == result["record_seconds"] / result["train_seconds"] > 0
  assert result["recording_overhead_per_repeat"] == [result["recording_overhead"]]
  # The step time replay is compared with excludes the first segment (it compiles the step).
  assert 0 < result["train_step_seconds"] * (result["steps"] - result["k"]) < result["train_seconds"]
  assert list(result["verify_all"]) == ["exact, 1 device"]  # brief, and one device: no vmapped replay
  exact = result["verify_all"]["exact, 1 device"]
  assert exact["step_seconds"] == exact["seconds"] / result["steps"]
  assert exact["to_training_step"] == exact["step_seconds"] / result["train_step_seconds"]
  assert exact["to_training_step_per_repeat"] == [exact["to_training_step"]]
  # The replay alone (the segments' own times) and the rest add up to the verification.
  assert 0 < exact["replay_step_seconds"] * result["steps"] < exact["seconds"]
  assert exact["fixed_seconds"] == pytest.approx(exact["seconds"] - exact["replay_step_seconds"] * result["steps"])
  assert list(result["strategy_cost"]) == ["top-q+uniform (default)"]
  assert result["strategy_cost"]["top-q+uniform (default)"]["steps_replayed"] == result["steps"]
  assert "overhead" in benchmark.table(result) and "x train step" in benchmark.table(result)


def test_a_short_run_is_timed_in_several_pairs_a_long_one_in_one():
  from experiments import benchmark

  assert [benchmark.pairs_per_repeat(s) for s in (0.3, 1.1, 2.5, 4.0, 9.0)] == [5, 5, 3, 2, 1]
