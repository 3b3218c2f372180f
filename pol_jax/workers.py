"""Exact replay in worker processes that reproduce the prover's CPU environment.

Internal to pol-jax (no stability promise); the public API is in ``pol_jax/__init__.py``.

XLA:CPU sizes its thread pool from the CPU affinity of the process when JAX
starts, and float32 reductions depend on it; XLA flags (the CPU ISA pin, the
forced host device count) and x64 are fixed at start too. A verifier that
differs from the prover in these reproduces them instead of refusing: it
starts worker processes, each pinned to ``t`` cores (``t`` = the proof's
recorded thread count) with the proof's flags set before JAX starts, and
each replays its share of the chosen segments. ``C`` cores run
``floor(C / t)`` workers at once; the results are bit-identical to a
sequential replay under the prover's settings.

A worker rebuilds the program with a *builder* the verifier names (an
importable ``"module:function"`` taking the recorded config and returning
``(program, dataset)``), never one the proof names. Before replaying it
checks, itself, that its environment now matches the proof's on every field
that changes bits, that it compiled the recorded program, and that the index
log and the examples it uses match their digests.

The worker entry point is ``python -m pol_jax.workers`` with a JSON job on
standard input; it writes one ``RESULT`` line of JSON per segment.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

_RESULT = "POL-JAX-RESULT "
_INIT = "POL-JAX-INIT "
_ERROR = "POL-JAX-ERROR "

# Sets the CPU affinity before anything imports JAX, then runs the worker.
_LAUNCH = (
  "import os, runpy, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
  "sys.argv = sys.argv[:1]; runpy.run_module('pol_jax.workers', run_name='__main__', alter_sys=True)"
)


class Unreproducible(Exception):
  """This machine cannot reproduce the proof's environment: says what it needs."""


class ProgramDiffers(Unreproducible):
  """In the prover's environment, the builder does not build the recorded program from the recorded config."""


@dataclasses.dataclass(frozen=True)
class Pinning:
  """How the workers reproduce the prover's CPU environment.

  Attributes:
    threads: cores per worker, the proof's recorded thread count.
    cores: the cores of each worker (disjoint).
    settings: environment variables every worker starts with (``XLA_FLAGS``,
      ``JAX_ENABLE_X64``).
  """

  threads: int
  cores: tuple[tuple[int, ...], ...]
  settings: tuple[tuple[str, str], ...]

  def describe(self) -> str:
    n = len(self.cores)
    flags = dict(self.settings).get("XLA_FLAGS") or "none"
    return (
      f"{n} worker process{'es' if n > 1 else ''} pinned to {self.threads} core{'s' if self.threads > 1 else ''}"
      f"{' each' if n > 1 else ''} (cores {' | '.join(','.join(map(str, c)) for c in self.cores)}), XLA flags: {flags}"
    )


def available_cores() -> list[int]:
  """The cores this process may run on."""
  return sorted(os.sched_getaffinity(0))


def plan(recorded: dict, cores: Sequence[int] | None = None, max_workers: int | None = None) -> Pinning:
  """Workers that reproduce ``recorded`` (a proof's environment) on ``cores``.

  Raises:
    Unreproducible: fewer cores than the proof's threads, a recorded thread
      count or flag a verifier cannot set, or no CPU affinity on this OS.
  """
  from pol_jax import fingerprint

  if not hasattr(os, "sched_setaffinity"):
    raise Unreproducible("pinning worker processes to cores needs Linux (sched_setaffinity)")
  threads = recorded.get("cpu_threads")
  if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 65536:
    raise Unreproducible(f"environment.cpu_threads: expected a thread count, got {threads!r:.40}")
  cores = sorted(cores if cores is not None else available_cores())
  if len(cores) < threads:
    raise Unreproducible(
      f"the proof was recorded with {threads} CPU threads and exact replay needs {threads} cores; "
      f"this process may run on {len(cores)}: verify on a machine (or an affinity mask) with at least {threads} cores"
    )
  try:
    settings = fingerprint.process_settings(recorded)
  except ValueError as e:
    raise Unreproducible(str(e)) from None
  count = len(cores) // threads
  if max_workers is not None:
    count = max(1, min(count, max_workers))
  groups = tuple(tuple(cores[i * threads : (i + 1) * threads]) for i in range(count))
  return Pinning(threads, groups, tuple(sorted(settings.items())))


def _spawn(pinning: Pinning, cores: tuple[int, ...]) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "TF_CPP_"))}
  env.update(dict(pinning.settings))
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return subprocess.Popen(
    [sys.executable, "-c", _LAUNCH, ",".join(map(str, cores))],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )


def replay(
  proof_dir: str,
  root: str,
  builder: str,
  segments: Sequence[tuple[int, int, int]],
  pinning: Pinning,
  on_result: Callable | None = None,
  init: dict | None = None,
) -> list:
  """Replays ``(index, start, end)`` segments exactly in pinned workers.

  Segments are dealt round-robin to the workers; each result is passed to
  ``on_result`` as it arrives and all are returned in the order of
  ``segments``. With ``init`` (a dict), the first worker also fills it with
  the leaf digests of the initial state it derives from the seed in the
  prover's environment (the init check, where this process's flags or
  threads would derive other bits).

  Raises:
    Unreproducible: a worker could not reproduce the environment or build
      the recorded program (its one-line reason), or died.
  """
  from pol_jax import replay as replay_lib

  shares = [list(segments[i :: len(pinning.cores)]) for i in range(len(pinning.cores))]
  results: dict[int, replay_lib.SegmentResult] = {}
  errors: list[str] = []
  lock = threading.Lock()

  def serve(w: int, cores: tuple[int, ...]) -> None:
    if not shares[w]:
      return
    job = {
      "proof": os.path.abspath(proof_dir),
      "root": root,
      "builder": builder,
      "segments": shares[w],
      "init": init is not None and w == 0,
    }
    proc = _spawn(pinning, cores)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    try:
      proc.stdin.write(json.dumps(job))
      proc.stdin.close()
      for line in proc.stdout:
        if line.startswith(_RESULT):
          result = replay_lib.SegmentResult(**json.loads(line[len(_RESULT) :]))
          result.device = f"worker {w} (cores {','.join(map(str, cores))})"
          with lock:
            results[result.index] = result
            if on_result is not None:
              on_result(result)
        elif line.startswith(_INIT) and init is not None and w == 0:
          init.update(json.loads(line[len(_INIT) :]))
        elif line.startswith(_ERROR):
          with lock:
            errors.append(f"worker {w}: {line[len(_ERROR) :].strip()}")
    finally:
      code = proc.wait()
      reader.join()
      if code and not any(e.startswith(f"worker {w}:") for e in errors):
        last = next((s.strip() for s in reversed(stderr) if s.strip()), "no output")
        with lock:
          errors.append(f"worker {w} exited with status {code}: {last[:300]}")

  threads = [threading.Thread(target=serve, args=(w, c), daemon=True) for w, c in enumerate(pinning.cores)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    kind = errors[0].split(": ", 2)[1:2]  # "worker W: ExceptionName: message"
    raise (ProgramDiffers if kind == [ProgramDiffers.__name__] else Unreproducible)(errors[0])
  if init is not None and not init and shares[0]:
    raise Unreproducible("the first worker did not report the initial state it derives")
  missing = [i for i, _, _ in segments if i not in results]
  if missing:
    raise Unreproducible(f"the workers returned no result for segments {missing[:5]}")
  return [results[i] for i, _, _ in segments]


def load_builder(target: str) -> Callable:
  """The function ``"module:function"`` names (the verifier's choice, never the proof's).

  Raises:
    ValueError: not of that form, or nothing importable there.
  """
  module, sep, name = target.partition(":")
  if not sep or not module or not name.isidentifier():
    raise ValueError(f"builder {target!r}: expected 'package.module:function'")
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"builder {target!r}: cannot import it ({e})") from None
  if not callable(fn):
    raise ValueError(f"builder {target!r}: not a function")
  return fn


def builder_record(target: str) -> dict:
  """What a proof records about the builder that made it: its target and its package's version."""
  import importlib.metadata

  try:
    version = importlib.metadata.version(target.split(":")[0].split(".")[0])
  except importlib.metadata.PackageNotFoundError:
    version = None
  return {"target": target, "version": version}


def _work(job: dict) -> None:
  """The worker: check this process reproduces the proof, then replay its share."""
  import numpy as np

  from pol_jax import data as data_lib
  from pol_jax import fingerprint, proof, training
  from pol_jax import replay as replay_lib

  proof_dir = job["proof"]
  manifest = proof.validate_manifest(proof.read_manifest(proof_dir))
  if manifest["root"] != job["root"]:
    raise Unreproducible("the proof changed on disk since the verifier checked it (another root)")
  differ = fingerprint.mismatches(manifest["environment"], fingerprint.environment())
  if differ:
    detail = "; ".join(f"{f}: proof {a!r}, worker {b!r}" for f, a, b in differ)
    raise Unreproducible(f"the worker's environment still differs from the proof's: {detail}")
  program, dataset = load_builder(job["builder"])(manifest["config"])
  plan = proof.Plan.from_manifest(manifest)
  keys = training.derive_keys(plan.seed)
  template = training.to_host(program.init(keys.init))
  segment = training.make_segment(program.step, plan.runner)
  if fingerprint.program_digests(segment, template, dataset, plan, keys.step) != manifest["programs"]:
    raise ProgramDiffers(f"the builder {job['builder']} does not build the recorded program")
  log = proof.read_index_log(proof_dir, manifest)
  size = manifest["dataset"]["size"]
  digests = proof.read_data_digests(proof_dir, manifest)
  segments = [tuple(map(int, s)) for s in job["segments"]]
  used = np.unique(np.concatenate([log[s:e].ravel() for _, s, e in segments]))
  if not isinstance(dataset, data_lib.Dataset) or len(dataset) != size:
    raise Unreproducible(f"the builder's dataset is not the proof's ({size} examples)")
  if (dataset.digests(used) != digests[used]).any():
    raise Unreproducible("the worker's copy of the data differs from the recorded digests")
  job_ = replay_lib.Job(proof_dir, manifest, segment, template, dataset, log, keys.step)
  if job.get("init"):
    print(_INIT + json.dumps(proof.leaf_digests(template)), flush=True)

  def emit(result) -> None:
    print(_RESULT + json.dumps(dataclasses.asdict(result)), flush=True)

  replay_lib.replay(job_, segments, replay_lib.local_devices(1), emit)


def main() -> None:
  from absl import logging

  logging.set_verbosity(logging.ERROR)  # Orbax logs every restore at INFO.
  try:
    _work(json.loads(sys.stdin.read()))
  except Exception as e:  # noqa: BLE001 - reported to the verifier as one line.
    print(_ERROR + f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500], flush=True)
    sys.exit(1)


if __name__ == "__main__":
  main()
