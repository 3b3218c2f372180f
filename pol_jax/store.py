"""The proof's recorded states on disk: batched Orbax checkpoints, written and read.

A batch is one Orbax checkpoint, ``checkpoints/<b>/``, named by the last step
it holds: its ``state`` item is ``{"<dtype>": [states, elements]}``, row i the
i-th state in step order, a state's row every leaf of that stored dtype
raveled and concatenated in tree order; its ``meta`` item is
``{"states": {"<step>": meta}, "layout": [[path, dtype, shape], ...]}``.
The state at step s lives in the first batch b >= s. A state's meta is what
the manifest's ``checkpoints`` digests (:mod:`pol_jax.proof`), and its
``leaves`` are checked leaf by leaf after a restore.

:class:`Writer` is the recorder's side: states kept on the host as one flat
buffer per dtype, saved in asynchronous batches. :func:`restore` and
:func:`restore_batch` are the verifier's: declared sizes checked before
anything is allocated, every leaf's digest checked before the state is used.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from typing import Any

import jax
import numpy as np

from pol_jax import safeio, training
from pol_jax.proof import (
  CHECKPOINTS,
  MAX_CHECKPOINTS,
  MAX_LEAF_BYTES,
  IntegrityError,
  ProofError,
  digest_json,
  flatten,
  fsync_directory,
  inside,
  leaf_digest,
  path_str,
  read_json,
  stored,
)

FLUSH_SECONDS = 2.0
"""A recorded state waits at most this long on the host before the save of its batch starts."""
FLUSH_STATES = 64
"""At most this many states go in one batch."""
FLUSH_BYTES = 256 << 20
"""A batch is saved once its buffers hold this many bytes."""
_FLUSH_META_BYTES = 16 << 20  # well under MAX_JSON_BYTES: a batch's meta is read whole


def pack(state: Any, paths: dict | None = None) -> tuple[dict[str, np.ndarray], list, dict[str, str]]:
  """A host state as ``(buffers, layout, leaf digests)``: one flat buffer per stored dtype.

  ``layout`` is ``[[path, dtype, shape], ...]`` in tree order, the stored
  dtype and shape of every leaf (a typed PRNG key's key data); a dtype whose
  leaves hold no element has no buffer.

  >>> import numpy as np
  >>> buffers, layout, _ = pack({"a": np.ones(2, np.float32), "b": np.zeros((), np.int32), "c": np.ones(1, np.float32)})
  >>> {d: b.tolist() for d, b in buffers.items()}, layout[1]
  ({'float32': [1.0, 1.0, 1.0], 'int32': [0]}, ['b', 'int32', []])

  ``paths``: a dict in which to keep each tree structure's leaf paths, for
  a caller that packs many states of one structure (:class:`Writer`, one
  per recording). Not shared wider: structures compare dict keys with
  ``==``, so ``{1: x}`` and ``{True: x}`` are equal structures with
  different paths.
  """
  groups: dict[str, list] = {}
  layout, leaves = [], {}
  values, treedef = jax.tree.flatten(state)
  for path, leaf in zip(_paths(treedef, state, {} if paths is None else paths), values, strict=True):
    leaves[path] = leaf_digest(path, leaf)
    array = np.asarray(stored(leaf))  # not ascontiguousarray: it makes a scalar one-dimensional
    dtype = _dtype_name(array.dtype)
    layout.append([path, dtype, list(array.shape)])
    if array.size:
      groups.setdefault(dtype, []).append(np.ascontiguousarray(array).reshape(-1))
  buffers = {dtype: np.concatenate(arrays) for dtype, arrays in groups.items()}
  return buffers, layout, leaves


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype: np.dtype) -> str:
  return dtype.name


def _paths(treedef, state: Any, cache: dict) -> list[str]:
  """The path of every leaf of ``state`` (whose structure is ``treedef``), in tree order, checked unambiguous."""
  try:
    paths = cache.get(treedef)
  except TypeError:  # a node whose aux data cannot be hashed: no cache
    treedef, paths = None, None
  if paths is None:
    paths, seen = [], set()
    for names, _ in flatten(state):
      path = path_str(names)
      if path in seen or any("/" in n for n in names):
        raise ValueError(f"State path {path!r} is ambiguous.")
      paths.append(path)
      seen.add(path)
    if treedef is not None:
      if len(cache) >= 8:
        cache.clear()
      cache[treedef] = paths
  return paths


def _stored_spec(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  """``(shape, dtype)`` of what a checkpoint stores for a state leaf (concrete or ``jax.ShapeDtypeStruct``)."""
  if training.is_key(leaf):
    spec = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype))
    return tuple(spec.shape), np.dtype(spec.dtype)
  return tuple(np.shape(leaf)), np.dtype(leaf.dtype)


def _key_impl(leaf: Any):
  """The PRNG implementation of a typed key leaf, concrete or ``jax.ShapeDtypeStruct``."""
  try:
    return jax.random.key_impl(leaf)
  except TypeError:  # a jax.ShapeDtypeStruct of keys
    return leaf.dtype._impl


def _template_layout(template: Any) -> tuple[list, dict[str, int]]:
  """``([(names, leaf, dtype, shape, offset)], {dtype: elements})`` of what a batch stores for ``template``."""
  entries, totals = [], {}
  for names, leaf in flatten(template):
    shape, dtype = _stored_spec(leaf)
    count = math.prod(shape)
    entries.append((names, leaf, dtype, shape, totals.get(dtype.name, 0)))
    if count:
      totals[dtype.name] = totals.get(dtype.name, 0) + count
  return entries, totals


class Writer:
  """Saves recorded states in batches: one Orbax checkpoint per batch, written in the background.

  :meth:`save` keeps a state on the host as one flat buffer per dtype; a
  batch is saved (on the writer's own thread, one save in flight at a time)
  once its oldest state has waited ``flush_seconds``, or it holds
  ``flush_states`` states or ``flush_bytes`` bytes (by default
  :data:`FLUSH_SECONDS`, :data:`FLUSH_STATES`, :data:`FLUSH_BYTES`), and on
  :meth:`flush`, :meth:`wait` and :meth:`close`. A batch is written under a
  temporary name (``<step>.pol-jax-tmp-<pid>-<n>``) and renamed to its step
  once its Orbax item is finalised and its meta is on disk, so a state is
  durable once its batch is renamed: a crash loses the states not yet
  flushed and those of the save in flight, and leaves a temporary directory
  that the next writer of the directory removes.

  The state item is written by Orbax's ``PyTreeCheckpointHandler`` (what a
  verifier reads it with) in one event loop kept for the writer's life:
  Orbax's ``CheckpointManager`` measured 22-26 ms a save on the default
  config's 31 states against 13.5-16.6 ms for the handler alone, most of
  it event loops, threads and bookkeeping files made anew for each save.
  Its methods may be called from two threads (a recorder's saver thread,
  and the training thread closing it).
  """

  def __init__(
    self,
    proof_dir: str,
    *,
    flush_seconds: float | None = None,
    flush_states: int | None = None,
    flush_bytes: int | None = None,
  ):
    logging.getLogger("absl").addFilter(_quiet_orbax)
    self.proof_dir = os.path.abspath(proof_dir)
    self.directory = os.path.join(self.proof_dir, CHECKPOINTS)
    self.flush_seconds = FLUSH_SECONDS if flush_seconds is None else flush_seconds
    self.flush_states = FLUSH_STATES if flush_states is None else flush_states
    self.flush_bytes = FLUSH_BYTES if flush_bytes is None else flush_bytes
    self._ocp = self._handler = self._thread = None  # made by prepare() or the first flush
    self._loop = None  # the writer thread's event loop, made there
    self._inflight = None  # the save in flight (a concurrent.futures.Future)
    self._lock = threading.RLock()
    self._names = itertools.count()
    if safeio.is_real_dir(self.directory):  # a partial proof: what a killed save left goes now
      remove_unfinished(self.directory)
    self._pending: list[tuple[int, dict, dict]] = []
    self._layout: list | None = None
    self._paths: dict = {}  # the states' tree structures -> their leaf paths (pack)
    self._since = 0.0
    self._bytes = self._meta_bytes = 0

  def completed_steps(self) -> list[int]:
    """Steps of every state that a finalised batch holds.

    A batch is written under a temporary name and renamed to its step once
    finalised, so a killed save leaves no directory named by a step.
    """
    steps = []
    for batch in batches(self.proof_dir):
      steps += [int(s) for s in read_batch_meta(self.proof_dir, batch)["states"]]
    return sorted(steps)

  def prepare(self) -> None:
    """Imports Orbax and makes its handler now, for a thread that runs while the step compiles.

    The first time in a process that is a quarter of a second of imports;
    else the first save pays it, and for a run shorter than one flush window
    that is its only save, at the end, where nothing overlaps it.
    """
    with self._lock:
      self._start()

  def _start(self) -> None:
    if self._handler is None:
      import concurrent.futures

      import orbax.checkpoint as ocp

      # This process's alone: Orbax's default would synchronise every jax.distributed process.
      local = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={jax.process_index()})
      self._ocp, self._handler = ocp, ocp.PyTreeCheckpointHandler(multiprocessing_options=local)
      self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pol-jax-writer")

  def save(self, state: Any, metrics: dict | None = None, fingerprints: np.ndarray | None = None) -> str:
    """Adds ``state`` (host arrays) to the batch, saving the batch when it is due; returns the state's meta digest.

    ``fingerprints`` (uint32 ``[steps, leaves]``) are the per-step state
    fingerprints of the segment that ended here (``training.state_fingerprint``).
    """
    step = int(np.asarray(state.step))
    buffers, layout, leaves = pack(state, self._paths)
    meta = {"step": step, "leaves": leaves, "metrics": metrics or {}}
    if fingerprints is not None:
      meta["fingerprints"] = np.asarray(fingerprints, np.uint32).tolist()
    with self._lock:
      if self._pending and (layout != self._layout or step <= self._pending[-1][0]):
        self.flush()
      if not self._pending:
        self._since = time.monotonic()
      self._pending.append((step, buffers, meta))
      self._layout = layout
      self._bytes += sum(b.nbytes for b in buffers.values())
      self._meta_bytes += 100 * (len(leaves) + np.size(fingerprints if fingerprints is not None else 0))
      if self.seconds_left() == 0.0:
        self.flush()
    return digest_json(meta)

  def seconds_left(self) -> float | None:
    """Seconds until the pending batch is due (0 when it is), None when nothing is pending."""
    if not self._pending:
      return None
    if len(self._pending) >= self.flush_states or self._bytes >= self.flush_bytes:
      return 0.0
    if self._meta_bytes >= _FLUSH_META_BYTES:
      return 0.0
    return max(0.0, self._since + self.flush_seconds - time.monotonic())

  def flush(self) -> None:
    """Starts the save of the pending states as one batch (waiting for the save in flight first).

    Raises:
      The error of the save in flight, if it failed (the pending states are kept).
    """
    with self._lock:
      if not self._pending:
        return
      self._settle()
      self._start()
      # One [states, elements] array per dtype: Orbax's cost grows with the number of arrays.
      tree = {d: np.stack([buffers[d] for _, buffers, _ in self._pending]) for d in self._pending[0][1]}
      meta = {"states": {str(step): meta for step, _, meta in self._pending}, "layout": self._layout}
      last = self._pending[-1][0]
      self._pending, self._bytes, self._meta_bytes = [], 0, 0
      self._inflight = self._thread.submit(self._write, last, tree, meta)

  def _settle(self) -> None:
    """Waits for the save in flight; re-raises its error."""
    with self._lock:
      inflight, self._inflight = self._inflight, None
      if inflight is not None:
        inflight.result()

  def _temporary(self, step: int) -> str:
    return os.path.join(self.directory, f"{step}{_TMP}{os.getpid()}-{next(self._names)}")

  def _write(self, step: int, tree: dict, meta: dict) -> None:
    """Writes one batch (on the writer thread): the state item, then its meta, then the rename that finalises it."""
    import asyncio

    from etils import epath

    os.makedirs(self.directory, exist_ok=True)
    if not safeio.is_real_dir(self.directory):
      raise OSError(f"{self.directory} is not a directory (a link?); record into a new directory")
    tmp = self._temporary(step)
    os.mkdir(tmp)
    os.mkdir(os.path.join(tmp, "state"))
    os.mkdir(os.path.join(tmp, "meta"))
    item = epath.Path(tmp) / "state"
    if self._loop is None:
      self._loop = asyncio.new_event_loop()
    args = self._ocp.args.PyTreeSave(tree)
    commits = self._loop.run_until_complete(self._handler.async_save(item, args=args))
    for commit in commits or ():
      commit.result()
    self._handler.finalize(item)
    with open(os.path.join(tmp, "meta", "metadata"), "wb") as f:
      f.write(json.dumps(meta).encode())
      f.flush()
      os.fsync(f.fileno())
    final = os.path.join(self.directory, str(step))
    if os.path.lexists(final):  # a batch of this step saved again (a coordinator redoing a round)
      aside = self._temporary(step)
      os.rename(final, aside)
      os.rename(tmp, final)
      _remove_quietly(aside)  # a temporary name: the next writer removes what is left
    else:
      os.rename(tmp, final)
    fsync_directory(self.directory)

  def wait(self) -> None:
    """Saves the pending states and blocks until every started save is finalised."""
    with self._lock:
      self.flush()
      self._settle()

  def close(self) -> None:
    with self._lock:
      try:
        self.wait()
      finally:
        if self._thread is not None:
          if self._loop is not None:
            self._thread.submit(self._loop.close).result()
          self._thread.shutdown()
          self._handler.close()
          self._thread = self._handler = self._loop = None


_TMP = ".pol-jax-tmp-"
# Ours (<step>.pol-jax-tmp-<pid>-<n>), and Orbax's (<step>.orbax-checkpoint-tmp[-<time>]) in proofs begun before.
_UNFINISHED = re.compile(r"[0-9]+\.(pol-jax-tmp-[0-9]+-[0-9]+|orbax-checkpoint-tmp(-[0-9]+)?)")


def remove_unfinished(directory: str) -> list[str]:
  """Removes what killed saves left in a ``checkpoints/`` directory (nothing followed); returns the names removed.

  Best effort: what cannot be removed is logged and left (its name is never
  a batch's, and a recording's file listing refuses it later), so a
  planted, undeletable tree cannot stop a coordinator from opening its run.
  """
  removed = []
  if not safeio.is_real_dir(directory):
    return removed
  with os.scandir(directory) as entries:
    for entry in entries:
      if _UNFINISHED.fullmatch(entry.name) and _remove_quietly(entry.path):
        removed.append(entry.name)
  return removed


def _remove_quietly(path: str) -> bool:
  """Removes a directory tree, or a link or file in its place, without following a link; False if it could not."""
  import shutil
  import stat

  try:
    if stat.S_ISDIR(os.lstat(path).st_mode):
      shutil.rmtree(path)  # removes links inside, never follows them
    else:
      os.unlink(path)
    return True
  except OSError as e:
    logging.getLogger(__name__).warning("could not remove %s: %s", path, e)
    return False


def _is_batch(path: str) -> bool:
  """A directory that holds a batch's meta (a regular file in a real directory, nothing followed)."""
  import stat

  try:
    return (
      stat.S_ISDIR(os.lstat(path).st_mode)
      and stat.S_ISDIR(os.lstat(os.path.join(path, "meta")).st_mode)
      and stat.S_ISREG(os.lstat(os.path.join(path, "meta", "metadata")).st_mode)
    )
  except (FileNotFoundError, NotADirectoryError):
    return False


def batches(proof_dir: str) -> list[int]:
  """The batches of a proof's ``checkpoints/``: the names that are steps, sorted (nothing is followed).

  A directory without a batch's meta is none: an empty ``checkpoints/0/``
  (which no file digest covers) would otherwise take step 0 from its batch.
  """
  directory = inside(proof_dir, CHECKPOINTS)
  out = []
  try:
    with os.scandir(directory) as entries:
      for entry in entries:
        if len(out) > MAX_CHECKPOINTS:
          raise IntegrityError(f"{CHECKPOINTS}: over {MAX_CHECKPOINTS} entries")
        name = entry.name
        if name.isascii() and name.isdigit() and str(int(name)) == name and _is_batch(entry.path):
          out.append(int(name))
  except FileNotFoundError:
    return []
  except OSError as e:
    raise IntegrityError(f"{CHECKPOINTS}: unreadable ({e.strerror})") from None
  return sorted(out)


def batch_of(step: int, names: list[int]) -> int | None:
  """The batch that holds the state at ``step``: the first of ``names`` (sorted) at or after it.

  >>> batch_of(22, [10, 30, 40]), batch_of(30, [10, 30, 40]), batch_of(41, [10, 30, 40])
  (30, 30, None)
  """
  import bisect

  i = bisect.bisect_left(names, step)
  return names[i] if i < len(names) else None


def read_batch_meta(proof_dir: str, batch: int) -> dict:
  """A batch's meta item, shape-checked: ``{"states": {"<step>": meta}, "layout": [...]}``.

  Raises:
    IntegrityError: missing, unreadable or malformed (the batch named).
  """
  label = f"{CHECKPOINTS}/{batch}"
  path = inside(proof_dir, CHECKPOINTS, str(batch), "meta", "metadata")
  try:
    meta = read_json(path, f"{label}/meta")
  except ProofError as e:
    raise IntegrityError(f"{label}: meta {str(e).split(': ', 1)[1]}") from None
  if not (isinstance(meta, dict) and isinstance(meta.get("states"), dict) and isinstance(meta.get("layout"), list)):
    raise IntegrityError(f"{label}: meta is malformed (expected the fields states and layout)")
  if len(meta["states"]) > MAX_CHECKPOINTS or not all(
    s.isascii() and s.isdigit() and str(int(s)) == s and int(s) <= batch for s in meta["states"]
  ):
    raise IntegrityError(f"{label}: meta lists states other than steps up to {batch}")
  return meta


def _state_meta(batch_meta: dict, batch: int, step: int, expected_digest: str | None) -> dict:
  label = f"checkpoint {step}"
  meta = batch_meta["states"].get(str(step))
  if meta is None:
    raise IntegrityError(f"{label}: not in {CHECKPOINTS}/{batch}, the batch that must hold it")
  if expected_digest is not None and digest_json(meta) != expected_digest:
    raise IntegrityError(f"{label}: meta digest does not match the manifest")
  if not (isinstance(meta, dict) and meta.get("step") == step and isinstance(meta.get("leaves"), dict)):
    raise IntegrityError(f"{label}: meta is malformed")
  return meta


def _locate(proof_dir: str, step: int, names: list[int] | None = None) -> int:
  batch = batch_of(step, batches(proof_dir) if names is None else names)
  if batch is None:
    raise IntegrityError(f"checkpoint {step}: missing (no batch {CHECKPOINTS}/<b> with b >= {step})")
  return batch


def read_meta(proof_dir: str, step: int, expected_digest: str | None) -> dict:
  """The meta of the state at ``step``, checked against its manifest digest."""
  batch = _locate(proof_dir, step)
  try:
    return _state_meta(read_batch_meta(proof_dir, batch), batch, step, expected_digest)
  except IntegrityError as e:
    if str(e).startswith(f"{CHECKPOINTS}/"):
      raise IntegrityError(f"checkpoint {step}: {e}") from None
    raise


def read_metas(
  proof_dir: str, expected: dict[int, str | None], batch_metas: dict[int, dict] | None = None
) -> dict[int, dict]:
  """The metas of the states at the steps of ``expected`` (``{step: digest or None}``), each batch read once.

  ``batch_metas``: ``{batch: meta}`` already read (:func:`read_batch_meta`), not read again.
  """
  names = batches(proof_dir)
  by_batch: dict[int, list[int]] = {}
  for step in sorted(expected):
    by_batch.setdefault(_locate(proof_dir, step, names), []).append(step)
  out = {}
  for batch, steps in by_batch.items():
    try:
      batch_meta = (batch_metas or {}).get(batch) or read_batch_meta(proof_dir, batch)
    except IntegrityError as e:
      raise IntegrityError(f"checkpoint {steps[0]}: {e}") from None
    for step in steps:
      out[step] = _state_meta(batch_meta, batch, step, expected[step])
  return out


def _quiet_orbax(record) -> bool:
  """Drops two Orbax warnings that say nothing to a user: the step-level metadata a state item lacks
  (we read items, not steps) and its object-size logging being off for a process-local checkpointer."""
  message = record.getMessage()
  if message.startswith("Metadata file does not exist") and "_CHECKPOINT_METADATA" in message:
    return False
  return not message.startswith("Global object size logging disabled")


@functools.cache
def _local_checkpointer(process_index: int):
  """An Orbax checkpointer that reads for this process alone.

  Orbax's default synchronises all ``jax.distributed`` processes around every
  restore; verifier processes read different checkpoints, so that would
  deadlock. Reading host NumPy arrays needs no coordination.
  """
  import orbax.checkpoint as ocp

  logging.getLogger("absl").addFilter(_quiet_orbax)
  local = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={process_index})
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=local), multiprocessing_options=local)


def batch_rows(batch_meta: dict) -> list[int]:
  """The steps of a batch's states in the order of its buffers' rows (ascending)."""
  return sorted(int(step) for step in batch_meta["states"])


def stored_buffers(state_dir: str, rows: list[int], steps: list[int], per_state: dict[str, int], label: str) -> dict:
  """The flat buffers of ``steps`` from a batch's ``state`` item, once the declared sizes are checked.

  The item holds one ``[len(rows), elements]`` array per dtype, row i the
  state at ``rows[i]``; ``per_state`` is ``{dtype: elements}``, what the caller
  expects of each state. Orbax's metadata must declare exactly those arrays
  before anything is allocated.

  Returns:
    ``{step: {dtype: 1-D buffer}}``.

  Raises:
    IntegrityError: ``label`` and the culprit named.
  """
  import orbax.checkpoint as ocp

  checkpointer = _local_checkpointer(jax.process_index())
  try:
    tree = checkpointer.metadata(state_dir).item_metadata.tree
  except Exception as e:  # Orbax/TensorStore raise many kinds on a damaged directory.
    raise IntegrityError(f"{label}: unreadable state metadata ({type(e).__name__})") from None
  want = {d: ((len(rows), n), np.dtype(d)) for d, n in per_state.items()}
  got = (
    {d: (tuple(getattr(m, "shape", ()) or ()), np.dtype(getattr(m, "dtype", None) or "V1")) for d, m in tree.items()}
    if isinstance(tree, dict)
    else None
  )
  if got != want:
    raise IntegrityError(f"checkpoint {steps[0]}: {label} stores {got}, expected {want}")
  for d, n in per_state.items():
    if len(rows) * n * np.dtype(d).itemsize > MAX_LEAF_BYTES:
      raise IntegrityError(f"checkpoint {steps[0]}: {label}'s {d} buffer is over the {MAX_LEAF_BYTES}-byte limit")
  _check_chunks(state_dir, {d: shape for d, (shape, _) in want.items()}, f"checkpoint {steps[0]}: {label}")
  restore_args = {d: ocp.RestoreArgs(restore_type=np.ndarray) for d in per_state}
  try:
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # A damaged array surfaces as a TensorStore/ValueError/OSError.
    raise IntegrityError(f"{label}: unreadable state ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
  index = {step: i for i, step in enumerate(rows)}
  return {step: {d: np.asarray(restored[d])[index[step]] for d in per_state} for step in steps}


_MAX_ZARRAY_BYTES = 64 << 10


def _read_at_most(kv, key: str, limit: int) -> bytes:
  """The first ``limit`` bytes of ``key``'s value, or all of a shorter one (TensorStore refuses a range past the end)."""
  try:
    return kv.read(key.encode(), byte_range=slice(0, limit)).result().value
  except ValueError as e:
    if "OUT_OF_RANGE" not in str(e):
      raise
  return kv.read(key.encode()).result().value  # shorter than limit


def _check_chunks(state_dir: str, shapes: dict[str, tuple[int, ...]], label: str) -> None:
  """Each stored array's zarr metadata is what the writer makes: C order, no filters, zstd or none, chunks within its shape.

  Orbax's metadata declares shapes, not chunks, and TensorStore allocates a
  whole chunk to read one: a chunk shape edited inside the OCDBT store (the
  array's shape left alone) made it allocate past any limit and abort the
  process. Read through TensorStore's OCDBT key-value store, each
  ``.zarray`` bounded and parsed strictly.

  Raises:
    IntegrityError: naming the array and what is wrong.
  """
  import tensorstore as ts

  try:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{os.path.abspath(state_dir)}/"}).result()
  except Exception as e:  # TensorStore raises ValueError and its own kinds on a damaged store
    raise IntegrityError(f"{label}: unreadable state store ({type(e).__name__})") from None
  for dtype, shape in shapes.items():
    key = f"{dtype}/.zarray"
    try:
      raw = _read_at_most(kv, key, _MAX_ZARRAY_BYTES + 1)
      meta = safeio.loads_json(raw, key) if 0 < len(raw) <= _MAX_ZARRAY_BYTES else None
    except safeio.Refused:
      meta = None
    except Exception as e:  # a damaged store
      raise IntegrityError(f"{label}: {key} unreadable ({type(e).__name__})") from None
    chunks = meta.get("chunks") if isinstance(meta, dict) else None
    compressor = meta.get("compressor") if isinstance(meta, dict) else None
    ok = (
      isinstance(meta, dict)
      and meta.get("zarr_format") == 2
      and meta.get("shape") == list(shape)
      and meta.get("order") == "C"
      and meta.get("filters") is None
      and (compressor is None or (isinstance(compressor, dict) and compressor.get("id") == "zstd"))
      and isinstance(chunks, list)
      and len(chunks) == len(shape)
      and all(type(c) is int and 1 <= c <= max(n, 1) for c, n in zip(chunks, shape, strict=True))
    )
    if not ok:
      raise IntegrityError(
        f"{label}: {key} is not the zarr metadata of a [{', '.join(map(str, shape))}] array stored in C order, "
        f"zstd or uncompressed, in chunks within its shape: {raw[:120]!r}"
      )


def restore_batch(
  proof_dir: str, batch: int, template: Any, expected: dict[int, str | None], batch_meta: dict | None = None
) -> dict[int, tuple[Any, dict]]:
  """Restores the states at the steps of ``expected`` (``{step: digest}``) from batch ``batch``, checked, in one read.

  Checks, in order: each state's meta against its digest (the manifest's;
  None skips it), that the leaves it lists are the template's, that the
  stored buffers are exactly the template's sizes (before anything is
  allocated), and that every restored leaf's digest is the recorded one.

  Returns:
    ``{step: (state as host NumPy arrays, meta)}``.

  Raises:
    IntegrityError: naming the checkpoint and the leaf.
  """
  if batch_meta is None:
    batch_meta = read_batch_meta(proof_dir, batch)
  steps = sorted(expected)
  metas = {step: _state_meta(batch_meta, batch, step, expected[step]) for step in steps}
  entries, totals = _template_layout(template)
  paths = [path_str(names) for names, *_ in entries]
  for step, meta in metas.items():
    if set(meta["leaves"]) != set(paths):
      missing = sorted(set(paths) - set(meta["leaves"]))[:3]
      extra = sorted(set(meta["leaves"]) - set(paths))[:3]
      raise IntegrityError(
        f"checkpoint {step}: state leaves differ from the verifier's: missing {missing}, unexpected {extra}"
      )
  for names, _, dtype, shape, _ in entries:
    if dtype.itemsize * math.prod(shape) > MAX_LEAF_BYTES:
      raise IntegrityError(f"checkpoint {steps[0]}: {path_str(names)} is over the {MAX_LEAF_BYTES}-byte leaf limit")
  state_dir = inside(proof_dir, CHECKPOINTS, str(batch), "state")
  restored = stored_buffers(state_dir, batch_rows(batch_meta), steps, totals, f"{CHECKPOINTS}/{batch}")
  structure = jax.tree.structure(template)
  out = {}
  for step in steps:
    buffers = restored[step]
    leaves = []
    for names, leaf, dtype, shape, offset in entries:
      count = math.prod(shape)
      array = buffers[dtype.name][offset : offset + count].reshape(shape) if count else np.zeros(shape, dtype)
      if training.is_key(leaf):
        array = jax.random.wrap_key_data(array, impl=_key_impl(leaf))
      if leaf_digest(path_str(names), array) != metas[step]["leaves"][path_str(names)]:
        raise IntegrityError(f"checkpoint {step}: digest mismatch in {path_str(names)}")
      leaves.append(array)
    out[step] = (jax.tree.unflatten(structure, leaves), metas[step])
  return out


def restore(proof_dir: str, step: int, template: Any, expected_digest: str | None = None) -> tuple[Any, dict]:
  """Restores the state at ``step`` into ``template``'s structure, checked (see :func:`restore_batch`).

  Returns:
    ``(state as host NumPy arrays, meta)``.

  Raises:
    IntegrityError: naming the checkpoint and the leaf.
  """
  batch = _locate(proof_dir, step)
  try:
    batch_meta = read_batch_meta(proof_dir, batch)
  except IntegrityError as e:
    raise IntegrityError(f"checkpoint {step}: {e}") from None
  return restore_batch(proof_dir, batch, template, {step: expected_digest}, batch_meta)[step]


_DTYPES = (
  "bool",
  "int8",
  "uint8",
  "int16",
  "uint16",
  "int32",
  "uint32",
  "int64",
  "uint64",
  "float16",
  "bfloat16",
  "float32",
  "float64",
)


def unpack_layout(layout: Any, buffers: dict[str, np.ndarray], label: str, max_leaves: int) -> dict[str, np.ndarray]:
  """``{path: array}`` of a state stored without a template: split by a batch's (untrusted) ``layout``.

  The layout is checked against the buffers' sizes before any array is made.

  Raises:
    IntegrityError: a malformed layout, or one the buffers do not match.
  """
  if not isinstance(layout, list) or len(layout) > max_leaves:
    raise IntegrityError(f"{label}: layout is not a list of at most {max_leaves} leaves")
  totals: dict[str, int] = {}
  parsed = []
  for entry in layout:
    ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], str)
    ok = ok and (entry[1] in buffers or entry[1] in _DTYPES) and isinstance(entry[2], list)
    ok = ok and len(entry[2]) <= 32 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[2])
    if not ok:
      raise IntegrityError(f"{label}: layout entry {str(entry)[:80]} is malformed")
    count = math.prod(entry[2])
    parsed.append((entry[0], entry[1], tuple(entry[2]), totals.get(entry[1], 0), count))
    totals[entry[1]] = totals.get(entry[1], 0) + count
  sizes = {d: int(np.asarray(b).size) for d, b in buffers.items()}
  if {d: n for d, n in totals.items() if n} != sizes:
    raise IntegrityError(f"{label}: layout sizes {totals} do not match the stored buffers {sizes}")
  out = {}
  for path, dtype, shape, offset, count in parsed:
    source = np.asarray(buffers[dtype]) if count else np.zeros(0, np.dtype(dtype))
    out[path] = source[offset : offset + count].reshape(shape)
  return out
