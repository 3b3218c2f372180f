"""Benchmark: ``python -m experiments.benchmark [--config=...] [--devices=N] [--out=FILE.json]``.

Measures, in one run on one machine (medians over ``--repeats``; the timings
of each repeat run back to back, so machine noise hits all of them alike):

* recording overhead: the wall time of ``record`` over the wall time of the
  same jitted segments over the same batches writing nothing (both include
  compiling the step once);
* verification throughput of every segment (``all``), in replayed steps per
  second, for sequential exact replay (one device), device-parallel exact
  replay (``--devices``) and vmapped tolerance replay, with each one's ratio to
  the training step rate and to sequential exact replay;
* the cost of verifying with each strategy (every check included) as a
  fraction of the cost of training without a proof;
* proof bytes per training step, and the verifier's peak resident memory
  (``experiments.verify --strategy=all`` in a child process).

``--step_time=N`` only times N training steps of the config (for the paper's
ResNets on a machine without CIFAR: random images of the same shape).

On CPU, ``--devices=N`` (default 2) makes XLA expose N host devices; it is set
before JAX starts, for the prover and the verifiers alike.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import build

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")


def _plain_training(config, train, plan) -> float:
  """Seconds to run the run's segments through a fresh runner, writing nothing."""
  import jax

  from experiments import build
  from pol_jax import recorder, sampling, training

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


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def _verifier_peak_rss_mib(proof_dir: str) -> float:
  """Peak RSS of ``experiments.verify --strategy=all`` run as a child process."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run(
    [sys.executable, "-m", "experiments.verify", f"--proof={proof_dir}", "--strategy=all", "--devices=1"],
    cwd=root,
    env=env,
    capture_output=True,
    check=False,
  )
  after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return max(after, before) / 1024


def measure(config, repeats: int = 3, devices: int = 2, chunk: int = 16, segments: int = 8) -> dict:
  """Runs the benchmark for one config; returns the figures as a dict."""
  import jax

  from experiments import build
  from pol_jax import proof, recorder, tolerance
  from pol_jax import verify as verify_lib

  train = build.dataset(config, "train")
  plan = build.plan(config)
  devices = min(devices, jax.local_device_count())
  chunk = max(devices, chunk // devices * devices)
  loose = tolerance.Tolerance({"l2": 1e300}, source="benchmark: timing only")
  modes = {
    "exact, 1 device": dict(devices=1),
    f"exact, {devices} devices": dict(devices=devices),
    f"vmapped x{chunk}, {devices} devices": dict(devices=devices, mode="tolerance", tolerance=loose, chunk=chunk),
  }
  strategies = {
    "fiat-shamir": dict(strategy="fiat-shamir", num_segments=segments),
    "uniform": dict(strategy="uniform", num_segments=segments, seed=0),
    "top-q": dict(strategy="top-q", q=1),
    "all": dict(strategy="all"),
  }
  t: dict[str, list[float]] = {"train": [], "record": []}
  size, steps_replayed = 0, {}
  _plain_training(config, train, plan)  # Warm-up: JAX's backend start-up is nobody's cost.
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(repeats):
      t["train"].append(_plain_training(config, train, plan))
      path = os.path.join(tmp, f"proof{r}")
      seconds, _ = _timed(lambda p=path: recorder.record(p, build.program(config, train), train, plan))
      t["record"].append(seconds)
      size = proof.size_bytes(path)
      program = build.program(config, train)
      for name, kwargs in modes.items():
        if r == 0:  # Compile outside the timing: a verifier checks many proofs per process.
          verify_lib.verify(path, program, train, strategy="fiat-shamir", num_segments=devices, **kwargs)
        seconds, verdict = _timed(
          lambda k=kwargs, p=path, g=program: verify_lib.verify(p, g, train, strategy="all", **k)
        )
        if not verdict.accepted:
          raise RuntimeError(f"benchmark proof rejected ({name}): {verdict.summary()}")
        t.setdefault(f"verify all: {name}", []).append(seconds)
      for name, kwargs in strategies.items():
        seconds, verdict = _timed(
          lambda k=kwargs, p=path, g=program: verify_lib.verify(p, g, train, devices=devices, **k)
        )
        t.setdefault(f"strategy: {name}", []).append(seconds)
        steps_replayed[name] = sum(s.end - s.start for s in verdict.segments)
    peak = _verifier_peak_rss_mib(path)
  med = {name: statistics.median(v) for name, v in t.items()}
  train_rate = plan.steps / med["train"]
  replay = {}
  sequential = med["verify all: exact, 1 device"]
  for name in modes:
    seconds = med[f"verify all: {name}"]
    replay[name] = {
      "seconds": seconds,
      "steps_per_second": plan.steps / seconds,
      "to_training": (plan.steps / seconds) / train_rate,
      "to_sequential_exact": sequential / seconds,
    }
  return {
    "config": config.to_dict(),
    "steps": plan.steps,
    "k": plan.k,
    "runner": plan.runner,
    "repeats": repeats,
    "devices": devices,
    "timings": t,
    "train_seconds": med["train"],
    "record_seconds": med["record"],
    "recording_overhead": med["record"] / med["train"],
    "train_steps_per_second": train_rate,
    "verify_all": replay,
    "strategy_cost": {
      name: {
        "seconds": med[f"strategy: {name}"],
        "fraction_of_training": med[f"strategy: {name}"] / med["train"],
        "steps_replayed": steps_replayed[name],
      }
      for name in strategies
    },
    "proof_bytes": size,
    "proof_bytes_per_step": size / plan.steps,
    "verifier_peak_rss_mib": peak,
  }


SHAPES = {
  "digits": (8, 8, 1),
  "mnist": (28, 28, 1),
  "fashion_mnist": (28, 28, 1),
  "cifar10": (32, 32, 3),
  "cifar100": (32, 32, 3),
}


def step_time(config, steps: int = 10) -> dict:
  """Median seconds per training step of a config, on its data or on random images of its shape.

  Times ``steps`` steps after two warm-up steps (compilation), each synced
  with ``block_until_ready``: one jitted step for the ``loop`` runner, one
  ``lax.scan`` over ``steps`` batches for ``scan`` (its time divided by
  ``steps``). When the config's TFDS data is not prepared here, random
  uint8 images of the dataset's shape stand in: a step's time does not
  depend on the pixel values. No proof is written.
  """
  import jax
  import numpy as np

  from pol_jax import data, sampling, training

  try:
    train = build.dataset(config, "train")
    source = train.name
  except build.ConfigError:
    shape = SHAPES[config.dataset]
    rng = np.random.default_rng(0)
    n = max(config.batch_size * 4, 512)
    classes = data.TFDS_DATASETS.get(config.dataset, 10)
    train = data.Dataset(
      "synthetic", rng.integers(0, 256, (n, *shape), np.uint8), rng.integers(0, classes, n).astype(np.int64)
    )
    source = f"random uint8 images {shape} ({config.dataset} is not prepared here)"
  plan = build.plan(config)
  program = build.program(config, train)
  keys = training.derive_keys(plan.seed)
  state = program.init(keys.init)
  log = sampling.index_log(keys.order, len(train), plan.batch_size, steps + 2)
  segment = training.make_segment(program.step, plan.runner)
  times = []
  if plan.runner == "loop":
    for i in range(steps + 2):
      batch = train.batch(log[i])
      t0 = time.perf_counter()
      state, _ = segment.compiled(state, batch, keys.step)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t0)
    times = times[2:]
  else:
    batches = train.batch(log[:steps])
    for _ in range(3):
      t0 = time.perf_counter()
      out, _ = segment.run(state, batches, keys.step)
      jax.block_until_ready(out)
      times.append((time.perf_counter() - t0) / steps)
    times = times[1:]
  return {
    "model": config.model,
    "runner": plan.runner,
    "batch_size": plan.batch_size,
    "augment": config.get("augment", "none"),
    "data": source,
    "steps_timed": steps,
    "median_step_seconds": statistics.median(times),
    "step_seconds": times,
  }


def table(result: dict) -> str:
  c = result["config"]
  width = f"widths {tuple(c['widths'])}" if c["model"] == "cnn" else f"features {tuple(c['features'])}"
  lines = [
    f"{c['model']} ({width}), {result['runner']} runner, T={result['steps']}, k={result['k']}, B={c['batch_size']}",
    f"  train without proof {result['train_seconds']:.2f} s ({result['train_steps_per_second']:.0f} steps/s), "
    f"record with proof {result['record_seconds']:.2f} s: overhead {result['recording_overhead']:.3f}x",
    f"  proof {result['proof_bytes'] / 1e6:.2f} MB, {result['proof_bytes_per_step']:.0f} bytes/step; "
    f"verifier peak RSS {result['verifier_peak_rss_mib']:.0f} MiB",
    "",
    f"  {'verify all segments':<32} {'seconds':>8} {'steps/s':>8} {'x training':>10} {'x sequential':>12}",
  ]
  for name, r in result["verify_all"].items():
    lines.append(
      f"  {name:<32} {r['seconds']:>8.2f} {r['steps_per_second']:>8.0f} {r['to_training']:>10.2f} "
      f"{r['to_sequential_exact']:>12.2f}"
    )
  lines += [
    "",
    f"  {'strategy (exact, ' + str(result['devices']) + ' devices)':<32} {'steps':>8} {'seconds':>8} "
    f"{'of training':>11}",
  ]
  for name, r in result["strategy_cost"].items():
    lines.append(f"  {name:<32} {r['steps_replayed']:>8} {r['seconds']:>8.2f} {r['fraction_of_training']:>11.2f}")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  build.set_deterministic_flags()  # before JAX starts a backend
  if "device_count" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts a backend
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES.value}"
    ).strip()
  from pol_jax import fingerprint

  try:
    if _STEP_TIME.value:
      result = step_time(_CONFIG.value, _STEP_TIME.value)
      print(
        f"{result['model']}, {result['runner']} runner, batch {result['batch_size']}, augment {result['augment']}, "
        f"on {result['data']}: {result['median_step_seconds']:.3f} s per step (median of {result['steps_timed']})"
      )
      if _OUT.value:
        with open(_OUT.value, "w") as f:
          json.dump(result, f, indent=1)
      return
    result = measure(_CONFIG.value, _REPEATS.value, _DEVICES.value, _CHUNK.value, _SEGMENTS.value)
  except build.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  env = fingerprint.environment()
  result["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), **env}
  print(
    f"pol-jax benchmark: {env['device_kind']} x{env['device_count']}, {env['cpu_threads']} CPU threads, "
    f"jax {env['jax']}; medians of {result['repeats']}\n"
  )
  print(table(result))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  # Flags exist only when this module runs as a program, so the experiments modules can be
  # imported together as libraries (the notebook does).
  _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Config to benchmark.")
  _REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats per timing (medians are reported).", lower_bound=1)
  _DEVICES = flags.DEFINE_integer(
    "devices", 2, "Devices for parallel replay (CPU: forced host devices).", lower_bound=1
  )
  _CHUNK = flags.DEFINE_integer("chunk", 16, "Segments per vmapped call.", lower_bound=1)
  _SEGMENTS = flags.DEFINE_integer("segments", 8, "n for the uniform and fiat-shamir strategies.", lower_bound=1)
  _OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
  _STEP_TIME = flags.DEFINE_integer(
    "step_time",
    0,
    "Only time this many training steps of the config (random images if its data is absent).",
    lower_bound=0,
  )
  app.run(main, flags_parser=build.parse_flags)
