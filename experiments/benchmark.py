"""Benchmark: ``python -m experiments.benchmark [--config=...] [--devices=N] [--out=FILE.json]``.

Without ``--config`` it measures the default config, then ResNet-20
(:data:`RESNET20`: the paper's model, batch 128, crop and flip, a short run),
then ResNet-20's training step against the official PoL code's PyTorch step
when PyTorch is installed (the ``bench`` extra), all in one run. With
``--config`` it measures that config alone.

Measures, in one run on one machine (medians over ``--repeats``; the timings
of each repeat run back to back, and each ratio is the median of the repeats'
own ratios, so a machine whose speed drifts between repeats moves both sides
of a ratio alike; training and recording alternate which runs first):

* recording overhead: the wall time of ``record`` over the wall time of the
  same jitted segments over the same batches writing nothing (both include
  compiling the step once); a repeat of a run shorter than 6 s times several
  such pairs (``--pairs``; by default about 12 s of them, at most 5) and takes
  the median of their ratios, since one second's run is noisy;
* verification throughput of every segment (``all``), in replayed steps per
  second, for sequential exact replay (one device), device-parallel exact
  replay (``--devices``) and vmapped tolerance replay, with each one's ratio to
  the training step rate and to sequential exact replay; for sequential exact
  replay also the replay alone (the segments' own times) per step against the
  training step, and the rest (restores, the other checks, digest compares);
* the cost of verifying with each strategy (every check included) as a
  fraction of the cost of training without a proof;
* proof bytes per training step, and the verifier's peak resident memory
  (``experiments.verify --strategy=all`` in a child process).

``--step_time=N`` only times N training steps of the config (for the paper's
ResNets on a machine without CIFAR: random images of the same shape).
``--torch`` times them against the official PoL code's PyTorch step
(:mod:`experiments.torch_baseline`), side by side in alternating processes.

On CPU, ``--devices=N`` (default 2) makes XLA expose N host devices; it is set
before JAX starts, for the prover and the verifiers alike.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import cli
from experiments.configs import cifar10_resnet20
from pol_jax import (
  build,
  challenge,
  data,
  fingerprint,
  proof,
  recorder,
  replay,
  sampling,
  tolerance,
  training,
  verifier,
)

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")
_RESNET = os.path.join(os.path.dirname(__file__), "configs", "cifar10_resnet20.py")


def resnet20_config(owner: str):
  """The ResNet-20 run of the default benchmark: the paper's config (batch 128, crop and flip), 3 segments of 8 steps."""
  c = cifar10_resnet20.get_config()
  c.steps, c.k, c.owner = 24, 8, owner
  return c


def _plain_training(config, train, plan, steady: list | None = None) -> float:
  """Seconds to run the run's segments through a fresh runner, writing nothing.

  ``steady``, if given, gets the seconds per step after the first segment (whose
  time includes compiling the step): the step time replay is compared with.
  """
  _collect()
  t0 = time.perf_counter()
  program = build.program(config, train)
  keys = training.derive_keys(plan.seed)
  segment = training.make_segment(program.step, plan.runner)
  state = training.to_host(program.init(keys.init))
  log = sampling.index_log(keys.order, len(train), plan.batch_size, plan.steps)
  bounds = proof.segments(plan)
  for i, (start, end) in enumerate(bounds):
    state, _ = segment.run(state, train.batch(log[start:end]), keys.step)
    if i == 0:
      jax.block_until_ready(state)
      t1 = time.perf_counter()
  jax.block_until_ready(state)
  t2 = time.perf_counter()
  if steady is not None and len(bounds) > 1:
    steady.append((t2 - t1) / (plan.steps - bounds[0][1]))
  return t2 - t0


def _collect() -> None:
  """A full garbage collection before a timed run, so that none lands inside one by chance.

  A full collection of this process's heap (JAX, Flax, the compiled
  programs) costs about a quarter of a second here; Python starts one when
  enough allocations have piled up, which made one repeat's recording (or
  training) a quarter of a second slower at random. ``timeit`` turns the
  collector off for the same reason.
  """
  gc.collect()


def _timed(fn):
  _collect()
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


def measure(
  config,
  repeats: int = 3,
  devices: int = 2,
  chunk: int = 16,
  segments: int = 8,
  brief: bool = False,
  pairs: int | None = None,
) -> dict:
  """Runs the benchmark for one config; returns the figures as a dict.

  ``brief``: exact replay and the default strategy only (no vmapped replay,
  whose compile dominates for a large model, and no other strategies).
  ``pairs``: train/record pairs timed per repeat (default
  :func:`pairs_per_repeat` of the first training run's time); a repeat's
  recording overhead is the median of its pairs' ratios.
  """
  train, source = training_data(config)
  plan = build.plan(config)
  devices = min(devices, jax.local_device_count())
  modes, strategies = _modes_and_strategies(devices, max(devices, chunk // devices * devices), segments, brief)
  t, size, steps_replayed, peak, pairs = _time_repeats(
    config, train, source, plan, modes, strategies, repeats, devices, pairs
  )
  med = {name: statistics.median(v) for name, v in t.items()}
  overheads = t["recording overhead"]
  return {
    "config": config.to_dict(),
    "data": source,
    "steps": plan.steps,
    "k": plan.k,
    "runner": plan.runner,
    "repeats": repeats,
    "pairs_per_repeat": pairs,
    "devices": devices,
    "timings": t,
    "train_seconds": med["train"],
    "record_seconds": med["record"],
    "recording_overhead": statistics.median(overheads),
    "recording_overhead_per_repeat": overheads,
    "train_step_seconds": med["train step"],
    "train_steps_per_second": 1 / med["train step"],  # after compiling: replay is timed compiled too
    "verify_all": _verify_all_figures(t, modes, plan.steps),
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


def _modes_and_strategies(devices: int, chunk: int, segments: int, brief: bool) -> tuple[dict, dict]:
  """The replay modes timed verifying every segment, and the challenges whose cost is timed, by name."""
  loose = tolerance.Thresholds({"l2": 1e300}, source="benchmark: timing only")
  modes = {
    "exact, 1 device": replay.Exact(devices=1),
    f"exact, {devices} devices": replay.Exact(devices=devices),
    f"vmapped x{chunk}, {devices} devices": replay.Tolerance(loose, chunk=chunk, devices=devices),
  }
  strategies = {
    "top-q+uniform (default)": challenge.TopQUniform(seed=0),
    "fiat-shamir": challenge.FiatShamir(n=segments),
    "uniform": challenge.Uniform(n=segments, seed=0),
    "top-q": challenge.TopQ(q=1),
    "all": challenge.All(),
  }
  if devices == 1:  # "exact, 1 device" already
    modes.pop("exact, 1 devices")
  if brief:
    modes = {name: mode for name, mode in modes.items() if isinstance(mode, replay.Exact)}
    strategies = dict(list(strategies.items())[:1])
  return modes, strategies


def _time_repeats(config, train, source, plan, modes, strategies, repeats, devices, pairs=None) -> tuple:
  """Times every repeat: ``(timings by name, proof bytes, steps each strategy replayed, verifier peak MiB, pairs)``.

  Each repeat trains and records ``pairs`` times (alternating which goes
  first, so the machine's drift favours neither), then verifies its last
  proof in every mode and with every strategy.
  """
  t: dict[str, list[float]] = {"train": [], "record": [], "recording overhead": [], "train step": []}
  size, steps_replayed = 0, {}
  _plain_training(config, train, plan)  # Warm-up: JAX's backend start-up is nobody's cost.
  program = build.program(config, train)  # the verifier's: compiled once, as for a verifier of many proofs
  done = 0  # pairs timed so far: which of train and record goes first alternates with it
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(repeats):
      timed: dict[str, list[float]] = {"train": [], "record": [], "train step": []}
      while len(timed["train"]) < (pairs or 1):
        path = os.path.join(tmp, f"proof{done}")
        for which in ("train", "record") if done % 2 == 0 else ("record", "train"):
          if which == "train":
            timed["train"].append(_plain_training(config, train, plan, timed["train step"]))
          else:
            seconds, _ = _timed(lambda p=path: recorder.record(p, build.program(config, train), train, plan))
            timed["record"].append(seconds)
        done += 1
        pairs = pairs or pairs_per_repeat(timed["train"][0])
      ratios = [rec / plain for rec, plain in zip(timed["record"], timed["train"], strict=True)]
      for name, values in timed.items():
        t[name].append(statistics.median(values))
      t["recording overhead"].append(statistics.median(ratios))
      size = proof.size_bytes(path)
      for name, mode in modes.items():
        if r == 0:  # Compile outside the timing: a verifier checks many proofs per process.
          verifier.verify(path, program, train, challenge=challenge.FiatShamir(n=devices), replay=mode)
        seconds, verdict = _timed(
          lambda m=mode, p=path, g=program: verifier.verify(p, g, train, challenge=challenge.All(), replay=m)
        )
        if not verdict.accepted:
          raise RuntimeError(f"benchmark proof rejected ({name}): {verdict.summary()}")
        t.setdefault(f"verify all: {name}", []).append(seconds)
        if name == "exact, 1 device":  # one segment at a time: its segments' times do not overlap
          t.setdefault("replay only: exact, 1 device", []).append(sum(s.seconds for s in verdict.segments))
      for name, drawn in strategies.items():
        seconds, verdict = _timed(
          lambda d=drawn, p=path, g=program: verifier.verify(p, g, train, challenge=d, replay=replay.Exact(devices))
        )
        t.setdefault(f"strategy: {name}", []).append(seconds)
        steps_replayed[name] = sum(s.end - s.start for s in verdict.segments)
      _report_repeat(t, r, repeats)
    # The CLI verifier rebuilds the data from the config: only for data prepared here.
    peak = _verifier_peak_rss_mib(path) if source == train.name else None
  return t, size, steps_replayed, peak, pairs


PAIR_SECONDS = 12.0
"""Each repeat times train and record alternately until about this long (at most 5 pairs): a run of 1 s is noisy."""


def pairs_per_repeat(seconds: float) -> int:
  """How many train/record pairs a repeat times, from the first training run's ``seconds`` (1 from 6 s on).

  >>> pairs_per_repeat(1.1), pairs_per_repeat(2.5), pairs_per_repeat(9.0)
  (5, 3, 1)
  """
  return max(1, min(5, math.ceil(PAIR_SECONDS / (2 * seconds)) if seconds > 0 else 5))


def _report_repeat(t: dict[str, list[float]], r: int, repeats: int) -> None:
  """One line on stderr with repeat ``r``'s timings, so a run stopped early still leaves its figures."""
  done = {name: v[r] for name, v in t.items() if len(v) > r}
  shown = ", ".join(
    f"{name} {s:.3f}x"
    if name == "recording overhead"
    else f"{name} {s * 1e3:.2f} ms"
    if s < 0.1
    else f"{name} {s:.2f} s"
    for name, s in done.items()
  )
  print(f"  repeat {r + 1}/{repeats}: {shown}", file=sys.stderr, flush=True)


def _per_step_ratios(seconds: list[float], steps: int, step_seconds: list[float]) -> list[float]:
  """Each repeat's seconds per step over that repeat's training step.

  Medians of these, not ratios of medians: a repeat's timings are minutes apart
  at most, while a run's repeats drift apart by 10% and more on a shared machine.
  """
  return [v / steps / s for v, s in zip(seconds, step_seconds, strict=True)]


def _verify_all_figures(t: dict, modes: dict, steps: int) -> dict:
  """Verifying every segment, per mode: seconds, per step, against the training step and sequential replay."""
  figures = {}
  sequential = statistics.median(t["verify all: exact, 1 device"])
  for name in modes:
    seconds = statistics.median(t[f"verify all: {name}"])
    to_step = _per_step_ratios(t[f"verify all: {name}"], steps, t["train step"])
    figures[name] = {
      "seconds": seconds,
      "steps_per_second": steps / seconds,
      "step_seconds": seconds / steps,
      "to_training_step": statistics.median(to_step),
      "to_training_step_per_repeat": to_step,
      "to_sequential_exact": sequential / seconds,
    }
  replay_only = t["replay only: exact, 1 device"]
  fixed = [total - part for total, part in zip(t["verify all: exact, 1 device"], replay_only, strict=True)]
  figures["exact, 1 device"].update(
    replay_step_seconds=statistics.median(replay_only) / steps,
    replay_to_training_step=statistics.median(_per_step_ratios(replay_only, steps, t["train step"])),
    fixed_seconds=statistics.median(fixed),
  )
  return figures


SHAPES = {
  "digits": (8, 8, 1),
  "mnist": (28, 28, 1),
  "fashion_mnist": (28, 28, 1),
  "cifar10": (32, 32, 3),
  "cifar100": (32, 32, 3),
}


def training_data(config) -> tuple:
  """The config's training data, or random uint8 images of its shape when its TFDS data is not prepared here.

  Returns ``(dataset, what it is)``. A step's time does not depend on the pixel values.
  """
  try:
    train = build.dataset(config, "train")
    return train, train.name
  except build.ConfigError:
    shape = SHAPES[config.dataset]
    rng = np.random.default_rng(0)
    n = max(config.batch_size * 4, 512)
    classes = data.TFDS_DATASETS.get(config.dataset, 10)
    train = data.Dataset(
      "synthetic", rng.integers(0, 256, (n, *shape), np.uint8), rng.integers(0, classes, n).astype(np.int64)
    )
    return train, f"random uint8 images {shape} ({config.dataset} is not prepared here)"


def step_time(config, steps: int = 10) -> dict:
  """Median seconds per training step of a config, on its data or on random images of its shape.

  Times ``steps`` steps after two warm-up steps (compilation), each synced
  with ``block_until_ready``: one jitted step for the ``loop`` runner, one
  ``lax.scan`` over ``steps`` batches for ``scan`` (its time divided by
  ``steps``). When the config's TFDS data is not prepared here, random
  uint8 images of the dataset's shape stand in: a step's time does not
  depend on the pixel values. No proof is written.
  """
  train, source = training_data(config)
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


def fingerprint_cost(config, steps: int = 200, repeats: int = 11) -> dict:
  """Step time with the per-step state fingerprint over without it, interleaved in one process.

  The ratio is the median over repeats of each repeat's pair (with, without),
  so slow phases of a noisy machine hit both sides of a pair alike.

  Both are the loop runner's jitted step on the config's data; only the
  fingerprint (``training.state_fingerprint`` of the new state, returned with
  the metrics) differs.
  """
  train = build.dataset(config, "train")
  plan = build.plan(config)
  program = build.program(config, train)
  keys = training.derive_keys(plan.seed)
  log = sampling.index_log(keys.order, len(train), plan.batch_size, steps)
  batches = [train.batch(log[i]) for i in range(steps)]
  with_fp = training.make_segment(program.step, "loop").compiled
  without = jax.jit(lambda s, b, r: program.step(s, b, jax.random.fold_in(r, s.step)))
  times = {"with": [], "without": []}
  for r in range(repeats + 1):
    for name, fn in (("with", with_fp), ("without", without)) if r % 2 else (("without", without), ("with", with_fp)):
      state = program.init(keys.init)
      jax.block_until_ready(fn(state, batches[0], keys.step))  # compiled once, then cached
      t0 = time.perf_counter()
      for b in batches:
        state, _ = fn(state, b, keys.step)
      jax.block_until_ready(state)
      if r:
        times[name].append((time.perf_counter() - t0) / steps)
  med = {k: statistics.median(v) for k, v in times.items()}
  ratio = statistics.median(a / b for a, b in zip(times["with"], times["without"], strict=True))
  return {"step_seconds": med, "ratio": ratio, "repeats": repeats, "steps": steps}


def _child(args: list[str], env: dict | None = None, cores: set[int] | None = None) -> subprocess.CompletedProcess:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  launch = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
  )
  if cores is not None:
    launch = f"import os; os.sched_setaffinity(0, {sorted(cores)!r}); " + launch
  return subprocess.run(
    [sys.executable, "-c", launch, *args], cwd=root, env=env, capture_output=True, text=True, check=False
  )


def isa_cost(config_arg: list[str], steps: int = 10, repeats: int = 5) -> dict:
  """Median step time under the CPU ISA pin over without it: alternating fresh processes.

  The pin (``--xla_cpu_max_isa``) is fixed when JAX starts, so each timing is
  its own ``--step_time`` process; the two kinds alternate, so machine noise
  hits both alike.
  """
  pin = fingerprint.cpu_isa_flag()
  times: dict[str, list[float]] = {"pinned": [], "unpinned": []}
  for r in range(repeats):
    for name in ("pinned", "unpinned") if r % 2 else ("unpinned", "pinned"):
      flags = pin if name == "pinned" else ""
      env = {**os.environ, "XLA_FLAGS": flags, "POL_JAX_NO_ISA_PIN": "" if name == "pinned" else "1"}
      with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = _child(["experiments.benchmark", *config_arg, f"--step_time={steps}", f"--out={out.name}"], env)
        if done.returncode:
          raise RuntimeError(f"step_time child failed: {done.stderr.strip().splitlines()[-1:]}")
        times[name].append(json.load(open(out.name))["median_step_seconds"])
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"flag": pin, "step_seconds": med, "ratio": med["pinned"] / med["unpinned"], "all": times}


def portable_cost(config_arg: list[str], steps: int = 10, repeats: int = 3) -> dict:
  """Median step time in portable numerics over float32: alternating fresh ``--step_time`` processes.

  Portable numerics turns x64 on for the whole process, so each kind runs in
  its own process; the kinds alternate, so machine noise hits both alike.
  """
  times: dict[str, list[float]] = {"float32": [], "portable": []}
  for r in range(repeats):
    for kind in ("float32", "portable") if r % 2 == 0 else ("portable", "float32"):
      with tempfile.NamedTemporaryFile(suffix=".json") as out:
        args = [*config_arg, f"--config.numerics={kind}", f"--step_time={steps}", f"--out={out.name}"]
        done = _child(["experiments.benchmark", *args])
        if done.returncode:
          raise RuntimeError(f"step_time child failed: {done.stderr.strip().splitlines()[-1:]}")
        times[kind].append(json.load(open(out.name))["median_step_seconds"])
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"step_seconds": med, "ratio": med["portable"] / med["float32"], "all": times, "steps": steps}


def worker_rate(config_arg: list[str], repeats: int = 3) -> dict:
  """Exact replay of every segment of a 1-thread proof: 1 pinned worker against ``cores`` workers.

  The proof is recorded by ``experiments.train`` pinned to one core; each
  verification is ``experiments.verify --strategy=all`` (``--workers=1``, then
  the default ``floor(cores / 1)``), alternating. Wall time includes each
  worker's start (import, build, compile), which a longer proof amortises.
  """
  cores = sorted(os.sched_getaffinity(0))
  times: dict[str, list[float]] = {"1 worker": [], f"{len(cores)} workers": []}
  with tempfile.TemporaryDirectory() as tmp:
    done = _child(["experiments.train", *config_arg, f"--workdir={tmp}"], cores={cores[0]})
    if done.returncode:
      raise RuntimeError(f"recording the 1-thread proof failed: {done.stderr.strip().splitlines()[-1:]}")
    proof_dir = os.path.join(tmp, "proof")
    segments = len(json.load(open(os.path.join(proof_dir, "manifest.json")))["checkpoints"]) - 1
    for r in range(repeats):
      for name in list(times) if r % 2 == 0 else list(times)[::-1]:
        extra = ["--workers=1"] if name == "1 worker" else []
        t0 = time.perf_counter()
        done = _child(["experiments.verify", f"--proof={proof_dir}", "--strategy=all", *extra])
        seconds = time.perf_counter() - t0
        if done.returncode:
          raise RuntimeError(f"verifying the 1-thread proof failed ({name}): {done.stderr.strip()[-300:]}")
        times[name].append(seconds)
  med = {k: statistics.median(v) for k, v in times.items()}
  return {
    "segments": segments,
    "seconds": med,
    "segments_per_second": {k: segments / v for k, v in med.items()},
    "speedup": med["1 worker"] / med[f"{len(cores)} workers"],
    "all": times,
  }


def torch_comparison(config_arg: list[str], steps: int = 10, repeats: int = 3) -> dict:
  """pol-jax's training step against the official PoL code's PyTorch step, side by side.

  Alternates fresh processes, ``repeats`` of each: this config's ``--step_time``
  (with the flags every CLI sets) and :mod:`experiments.torch_baseline` (the
  paper's ResNet-20 step in PyTorch, ``OMP_WAIT_POLICY=PASSIVE``), so machine
  noise hits both alike. Returns each one's median step seconds and their ratio.
  """
  seconds = {"pol-jax": [], "torch": []}
  details = {}
  for _ in range(repeats):
    for name, args in (
      ("pol-jax", ["experiments.benchmark", *config_arg, f"--step_time={steps}"]),
      ("torch", ["experiments.torch_baseline", f"--steps={steps}"]),
    ):
      with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        done = _child([*args, f"--out={out.name}"], env)
        if done.returncode:
          raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
        with open(out.name) as f:
          details[name] = json.load(f)
      seconds[name].append(details[name]["median_step_seconds"])
  med = {name: statistics.median(v) for name, v in seconds.items()}
  return {
    "step_seconds": med,
    "ratio": med["pol-jax"] / med["torch"],
    "runs": seconds,
    "torch": {k: v for k, v in details["torch"].items() if k != "step_seconds"},
    "pol-jax": {k: v for k, v in details["pol-jax"].items() if k != "step_seconds"},
  }


def torch_line(result: dict) -> str:
  """One line: pol-jax's step against PyTorch's, from :func:`torch_comparison`."""
  med = result["step_seconds"]
  return (
    f"{result['pol-jax']['model']} step, batch {result['pol-jax']['batch_size']}, "
    f"augment {result['pol-jax']['augment']}: pol-jax {med['pol-jax']:.3f} s (jax {result['environment']['jax']}), "
    f"PyTorch {med['torch']:.3f} s ({result['torch']['framework']}, {result['torch']['threads']} threads): "
    f"{result['ratio']:.2f}x (medians of {len(result['runs']['torch'])} alternating processes)"
  )


def table(result: dict) -> str:
  c = result["config"]
  width = {"cnn": f" (widths {tuple(c.get('widths', ()))})", "mlp": f" (features {tuple(c.get('features', ()))})"}
  lines = [
    f"{c['model']}{width.get(c['model'], '')} on {result['data']}, {result['runner']} runner, T={result['steps']}, k={result['k']}, B={c['batch_size']}",
    f"  train without proof {result['train_seconds']:.2f} s (compiling included; then "
    f"{result['train_step_seconds'] * 1e3:.1f} ms/step), "
    f"record with proof {result['record_seconds']:.2f} s: overhead {result['recording_overhead']:.3f}x "
    f"(median of the repeats' ratios: {', '.join(f'{x:.3f}' for x in result['recording_overhead_per_repeat'])}"
    + (
      f"; each the median of {result['pairs_per_repeat']} alternating pairs)" if result["pairs_per_repeat"] > 1 else ")"
    ),
    f"  proof {result['proof_bytes'] / 1e6:.2f} MB, {result['proof_bytes_per_step']:.0f} bytes/step; "
    "verifier peak RSS "
    + (
      "not measured (synthetic data)"
      if result["verifier_peak_rss_mib"] is None
      else f"{result['verifier_peak_rss_mib']:.0f} MiB"
    ),
    "",
    f"  {'verify all segments':<32} {'seconds':>8} {'ms/step':>8} {'x train step':>12} {'speed-up':>9}",
  ]
  for name, r in result["verify_all"].items():
    lines.append(
      f"  {name:<32} {r['seconds']:>8.2f} {r['step_seconds'] * 1e3:>8.1f} {r['to_training_step']:>12.2f} "
      f"{r['to_sequential_exact']:>9.2f}"
    )
    if "replay_step_seconds" in r:  # sequential exact replay: the replay alone, and the rest
      lines.append(
        f"  {'  replay alone':<32} {r['seconds'] - r['fixed_seconds']:>8.2f} "
        f"{r['replay_step_seconds'] * 1e3:>8.1f} {r['replay_to_training_step']:>12.2f}"
      )
      lines.append(f"  {'  the rest':<32} {r['fixed_seconds']:>8.2f}   restores, the other checks, digest compares")
  lines += [
    "",
    f"  {'strategy (exact, ' + str(result['devices']) + ' devices)':<32} {'steps':>8} {'seconds':>8} "
    f"{'of training':>11}",
  ]
  for name, r in result["strategy_cost"].items():
    lines.append(f"  {name:<32} {r['steps_replayed']:>8} {r['seconds']:>8.2f} {r['fraction_of_training']:>11.2f}")
  return "\n".join(lines)


def _write(result: dict) -> None:
  """Writes ``result`` as JSON to ``--out``, if given."""
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


_INSTALL_TORCH = (
  "pip install 'pol-jax[bench]' (the CPU wheel: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
)


def _has_torch() -> bool:
  """Whether PyTorch is importable here (the timing itself runs in its own process)."""
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  if not os.environ.get("POL_JAX_NO_ISA_PIN"):  # isa_cost's unpinned children
    cli.set_deterministic_flags()  # before JAX starts a backend
  if not _STEP_TIME.value and "device_count" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES.value}"
    ).strip()
  cli.bind_owner(_CONFIG.value, None)  # benchmark proofs are bound to a key nobody keeps
  try:
    if _PORTABLE.value:
      config_arg = [a for a in sys.argv[1:] if a.startswith("--config")]
      result = portable_cost(config_arg, _PORTABLE.value, _REPEATS.value)
      med = result["step_seconds"]
      print(
        f"{_CONFIG.value.model}, {_CONFIG.value.runner} runner, batch {_CONFIG.value.batch_size}: portable numerics "
        f"{med['portable']:.4f} s vs float32 {med['float32']:.4f} s per step: {result['ratio']:.2f}x "
        f"(medians of {_REPEATS.value} alternating processes of {_PORTABLE.value} steps)"
      )
      _write(result)
      return
    if _ENVIRONMENT.value:
      config_arg = [a for a in sys.argv[1:] if a.startswith("--config")]  # the config and its overrides
      fp = fingerprint_cost(_CONFIG.value)
      isa = isa_cost(config_arg, repeats=_REPEATS.value)
      rate = worker_rate(config_arg, repeats=_REPEATS.value)
      result = {"fingerprint": fp, "isa": isa, "workers": rate, "environment": fingerprint.environment()}
      w = list(rate["seconds"])
      print(
        f"per-step state fingerprint: {fp['step_seconds']['with'] * 1e3:.3f} ms vs "
        f"{fp['step_seconds']['without'] * 1e3:.3f} ms per step: {fp['ratio']:.3f}x\n"
        f"CPU ISA pin {isa['flag']}: {isa['step_seconds']['pinned'] * 1e3:.3f} ms vs "
        f"{isa['step_seconds']['unpinned'] * 1e3:.3f} ms per step: {isa['ratio']:.3f}x\n"
        f"exact replay of a 1-thread proof ({rate['segments']} segments, all): "
        + ", ".join(f"{k} {rate['seconds'][k]:.1f} s ({rate['segments_per_second'][k]:.2f} segments/s)" for k in w)
        + f"; speed-up {rate['speedup']:.2f}x (medians of {_REPEATS.value})"
      )
      _write(result)
      return
    if _TORCH.value:
      if not _has_torch():
        print(f"error: --torch needs PyTorch: {_INSTALL_TORCH}", file=sys.stderr)
        sys.exit(2)
      config_arg = [a for a in sys.argv[1:] if a.startswith("--config")]
      result = torch_comparison(config_arg, _STEP_TIME.value or 10, _REPEATS.value)
      result["environment"] = fingerprint.environment()
      print(torch_line(result))
      _write(result)
      return
    if _STEP_TIME.value:
      build.set_numerics(_CONFIG.value)
      result = step_time(_CONFIG.value, _STEP_TIME.value)
      print(
        f"{result['model']}, {result['runner']} runner, batch {result['batch_size']}, augment {result['augment']}, "
        f"on {result['data']}: {result['median_step_seconds']:.3f} s per step (median of {result['steps_timed']})"
      )
      _write(result)
      return
    env = fingerprint.environment()
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), **env}
    print(
      f"pol-jax benchmark: {env['device_kind']} x{env['device_count']}, "
      + (f"{env['cpu_threads']} CPU threads, " if env["cpu_threads"] else "")
      + f"jax {env['jax']}, {machine['processor']}; medians of {_REPEATS.value}\n",
      flush=True,
    )
    result = measure(
      _CONFIG.value, _REPEATS.value, _DEVICES.value, _CHUNK.value, _SEGMENTS.value, _BRIEF.value, _PAIRS.value
    )
    print(table(result), flush=True)
    if any(a.startswith("--config") for a in sys.argv[1:]):  # that config alone
      _write({**result, "machine": machine})
      return
    print("\nResNet-20 (measuring: a few minutes on a 2-core CPU) ...", file=sys.stderr, flush=True)
    resnet = measure(
      resnet20_config(_CONFIG.value.owner), _REPEATS.value, _DEVICES.value, brief=True, pairs=_PAIRS.value
    )
    print("\n" + table(resnet), flush=True)
    versus = None
    if _has_torch():
      versus = torch_comparison([f"--config={_RESNET}"], 10, _REPEATS.value)
      versus["environment"] = env
      print("\n" + torch_line(versus))
    else:
      print(f"\nResNet-20 step against PyTorch's: not measured: PyTorch is not installed ({_INSTALL_TORCH})")
    _write({"default": result, "resnet20": resnet, "torch": versus, "machine": machine})
  except build.ConfigError as e:
    print(f"error: {cli.in_flags(str(e))}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  # Flags exist only when this module runs as a program, so the experiments modules can be
  # imported together as libraries (the notebook does).
  _CONFIG = cli.define_config(_DEFAULT, "Config to benchmark.")
  _REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats per timing (medians are reported).", lower_bound=1)
  _DEVICES = flags.DEFINE_integer(
    "devices", 2, "Devices for parallel replay (CPU: forced host devices).", lower_bound=1
  )
  _PAIRS = flags.DEFINE_integer(
    "pairs",
    None,
    "Train/record pairs per repeat; default: enough for about 12 s (a short run's ratio is noisy), at most 5.",
    lower_bound=1,
  )
  _CHUNK = flags.DEFINE_integer("chunk", 16, "Segments per vmapped call.", lower_bound=1)
  _SEGMENTS = flags.DEFINE_integer("segments", 8, "n for the uniform and fiat-shamir strategies.", lower_bound=1)
  _BRIEF = flags.DEFINE_bool(
    "brief",
    False,
    "Time exact replay and the default strategy only (no vmapped replay, no other strategies): for a large "
    "model, or a GPU with the deterministic flags, where each mode costs minutes.",
  )
  _OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
  _STEP_TIME = flags.DEFINE_integer(
    "step_time",
    0,
    "Only time this many training steps of the config (random images if its data is absent).",
    lower_bound=0,
  )
  _PORTABLE = flags.DEFINE_integer(
    "portable", 0, "Only compare this many steps in portable numerics against float32 (step time).", lower_bound=0
  )
  _TORCH = flags.DEFINE_bool(
    "torch",
    False,
    "Only time this config's step (--step_time steps, default 10) against the official PoL code's PyTorch "
    "ResNet-20 step, in alternating processes (needs PyTorch: the bench extra).",
  )
  _ENVIRONMENT = flags.DEFINE_bool(
    "environment",
    False,
    "Only measure what reproducing environments costs: the per-step fingerprint, the CPU ISA pin, and exact "
    "replay of a 1-thread proof in 1 vs cores pinned workers.",
  )
  app.run(main, flags_parser=cli.parse_flags)
