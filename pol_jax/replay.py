"""Replaying recorded segments: the modes :class:`Exact` and :class:`Tolerance`.

:class:`Exact` (``verify``'s default) replays with the prover's runner and
compares digests; :class:`Tolerance` replays many segments at once with
``jit(vmap(...))`` and compares distances.

Device-parallel replay dispatches the prover's very jitted segment function to
every local device, one segment per device at a time, and collects the results
in order. JAX compiles that one traced program once per device (an XLA
executable is bound to its device), never once per segment. We do not use
``shard_map`` for exact replay: measured here on 4 forced CPU devices (jax
0.10.2), a ``shard_map`` with one segment per device reproduced the scan
runner's MLP bit for bit but not the loop runner's BatchNorm CNN, whose
BatchNorm statistics differed in every segment; the same function dispatched
to each device matched in both.

The recorded states the segments need are read ahead, each batch of the
proof once, when they fit in :data:`KEEP_BYTES` (states the verifier's
integrity pass already checked are taken as they are); beyond that, only the
segments in flight (one per device) are held in memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from pol_jax import data as data_lib
from pol_jax import distances, proof, store, training

if TYPE_CHECKING:  # tolerance.calibrate runs the verifier, which imports this module
  from pol_jax import tolerance


@dataclasses.dataclass
class SegmentResult:
  """The replay of one segment against the recorded state at its end.

  ``distance`` is from the replayed to the recorded end state, ``update`` from
  the recorded start to the recorded end (the size of the claimed update);
  both over the parameters. ``device`` is where the segment ran.
  """

  index: int
  start: int
  end: int
  match: bool
  differing: int
  """How many state leaves differ from the recorded end (by digest)."""
  first_differing: str | None
  distance: dict[str, float]
  update: dict[str, float]
  seconds: float
  device: str = ""
  within: bool | None = None
  """Tolerance mode: every metric within its delta (None in exact mode)."""
  error: str | None = None
  """A checkpoint this segment needs failed its integrity check (not replayed)."""
  error_step: int | None = None
  """The step of that checkpoint."""
  diverged_step: int | None = None
  """Exact mode: the first step after which the replayed state's fingerprint differs from the recorded one."""
  diverged_leaf: str | None = None
  """The first leaf whose fingerprint differs at ``diverged_step``."""

  @property
  def mismatch(self) -> str | None:
    if not self.differing:
      return None
    where = (
      f"; first diverged at step {self.diverged_step} in {self.diverged_leaf}" if self.diverged_step is not None else ""
    )
    return f"{self.differing} leaves differ at step {self.end}, first {self.first_differing}{where}"

  @property
  def normalised(self) -> dict[str, float]:
    """l1, l2, linf over the recorded update's; cosine as it is."""
    from pol_jax import tolerance  # here: tolerance imports the verifier, which imports this module

    return tolerance.normalise(self.distance, self.update)


@dataclasses.dataclass(frozen=True)
class Job:
  """What a replay needs besides the segments: all of it checked beforehand."""

  proof_dir: str
  manifest: dict
  segment: training.Segment
  template: Any
  dataset: data_lib.Dataset
  log: np.ndarray
  step_root: jax.Array
  checked: dict | None = None
  """``{step: (state, meta)}``: states the integrity pass already restored and checked, used as they are."""
  step: training.StepFn | None = None
  """The step ``segment`` runs: :class:`Tolerance` builds its batched runner from it."""


def local_devices(count: int | None = None) -> list:
  """The first ``count`` local devices (all by default).

  Raises:
    ValueError: more devices were asked for than exist.
  """
  devices = jax.local_devices()
  if count is None:
    return devices
  if not 1 <= count <= len(devices):
    raise ValueError(
      f"asked for {count} devices, this process has {len(devices)} ({devices[0].platform}); "
      f"pass Exact(devices=N) or Tolerance(devices=N) with 1 <= N <= {len(devices)}"
      + (
        ", or set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts"
        if devices[0].platform == "cpu"
        else ""
      )
    )
  return devices[:count]


# The replay modes as typed values: each a frozen dataclass with one method,
# ``run(job, segments, on_result)``, that replays segments its way.

MODES = ("exact", "tolerance")


@dataclasses.dataclass(frozen=True)
class Exact:
  """Bit-exact replay: the prover's segment runner, one segment per device at a time.

  A segment is accepted when every leaf of its replayed end state has the
  recorded digest. Needs the prover's environment (or worker processes that
  reproduce it: ``verify(builder=...)``).

  Attributes:
    devices: replay on this many local devices (default: all). Bit-identical
      to sequential replay.
  """

  devices: int | None = None
  name = "exact"

  def run(
    self, job: Job, segments: Sequence[tuple[int, int, int]], on_result: Callable | None = None
  ) -> list[SegmentResult]:
    return replay(job, segments, local_devices(self.devices), on_result)


@dataclasses.dataclass(frozen=True)
class Tolerance:
  """``jit(vmap(...))`` replay of ``chunk`` segments at a time, sharded over the devices, judged by distance.

  A segment is accepted when its distance to the recorded end is within
  ``delta``. Not a bit-exact verification (any delta > 0 leaves slack that
  spoofing attacks live in); it also serves a verifier whose environment
  differs from the prover's (the differences are reported, not blocking).

  Attributes:
    delta: the thresholds per metric and their source, a
      :class:`pol_jax.tolerance.Thresholds` (``tolerance.load`` reads a
      calibration, ``tolerance.calibrate`` measures one). Required by ``verify``.
    chunk: segments per vmapped call; a multiple of the devices.
    devices: shard over this many local devices (default: all).
  """

  delta: tolerance.Thresholds | None = None
  chunk: int = 64
  devices: int | None = None
  name = "tolerance"

  def run(
    self, job: Job, segments: Sequence[tuple[int, int, int]], on_result: Callable | None = None
  ) -> list[SegmentResult]:
    batched = training.make_batched_segment(job.step, job.segment.kind)
    return replay_batched(job, batched, segments, self.chunk, local_devices(self.devices), on_result)


Mode = Exact | Tolerance
"""Either replay mode, as a value."""


def from_name(
  mode: str, *, devices: int | None = None, delta: tolerance.Thresholds | None = None, chunk: int = 64
) -> Mode:
  """The typed replay mode a mode name and its settings describe (the CLI's ``--mode``).

  >>> from_name("exact", devices=2)
  Exact(devices=2)
  """
  if mode == "exact":
    return Exact(devices)
  if mode == "tolerance":
    return Tolerance(delta, chunk, devices)
  raise ValueError(f"Expected mode in {MODES}, got {mode!r}.")


def replay(
  job: Job,
  segments: Sequence[tuple[int, int, int]],
  devices: Sequence | None = None,
  on_result: Callable[[SegmentResult], None] | None = None,
) -> list[SegmentResult]:
  """Replays ``(index, start, end)`` segments exactly, one per device at a time.

  Results come back in the order of ``segments`` and are bit-identical to
  replaying the segments one after another on one device.
  """
  devices = list(devices or local_devices())
  job = _prefetch(job, segments)
  results = []
  cache: dict[int, tuple] = {}
  for w in range(0, len(segments), len(devices)):
    group = segments[w : w + len(devices)]
    cache = _restore_once(job, group, cache)
    wave = []
    for device, (index, start, end) in zip(devices, group, strict=False):
      t0 = time.perf_counter()
      if isinstance(cache[start], str):
        wave.append((index, start, end, None, None, device, t0))
        continue
      # The batches stay host arrays, as the prover passed them: the loop runner slices them per step
      # in NumPy (slicing a device array dispatches an op per step and array), and the committed state
      # takes them to its device.
      state, root = jax.device_put((cache[start][0], job.step_root), device)
      batches = job.dataset.batch(job.log[start:end])
      state, metrics = job.segment.run(state, batches, root)  # dispatched asynchronously: the wave runs in parallel
      wave.append((index, start, end, cache[start][0], (state, metrics), device, t0))
    for index, start, end, begin, out, device, t0 in wave:
      if out is None or isinstance(cache[end], str):
        result = _unusable(index, start, end, cache)
      else:
        state, metrics = training.to_host(out)
        result = _compare(index, start, end, begin, state, cache[end], time.perf_counter() - t0)
        _locate(result, metrics.get(training.STATE_FINGERPRINT), cache[end][1], job.template)
      result.device = str(device)
      results.append(result)
      if on_result is not None:
        on_result(result)
  return results


def _restore_once(job: Job, group, cache: dict) -> dict:
  """The recorded states ``group`` needs, each restored (and digest-checked) once.

  Takes what ``job.checked`` holds and keeps from ``cache`` what is needed
  again; the rest is read in one restore per batch. A checkpoint that fails its
  integrity check is kept as its error message.
  """
  needed = sorted({s for _, s, _ in group} | {e for _, _, e in group})
  checked = job.checked or {}
  kept = {step: cache[step] if step in cache else checked[step] for step in needed if step in cache or step in checked}
  missing = [step for step in needed if step not in kept]
  if not missing:
    return kept
  digests = job.manifest["checkpoints"]
  try:
    names = store.batches(job.proof_dir)
  except proof.IntegrityError as e:
    return {**kept, **dict.fromkeys(missing, str(e))}
  by_batch: dict = {}
  for step in missing:
    by_batch.setdefault(store.batch_of(step, names), []).append(step)
  for batch, steps in by_batch.items():
    try:
      if batch is None:
        raise proof.IntegrityError("")
      kept.update(store.restore_batch(job.proof_dir, batch, job.template, {s: digests[str(s)] for s in steps}))
    except proof.IntegrityError:
      for step in steps:  # one at a time, so that each error names its own checkpoint
        try:
          kept[step] = store.restore(job.proof_dir, step, job.template, digests[str(step)])
        except proof.IntegrityError as e:
          kept[step] = str(e)
  return kept


KEEP_BYTES = 1 << 30
"""Replay reads the states its segments need ahead, each batch once, when they fit in this many bytes."""


def _prefetch(job: Job, segments) -> Job:
  """``job`` with the states ``segments`` need and ``job.checked`` lacks restored ahead, each batch once.

  Only when they fit in :data:`KEEP_BYTES`; else each wave of segments
  restores its own (a batch is then read once per wave that needs it).
  """
  checked = job.checked or {}
  missing = sorted({step for _, start, end in segments for step in (start, end)} - set(checked))
  state_bytes = sum(proof.stored(leaf).nbytes for leaf in jax.tree.leaves(job.template))
  if not missing or len(missing) * state_bytes > KEEP_BYTES:
    return job
  ahead = _restore_once(job, [(None, step, step) for step in missing], {})
  return dataclasses.replace(job, checked={**checked, **ahead})


def _unusable(index, start, end, cache) -> SegmentResult:
  step = start if isinstance(cache[start], str) else end
  nan = {m: math.nan for m in distances.METRICS}
  return SegmentResult(index, start, end, False, 0, None, dict(nan), dict(nan), 0.0, error=cache[step], error_step=step)


def replay_batched(
  job: Job,
  batched: training.Segment,
  segments: Sequence[tuple[int, int, int]],
  chunk: int,
  devices: Sequence | None = None,
  on_result: Callable[[SegmentResult], None] | None = None,
) -> list[SegmentResult]:
  """Replays segments ``chunk`` at a time with ``jit(vmap(...))``, sharded over devices.

  Segments of equal length go together; a last, short chunk is padded by
  repeating its final segment, so one compiled program serves every chunk.
  Tolerance mode only: the bits are in general not the prover's.

  Raises:
    ValueError: ``chunk`` does not divide over the devices, or does not fit
      in memory (the message says what to pass instead).
  """
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  devices = list(devices or local_devices())
  if chunk < 1 or chunk % len(devices):
    raise ValueError(
      f"Tolerance(chunk={chunk}) does not divide over {len(devices)} devices; pass a multiple of {len(devices)}"
    )
  check_chunk_fits(job, chunk, devices)
  job = _prefetch(job, segments)
  mesh = Mesh(np.array(devices), ("segments",))
  split, whole = NamedSharding(mesh, PartitionSpec("segments")), NamedSharding(mesh, PartitionSpec())
  by_length: dict[int, list] = {}
  for item in segments:
    by_length.setdefault(item[2] - item[1], []).append(item)
  results = []
  for items in by_length.values():
    for c in range(0, len(items), chunk):
      part = items[c : c + chunk]
      t0 = time.perf_counter()
      cache = _restore_once(job, part, {})
      usable = [it for it in part if not isinstance(cache[it[1]], str) and not isinstance(cache[it[2]], str)]
      out = None
      if usable:
        padded = usable + [usable[-1]] * (chunk - len(usable))
        states = jax.tree.map(lambda *xs: np.stack(xs), *(cache[s][0] for _, s, _ in padded))
        batches = jax.tree.map(lambda *xs: np.stack(xs), *(job.dataset.batch(job.log[s:e]) for _, s, e in padded))
        out, _ = batched.run(
          jax.device_put(states, split), jax.device_put(batches, split), jax.device_put(job.step_root, whole)
        )
        out = training.to_host(out)
      seconds = (time.perf_counter() - t0) / len(part)
      for index, start, end in part:
        if (index, start, end) not in usable:
          result = _unusable(index, start, end, cache)
        else:
          j = usable.index((index, start, end))
          replayed = jax.tree.map(lambda a, j=j: a[j], out)
          result = _compare(index, start, end, cache[start][0], replayed, cache[end], seconds)
        result.device = f"vmap x{chunk} on {len(devices)} device{'s' if len(devices) > 1 else ''}"
        results.append(result)
        if on_result is not None:
          on_result(result)
  return results


def check_chunk_fits(job: Job, chunk: int, devices: Sequence) -> None:
  """Refuses a chunk whose segments would not fit in the devices' memory.

  The estimate is conservative: per segment, four copies of the state (start,
  result, gradients, optimizer temporaries) and the segment's batches.
  """
  state_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(job.template))
  k = int(job.manifest["k"])
  batch_bytes = k * sum(np.asarray(a).nbytes for a in jax.tree.leaves(job.dataset.batch(job.log[:1])))
  need = chunk * (4 * state_bytes + batch_bytes)
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if stats and "bytes_limit" in stats:
    free = len(devices) * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  else:  # CPU devices share the host's memory.
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  if need > 0.8 * free:
    per = 4 * state_bytes + batch_bytes
    fits = max(len(devices), int(0.8 * free // per) // len(devices) * len(devices))
    raise ValueError(
      f"Tolerance(chunk={chunk}) needs about {need / 2**30:.1f} GiB ({per / 2**20:.1f} MiB a segment), "
      f"{free / 2**30:.1f} GiB is free; pass Tolerance(chunk={fits}) or less"
    )


def _compare(index, start, end, begin, replayed, recorded_end: tuple, seconds) -> SegmentResult:
  recorded, meta = recorded_end
  ours = proof.leaf_digests(replayed)
  bad = [p for p in ours if ours[p] != meta["leaves"][p]]
  update = distances.distances(begin.params, recorded.params)
  # Equal digests: the same bytes (digest-checked on restore), so every distance
  # is 0; unless a parameter is NaN or infinite (then NaN, as computed).
  same = not bad and all(math.isfinite(v) for v in update.values())
  return SegmentResult(
    index=index,
    start=start,
    end=end,
    match=not bad,
    differing=len(bad),
    first_differing=bad[0] if bad else None,
    distance=dict.fromkeys(distances.METRICS, 0.0) if same else distances.distances(replayed.params, recorded.params),
    update=update,
    seconds=seconds,
  )


def _locate(result: SegmentResult, replayed, meta: dict, template) -> None:
  """Names the first step and leaf at which a mismatched replay diverged.

  Compares the replay's per-step state fingerprints with those recorded in
  the end checkpoint's meta (absent in proofs written by other tools). They
  locate a divergence; whether the segment matches is decided by the digests.
  """
  recorded = meta.get("fingerprints")
  if not result.differing or replayed is None or not isinstance(recorded, list):
    return
  replayed = np.asarray(replayed, np.uint64)
  try:
    recorded = np.asarray(recorded, np.uint64)
  except (TypeError, ValueError, OverflowError):
    return
  if recorded.shape != replayed.shape:
    return
  steps, leaves = np.nonzero(recorded != replayed)
  if len(steps):
    result.diverged_step = result.start + int(steps[0]) + 1
    result.diverged_leaf = proof.path_str(proof.flatten(template)[int(leaves[0])][0])


_FIELDS = 6 + 2 * len(distances.METRICS) + 3


def gather(results: list[SegmentResult], total: int, leaf_paths: list[str]) -> list[SegmentResult]:
  """Every process's results, on every process (``jax.distributed``).

  Each process contributes its rows, padded to the same count, through one
  ``process_allgather``; a mismatch travels as its count and the position of
  its first leaf in ``leaf_paths``.
  """
  from jax.experimental import multihost_utils

  rows = -(-total // jax.process_count())
  table = np.full((rows, _FIELDS), np.nan)
  for r, res in enumerate(results):
    if res.error:
      count, first = -1, res.error_step
    else:
      count, first = res.differing, leaf_paths.index(res.first_differing) if res.differing else -1
    table[r] = [
      res.index,
      res.start,
      res.end,
      res.match,
      count,
      first,
      *(res.distance[m] for m in distances.METRICS),
      *(res.update[m] for m in distances.METRICS),
      res.seconds,
      -1 if res.diverged_step is None else res.diverged_step,
      -1 if res.diverged_leaf is None else leaf_paths.index(res.diverged_leaf),
    ]
  everything = np.asarray(multihost_utils.process_allgather(table)).reshape(-1, _FIELDS)
  out = []
  for process, row in enumerate(everything.reshape(jax.process_count(), rows, _FIELDS)):
    for values in row:
      if np.isnan(values[0]):
        continue
      n = len(distances.METRICS)
      count, first = int(values[4]), int(values[5])
      out.append(
        SegmentResult(
          index=int(values[0]),
          start=int(values[1]),
          end=int(values[2]),
          match=bool(values[3]),
          differing=max(count, 0),
          first_differing=leaf_paths[first] if count > 0 else None,
          error=(f"checkpoint {first}: fails its integrity check (found by process {process})" if count < 0 else None),
          error_step=first if count < 0 else None,
          distance=dict(zip(distances.METRICS, map(float, values[6 : 6 + n]), strict=True)),
          update=dict(zip(distances.METRICS, map(float, values[6 + n : 6 + 2 * n]), strict=True)),
          seconds=float(values[-3]),
          diverged_step=int(values[-2]) if values[-2] >= 0 else None,
          diverged_leaf=leaf_paths[int(values[-1])] if values[-1] >= 0 else None,
          device=f"process {process}",
        )
      )
  return out
