"""``record``: the training loop that writes a proof, and its resume."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from pol_jax import data as data_lib
from pol_jax import fingerprint, numerics, proof, sampling, store, training


class ProofExistsError(Exception):
  """The proof directory already holds a finished proof."""


def start_body(
  program: training.Program,
  dataset: data_lib.Dataset,
  plan: proof.Plan,
  config: dict | None,
  builder: dict | None = None,
) -> tuple[dict, Any]:
  """The part of the manifest fixed before training starts, and the initial state."""
  body, start, _ = _start(program, dataset, plan, config, builder)
  return body, start


def _start(program, dataset, plan: proof.Plan, config, builder):
  """:func:`start_body`, and the lowered program texts its digests are of (written to the proof)."""
  keys = training.derive_keys(plan.seed)
  # Round-trip through the host so the prover and a verifier (which restores
  # host arrays) call the compiled program with identical argument types.
  state0 = training.to_host(program.init(keys.init))
  segment = training.make_segment(program.step, plan.runner)
  texts = fingerprint.program_texts(segment, state0, dataset, plan, keys.step)
  body = {
    "schema": proof.SCHEMA,
    "config": config or {},
    "seed": plan.seed,
    "owner": {"public_key": plan.owner, "nonce": plan.nonce},
    "k": plan.k,
    "steps": plan.steps,
    "batch_size": plan.batch_size,
    "runner": plan.runner,
    "numerics": numerics.describe(program.numerics),
    "dataset": {"name": dataset.name, "size": len(dataset), "merkle_root": None},
    "environment": fingerprint.environment(),
    "programs": {name: fingerprint.program_digest(text) for name, text in texts.items()},
  }
  if builder is not None:
    body["builder"] = builder
  return body, (state0, segment, keys), texts


class _Stop:
  def __repr__(self) -> str:
    return "recorder.STOP"


STOP = _Stop()
"""What ``on_state`` returns to stop training early (:func:`record`)."""


def record(
  proof_dir: str,
  program: training.Program,
  dataset: data_lib.Dataset,
  plan: proof.Plan,
  *,
  config: dict | None = None,
  on_segment: Callable[[int, dict], None] | None = None,
  on_state: Callable[[int, Any, dict], None] | None = None,
  builder: dict | None = None,
) -> dict:
  """Trains ``plan.steps`` steps and writes a proof of it to ``proof_dir``.

  Records the whole training state at step 0, every ``plan.k`` steps and at the
  end, the index log, the per-example data digests and their Merkle root, and
  the manifest, written last and atomically. A worker thread copies each
  state to the host as one flat buffer per dtype with its leaf digests, and
  saves the states in batches, one Orbax checkpoint per batch written in the background
  (:class:`store.Writer`), while training goes on. Into a new directory, that
  thread also hashes in-memory examples (``data.Dataset``, ``data.Examples``) and writes
  run.json and the program texts while this one compiles the step, before
  any state is saved; an error there is raised once the first segment has run.

  If ``proof_dir`` holds a partial proof of the same run (a killed recording),
  training resumes from its last durable state; the finished proof's
  semantic root (``proof.semantic_root``: every state, log and data digest)
  is identical to an uninterrupted run's.

  Crash-loss bound: a state is durable once its batch's save is finalised.
  The save of a batch starts ``store.FLUSH_SECONDS`` (2 s) after its first
  state reached the worker thread, or as soon as it holds
  ``store.FLUSH_STATES`` (64) states or ``store.FLUSH_BYTES`` (256 MiB), and
  once the one save in flight has finished. A killed recording therefore
  loses at most the states handed to the worker within the last 2 s plus the
  time of two saves (the one in flight, and the one its batch waited for),
  and the up to 3 segments queued for or held by the worker (the queue is 2
  deep); every earlier state is durable, and a resumed recording starts from
  the last of them.

  Args:
    proof_dir: where to write; created if needed.
    program: ``init`` and ``step``, the same a verifier will use.
    dataset: the training data.
    plan: seed, k, T, B, runner.
    config: JSON-serialisable settings the verifier needs to rebuild
      ``program`` and ``dataset`` (recorded verbatim).
    on_segment: called as ``on_segment(step, metrics)`` once each segment's
      state is handed to the writer (on the saver thread), ``metrics`` the segment's mean
      of every metric the step returns (``{"loss": 0.31, "accuracy": 0.9}``).
    on_state: called as ``on_state(step, state, metrics)`` on the training
      thread after each segment, with the state at ``step`` (on device) and
      the step's metrics of every step of the segment (arrays of length k):
      where your own loop evaluated, logged or kept the best model. Training
      waits while it runs; it must not change ``state`` (recording goes on from
      the state the segment produced, whatever it does). Returning
      :data:`STOP` ends training there (early stopping): the proof is then a
      complete proof of the ``step`` steps trained (its manifest's ``steps``).
      A recording killed after that decision resumes to ``plan.steps``
      unless ``on_state`` says ``STOP`` again at the same step.
    builder: ``{"target": "package.module:function", "version": ...}``, the
      function that rebuilds ``(program, dataset)`` from ``config``
      (``experiments.train --program``); recorded so a verifier knows what to
      pass its own ``--program`` (it never imports what a proof names).

  Returns:
    The manifest.

  Raises:
    ProofExistsError: ``proof_dir`` holds a finished proof.
    proof.ProofError: ``proof_dir`` holds a partial proof of another run.
  """
  proof_dir = os.path.abspath(proof_dir)
  manifest_path = os.path.join(proof_dir, proof.MANIFEST)
  if os.path.exists(manifest_path):
    _drop_leftover_run(proof_dir)
    raise ProofExistsError(f"{manifest_path}: a finished proof is already there; it is never overwritten")
  os.makedirs(proof_dir, exist_ok=True)

  body, (state, segment, keys), texts = _start(program, dataset, plan, config, builder)
  log = sampling.index_log(keys.order, len(dataset), plan.batch_size, plan.steps)
  # run.json, the program texts and the data digests, written before any
  # checkpoint: at once for a partial proof (resuming needs them checked),
  # else by the saver thread while this one compiles the step.
  commit = _Start(proof_dir, json.loads(proof.canonical_json(body)), texts, dataset)
  fresh = not os.path.exists(os.path.join(proof_dir, proof.RUN)) and not _holds_checkpoints(proof_dir)
  # In memory, the examples can be hashed on the saver thread while this one
  # reads batches; a user's source (data.Source) is only ever read from one.
  if not (fresh and isinstance(dataset, (data_lib.Dataset, data_lib.Examples))):
    commit()

  writer = store.Writer(proof_dir)
  checkpoints: dict[str, str] = {}
  try:
    state = _resume(proof_dir, writer, state, checkpoints, plan)
    saver = _Saver(writer, checkpoints, on_segment, first=None if commit.done else commit)
    try:
      if not checkpoints:
        saver.put(state, {})
      resumed = int(state.step)
      for start, end in proof.segments(plan):
        if end <= resumed:
          continue
        # Dispatched asynchronously; the saver thread copies, hashes and
        # writes each state while the next segments run.
        state, metrics = segment.run(state, dataset.batch(log[start:end]), keys.step)
        saver.put(state, metrics)
        if on_state is not None:
          said = on_state(end, state, {k: v for k, v in metrics.items() if k != training.STATE_FINGERPRINT})
          if said is STOP and end < plan.steps:  # early stopping: the proof is of the steps trained
            body["steps"], log = end, log[:end]
            break
    finally:
      saver.close()
  finally:
    writer.close()

  body["dataset"]["merkle_root"] = commit.body["dataset"]["merkle_root"]
  manifest = finish(proof_dir, body, checkpoints, log, commit.digests)
  os.remove(os.path.join(proof_dir, proof.RUN))
  return manifest


def finish(proof_dir: str, body: dict, checkpoints: dict, log: np.ndarray, digests: np.ndarray) -> dict:
  """Writes the index log and data digests, then the sealed manifest (last, atomically); returns it.

  Call it once every checkpoint is finalised: the manifest's ``files`` lists
  the size and SHA-256 of every file in ``proof_dir`` but ``run.json`` (which
  :func:`record` removes next), so the root covers every byte of the proof.
  """
  proof.write_npy_atomic(os.path.join(proof_dir, proof.INDICES), log)
  proof.write_npy_atomic(os.path.join(proof_dir, proof.DATA_DIGESTS), digests)
  body["checkpoints"] = checkpoints
  body["indices"] = {"sha256": proof.leaf_digest("indices", log)}
  body["data_digests"] = {"sha256": proof.leaf_digest("data_digests", digests)}
  body["files"] = proof.file_listing(proof_dir, exclude=(proof.RUN,))
  manifest = proof.seal(body)
  proof.write_json_atomic(os.path.join(proof_dir, proof.MANIFEST), manifest)
  return manifest


def final_state(proof_dir: str, program: training.Program, manifest: dict) -> training.PyTree:
  """The final state of a recorded run, restored from its proof and checked.

  ``manifest`` is what :func:`record` returned (or the proof's manifest); the
  state's leaves are checked against the digests it lists.
  """
  template = jax.eval_shape(program.init, training.derive_keys(manifest["seed"]).init)
  steps = manifest["steps"]
  state, _ = store.restore(proof_dir, steps, template, manifest["checkpoints"][str(steps)])
  return state


class _Start:
  """Commits a recording's start: the data digests and their root into ``body``, run.json, the program texts."""

  def __init__(self, proof_dir: str, body: dict, texts: dict, dataset: data_lib.Dataset):
    self.proof_dir, self.body, self.texts, self.dataset = proof_dir, body, texts, dataset
    self.digests: np.ndarray | None = None

  @property
  def done(self) -> bool:
    return self.digests is not None

  def __call__(self) -> None:
    digests = self.dataset.digests()
    self.body["dataset"]["merkle_root"] = data_lib.merkle_root(digests)
    _commit_start(self.proof_dir, self.body)
    for name, text in self.texts.items():  # for a verifier's diff
      proof.write_program(self.proof_dir, name, text)
    self.digests = digests


def _holds_checkpoints(proof_dir: str) -> bool:
  path = os.path.join(proof_dir, proof.CHECKPOINTS)
  return os.path.isdir(path) and bool(os.listdir(path))


class _Saver:
  """Copies, hashes and hands recorded states to the writer in order, on a worker thread.

  The writer keeps them on the host and saves them in batches; this thread
  also starts the save of a batch that comes due while no state arrives. The
  queue is bounded, so a slow disk slows training down instead of buffering
  states without limit; ``close`` waits for every queued state to be saved
  and re-raises the worker's error, if any.
  """

  def __init__(self, writer: store.Writer, checkpoints: dict, on_segment, depth: int = 2, first=None):
    self._writer, self._checkpoints, self._on_segment, self._first = writer, checkpoints, on_segment, first
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._work, name="pol-jax-saver", daemon=True)
    self._thread.start()

  def put(self, state, metrics) -> None:
    if self._error is not None:
      raise self._error
    self._queue.put((state, metrics))

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join()
    if self._error is not None:
      raise self._error

  def _work(self) -> None:
    # While the training thread compiles the step: ``first`` (the start's
    # commit), then Orbax's start-up. A failed commit stops every save.
    if self._first is not None:
      self._guard(self._first)
    if self._error is None:
      self._guard(self._writer.prepare)
    while True:
      try:
        item = self._queue.get(timeout=self._writer.seconds_left() if self._error is None else None)
      except queue.Empty:  # the pending batch came due between two states
        self._guard(self._writer.flush)
        continue
      if item is None:
        return
      if self._error is None:  # else drain, so that put() never blocks forever
        self._guard(lambda item=item: self._save(*item))

  def _guard(self, action) -> None:
    try:
      action()
    except BaseException as e:  # noqa: BLE001 - re-raised on the training thread.
      self._error = e

  def _save(self, state, metrics) -> None:
    host, metrics = training.to_host((state, metrics))
    fingerprints = metrics.pop(training.STATE_FINGERPRINT, np.zeros((0, len(jax.tree.leaves(host))), np.uint32))
    summary = {name: float(np.mean(v)) for name, v in metrics.items()}
    self._checkpoints[str(int(host.step))] = self._writer.save(host, summary, fingerprints)
    if self._on_segment is not None and int(host.step) > 0:
      self._on_segment(int(host.step), summary)


def _drop_leftover_run(proof_dir: str) -> None:
  """Removes the ``run.json`` of a recording killed between sealing its manifest and removing it.

  It is not in the manifest's file listing, so a verifier would reject the
  proof for it; the recording had finished, so nothing else is touched.
  """
  path = os.path.join(proof_dir, proof.RUN)
  if not os.path.isfile(path) or os.path.islink(path):
    return
  try:
    files = proof.read_json(os.path.join(proof_dir, proof.MANIFEST), proof.MANIFEST).get("files")
  except (proof.ProofError, AttributeError):
    return
  if isinstance(files, dict) and proof.RUN not in files:
    os.remove(path)


def _commit_start(proof_dir: str, body: dict) -> None:
  """Writes run.json, or checks that a partial proof there is of this run."""
  path = os.path.join(proof_dir, proof.RUN)
  if not os.path.exists(path):
    if _holds_checkpoints(proof_dir):
      raise proof.ProofError(proof.RUN, "file", f"missing, but {proof_dir} holds checkpoints; use a new directory")
    proof.write_json_atomic(path, body)
    return
  previous = proof.read_json(path, proof.RUN)
  body = json.loads(proof.canonical_json(body))  # Compare as JSON: tuples read back as lists.
  if previous != body:
    differ = sorted(k for k in set(body) | set(previous) if body.get(k) != previous.get(k))
    raise proof.ProofError(
      proof.RUN,
      ",".join(differ),
      f"the partial proof in {proof_dir} is of another run (these fields differ); resume it with the same "
      "settings and environment, or record into a new directory",
    )


def _resume(proof_dir, writer, state0, checkpoints, plan: proof.Plan):
  """Restores the last durable state of a partial proof, if any (its batches' states, each checked)."""
  wanted = set(proof.checkpoint_steps(plan.k, plan.steps))
  done = [s for s in writer.completed_steps() if s in wanted]
  if not done:
    return state0
  metas = store.read_metas(proof_dir, dict.fromkeys(done))
  for step, meta in metas.items():
    checkpoints[str(step)] = proof.digest_json(meta)
  if done != sorted(wanted)[: len(done)]:
    raise proof.ProofError(proof.RUN, "checkpoints", f"the partial proof in {proof_dir} has gaps: steps {done}")
  if metas[0]["leaves"] != proof.leaf_digests(state0):
    raise proof.ProofError(
      proof.RUN, "checkpoints", f"the partial proof in {proof_dir} does not start from this run's init"
    )
  state, _ = store.restore(proof_dir, done[-1], state0)
  return training.to_host(state)
