"""Benchmark: ``python -m experiments.benchmark [--config=...] [--repeats=3] [--out=FILE.json]``.

Measures, in one run on one machine (medians over ``--repeats``, the two
timings interleaved so machine noise hits both alike):

* recording overhead: the wall time of ``record`` divided by the wall time of
  the same jitted segments over the same batches, writing nothing (both
  include compiling the step once);
* verification: exact sequential replay of every segment (``strategy=all``),
  as replayed steps per second, its ratio to the training step rate, and the
  whole verification (every check) as a fraction of the recording time;
* proof bytes per training step, and the process's peak resident memory.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import build
from pol_jax import fingerprint, proof, recorder, sampling, training
from pol_jax import verify as verify_lib

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Config to benchmark.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats per timing (medians are reported).", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.")


def _plain_training(config, train, plan) -> float:
  """Seconds to run the run's segments through a fresh runner, writing nothing."""
  t0 = time.perf_counter()
  program = build.program(config, train)
  keys = training.derive_keys(plan.seed)
  segment = training.make_segment(program.step, plan.runner)
  state = training.to_host(program.init(keys.init))
  log = sampling.index_log(keys.order, len(train), plan.batch_size, plan.steps)
  for start, end in recorder.segments(plan):
    state, _ = segment.run(state, train.batch(log[start:end]), keys.step)
  jax.block_until_ready(state)
  return time.perf_counter() - t0


def measure(config, repeats: int = 3) -> dict:
  """Runs the benchmark for one config; returns the figures as a dict."""
  train = build.dataset(config, "train")
  plan = build.plan(config)
  plain, recording, verifying, replaying = [], [], [], []
  size = None
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(repeats):
      plain.append(_plain_training(config, train, plan))
      path = os.path.join(tmp, f"proof{r}")
      t0 = time.perf_counter()
      recorder.record(path, build.program(config, train), train, plan, config=config.to_dict())
      recording.append(time.perf_counter() - t0)
      size = proof.size_bytes(path)
      t0 = time.perf_counter()
      verdict = verify_lib.verify(path, build.program(config, train), train, strategy="all")
      verifying.append(time.perf_counter() - t0)
      if not verdict.accepted:
        raise RuntimeError(f"benchmark proof rejected: {verdict.summary()}")
      replaying.append(sum(s.seconds for s in verdict.segments))
      shutil.rmtree(path)
  med = statistics.median
  train_rate = plan.steps / med(plain)
  replay_rate = plan.steps / med(replaying)
  return {
    "config": {k: v for k, v in config.to_dict().items()},
    "steps": plan.steps,
    "k": plan.k,
    "runner": plan.runner,
    "repeats": repeats,
    "train_seconds": plain,
    "record_seconds": recording,
    "verify_seconds": verifying,
    "replay_seconds": replaying,
    "recording_overhead": med(recording) / med(plain),
    "train_steps_per_second": train_rate,
    "replay_steps_per_second": replay_rate,
    "replay_to_train_rate": replay_rate / train_rate,
    "verify_seconds_per_replayed_step": med(verifying) / plan.steps,
    "verify_cost_fraction_all": med(verifying) / med(recording),
    "proof_bytes": size,
    "proof_bytes_per_step": size / plan.steps,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def table(result: dict) -> str:
  med = statistics.median
  rows = [
    ("model / runner", f"{result['config']['model']} / {result['runner']}, T={result['steps']}, k={result['k']}"),
    ("train, no proof (s)", f"{med(result['train_seconds']):.2f}"),
    ("record with proof (s)", f"{med(result['record_seconds']):.2f}"),
    ("recording overhead", f"{result['recording_overhead']:.2f}x"),
    (
      "exact replay (steps/s)",
      f"{result['replay_steps_per_second']:.0f} ({result['replay_to_train_rate']:.2f}x training)",
    ),
    ("verify all, per step (ms)", f"{1e3 * result['verify_seconds_per_replayed_step']:.2f}"),
    ("verify all / record", f"{result['verify_cost_fraction_all']:.2f}"),
    ("proof bytes per step", f"{result['proof_bytes_per_step']:.0f}"),
    ("peak RSS (MiB)", f"{result['peak_rss_mib']:.0f}"),
  ]
  return "\n".join(f"{name:<27} {value}" for name, value in rows)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  try:
    result = measure(_CONFIG.value, _REPEATS.value)
  except build.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  env = fingerprint.environment()
  result["machine"] = {"platform": platform.platform(), "processor": platform.processor(), **env}
  print(
    f"pol-jax benchmark on {env['device_kind']} ({env['cpu_threads']} CPU threads), jax {env['jax']}, "
    f"medians of {result['repeats']}"
  )
  print(table(result))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
