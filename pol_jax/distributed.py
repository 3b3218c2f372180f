"""Training across untrusted workers: every update comes with a proof, checked before it is aggregated.

The paper's second application. Each round the coordinator hands every
worker the current state and an :class:`Assignment` (a round seed, from which
the worker's data order and step keys derive, and how many steps of what
size); the worker trains from that state with the same segment runner as
everywhere else and returns a proof of its steps (an ordinary pol-jax proof
whose initial state is the coordinator's). The coordinator checks the proof
(:func:`judge`: size, assignment, then :func:`pol_jax.verifier.verify` with the
coordinator's own program, data and a verifier seed the worker cannot
know), aggregates the accepted updates in worker order (:func:`aggregate`,
so a run replays bit for bit) and records the round.

Every worker proof is bound to one owner's key (:attr:`Setup.owner`, the
run's public key): an assignment's seed is ``proof.bound_seed(owner,
nonce)`` with the round seed as the nonce.

Two things keep a hostile worker from harming the run beyond its own
update. Each judgement runs in a child process (:class:`Judge`,
:mod:`pol_jax.isolation`) under a time and memory limit, on a private copy
of the upload: whatever a proof makes the judgement do (raise, hang,
exhaust memory), that child is ended, that worker is rejected with the
reason, and the other uploads are judged in a fresh child. And the
verifier seed of each judgement is drawn from the OS (``secrets``) by
that child once it has copied the upload, so it exists nowhere before the
proof is frozen; nothing a worker can read names it
before the judgement (the coordinator keeps no secret, on disk or
otherwise), and it reaches the shared storage only in the round's record,
after the judgement, for audit.

Workers run wherever an engine puts them: :class:`Worker` (an honest one)
is a plain class, which :class:`RayEngine` runs as Ray actors and
:class:`LocalEngine` in this process. An engine given a subclass
(``worker=``) runs it instead: ``experiments.byzantine.Worker`` plays the
Byzantine behaviours the experiments and tests throw at a coordinator.

Everything but :class:`RayEngine` is host-side NumPy and JAX; Ray is
imported only when an engine is made.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import queue
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from pol_jax import challenge, isolation, proof, recorder, store, training, verifier
from pol_jax import data as data_lib

PyTree = Any

AGGREGATORS = ("mean", "median")


@dataclasses.dataclass(frozen=True)
class Assignment:
  """What a worker must do in a round: ``steps`` steps of ``batch_size`` from ``seed``'s order, recorded every ``k``.

  The proof is bound to ``owner`` (the run's public key) with ``nonce`` (the
  round seed of this worker and round), so its :attr:`seed` is
  ``proof.bound_seed(owner, nonce)``.
  """

  round: int
  worker: int
  owner: str
  nonce: int
  steps: int
  k: int
  batch_size: int
  runner: str

  @property
  def plan(self) -> proof.Plan:
    return proof.Plan(self.owner, self.nonce, self.k, self.steps, self.batch_size, self.runner)

  @property
  def seed(self) -> int:
    """The seed the worker's keys derive from."""
    return proof.bound_seed(self.owner, self.nonce)


def round_seed(run_seed: int, round_: int, worker: int) -> int:
  """The seed of ``worker``'s data order and step keys in ``round_``: fixed by the run's seed, distinct per pair.

  >>> round_seed(0, 1, 2) == round_seed(0, 1, 2) != round_seed(0, 2, 1)
  True
  """
  digest = hashlib.sha256(f"pol-jax/distributed/v1:{run_seed}:{round_}:{worker}".encode()).digest()
  return int.from_bytes(digest[:8], "big") >> 1


def starting_at(state: PyTree) -> Callable[[Any], PyTree]:
  """An ``init`` that returns the coordinator's state (step 0), whatever the key."""
  start = state.replace(step=np.zeros_like(np.asarray(state.step)))
  return lambda key: start


@dataclasses.dataclass
class Judgement:
  """The coordinator's decision on one worker's submission."""

  worker: int
  status: str
  """``accepted``, ``rejected`` or ``dropped`` (crashed, timed out, nothing returned)."""
  check: str | None = None
  detail: str = ""
  verify_seconds: float = 0.0
  """The judgement's own time (in the child: reading, checking, replaying)."""
  train_seconds: float = 0.0
  isolation_seconds: float = 0.0
  """What running it in a child cost on top: start-up, imports, building the program, copying the upload."""
  verifier_seed: int | None = None
  """The seed of the uniform draw, drawn once the upload was copied; recorded after the judgement, for audit."""
  root: str | None = None
  """The root of the judged proof, when its manifest could be read."""

  def __post_init__(self):
    # Written to rounds.json every round: an upload's values never make it unbounded.
    self.detail = proof.clip(str(self.detail))
    if not (isinstance(self.root, str) and len(self.root) == 64 and all(c in "0123456789abcdef" for c in self.root)):
      self.root = None


def check_assignment(manifest: dict, assignment: Assignment) -> str | None:
  """Why the proof is not of ``assignment`` (owner, nonce, seed, steps, k, batch size, runner), or None."""
  owner = manifest.get("owner")
  owner = owner if isinstance(owner, dict) else {}
  wrong = [
    f"owner.{name} {owner.get(name)!r:.80}, assigned {value!r}"
    for name, value in (("public_key", assignment.owner), ("nonce", assignment.nonce))
    if owner.get(name) != value
  ]
  expected = {
    "seed": assignment.seed,
    "steps": assignment.steps,
    "k": assignment.k,
    "batch_size": assignment.batch_size,
    "runner": assignment.runner,
  }
  wrong += [
    f"{name} {manifest.get(name)!r:.80}, assigned {value!r}"
    for name, value in expected.items()
    if manifest.get(name) != value
  ]
  return "; ".join(wrong) or None


def judge(
  proof_dir: str,
  assignment: Assignment,
  start: PyTree,
  step: training.StepFn,
  dataset: data_lib.Dataset,
  *,
  strategy: str = "uniform",
  num_segments: int = 8,
  seed: int | None = None,
  max_bytes: int,
) -> tuple[Judgement, PyTree | None]:
  """Checks a worker's proof of ``assignment`` from ``start``; returns the judgement and, if accepted, the final state.

  In order: ``size`` (the directory holds at most ``max_bytes``, counted
  before anything is parsed), ``assignment`` (the manifest's owner, nonce,
  seed and shape are the ones assigned), then every check of
  :func:`pol_jax.verifier.verify` with the coordinator's ``step`` and
  ``dataset`` and ``start`` as the only initial state the init check
  accepts. A malformed proof is rejected by ``integrity`` with its one-line
  reason.

  In this process: it trusts the proof's files not to hang or exhaust it.
  The coordinator judges through a :class:`Judge`, which runs this in a
  child process on a private copy of the upload.
  """
  t0 = time.perf_counter()
  root = None

  def rejected(check, detail):
    return Judgement(
      assignment.worker, "rejected", check, detail, time.perf_counter() - t0, verifier_seed=seed, root=root
    ), None

  try:
    size = proof.size_bytes(proof_dir)
    if size > max_bytes:
      return rejected("size", f"the proof holds {size} bytes, more than the limit of {max_bytes}")
    manifest = proof.read_manifest(proof_dir)
    root = manifest.get("root") if isinstance(manifest.get("root"), str) else None
    wrong = check_assignment(manifest, assignment)
    if wrong:
      return rejected("assignment", f"the proof is not of this worker's assignment: {wrong}")
    program = training.Program(starting_at(start), step)
    drawn = challenge.from_name(strategy, n=num_segments, seed=seed)
    verdict = verifier.verify(proof_dir, program, dataset, challenge=drawn)
    seed = verdict.seed
  except proof.ProofError as e:
    return rejected("integrity", str(e))
  if not verdict.accepted:  # rejected, or undecided here: either way not aggregated
    failed = verdict.failed[0] if verdict.failed else next(c for c in verdict.checks if c.passed is None)
    return rejected(failed.name, failed.detail if verdict.failed else f"undecided: {failed.detail}")
  if verdict.root != root:  # verify sealed-checked another manifest than the one whose assignment was checked
    return rejected("integrity", f"{proof.MANIFEST}: changed while it was judged")
  try:
    final = recorder.final_state(proof_dir, program, manifest)
  except (proof.ProofError, proof.IntegrityError) as e:
    return rejected("integrity", f"the final state: {e}")
  judgement = Judgement(
    assignment.worker, "accepted", None, verdict.summary(), time.perf_counter() - t0, verifier_seed=seed, root=root
  )
  return judgement, final


def final_state_unchecked(proof_dir: str, start: PyTree) -> PyTree | None:
  """The proof's final state as a coordinator without a defence takes it (integrity of that file only)."""
  try:
    manifest = proof.read_manifest(proof_dir)
    return recorder.final_state(proof_dir, training.Program(starting_at(start), None), manifest)
  except (proof.ProofError, proof.IntegrityError, KeyError, ValueError, OSError):
    return None


class CoordinatorError(Exception):
  """The coordinator cannot judge at all: its own set-up failed in the judging child (not a worker's doing)."""


_JUDGE = "pol_jax.distributed:_judge_server"
"""What the judging child runs (:class:`pol_jax.isolation.Server`'s target)."""
_MAX_ENTRIES = 100_000
_MAX_DEPTH = 32


class _Oversized(Exception):
  pass


def private_copy(src: str, dst: str, max_bytes: int) -> int:
  """Copies the proof directory ``src`` to ``dst``, a new directory only the coordinator writes; returns its bytes.

  The judgement then reads a copy that the worker cannot change under it
  (between the check of a file and its use), and anything in the upload that
  is not a directory or a regular file (a FIFO, a device, a socket, a
  symbolic link: ``src`` itself included) is refused by name, before it is
  opened, instead of blocking the reader or leading it outside the upload.
  Files are opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked again once
  open. At most ``max_bytes`` are copied, ``100000`` entries, ``32`` levels.

  Raises:
    proof.ProofError: a refused entry, named by its path in the upload.
  """
  count = 0
  total = 0

  def refuse(rel: str, why: str):
    raise proof.ProofError(rel or "proof directory", "file", why)

  def kind(mode: int) -> str:
    names = {stat.S_ISLNK: "a symbolic link", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
    return next((name for test, name in names.items() if test(mode)), "a device or special file")

  def open_at(name: str, flags: int, rel: str, dir_fd: int | None) -> int:
    try:
      return os.open(name, flags | os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as e:
      refuse(rel, f"cannot be opened ({e.strerror})")

  def copy_dir(fd: int, d: str, rel: str, depth: int) -> None:
    # Everything is opened relative to its open parent, without following links: a name swapped after it was
    # listed cannot lead the copy elsewhere.
    nonlocal count
    if depth > _MAX_DEPTH:
      refuse(rel, f"nested deeper than {_MAX_DEPTH} directories")
    os.mkdir(d, 0o700)
    for entry in _names(fd, rel):
      count += 1
      if count > _MAX_ENTRIES:
        refuse(rel, f"more than {_MAX_ENTRIES} entries")
      name = os.path.join(rel, entry) if rel else entry
      try:
        mode = os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode
      except OSError as e:
        refuse(name, f"cannot be read ({e.strerror})")
      if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        refuse(name, f"not a regular file or directory ({kind(mode)})")
      child = open_at(entry, os.O_DIRECTORY if stat.S_ISDIR(mode) else 0, name, fd)
      try:
        opened = os.fstat(child).st_mode
        if stat.S_IFMT(opened) != stat.S_IFMT(mode):  # swapped since it was listed
          refuse(name, f"not a regular file or directory ({kind(opened)})")
        if stat.S_ISDIR(mode):
          copy_dir(child, os.path.join(d, entry), name, depth + 1)
        else:
          copy_file(child, os.path.join(d, entry))
      finally:
        os.close(child)

  def copy_file(fd: int, d: str) -> None:
    nonlocal total
    with open(d, "xb") as out:
      while chunk := os.read(fd, 1 << 20):
        total += len(chunk)
        if total > max_bytes:
          raise _Oversized(total)
        out.write(chunk)

  try:
    mode = os.lstat(src).st_mode
  except FileNotFoundError:
    raise proof.ProofError(src, "directory", "not found (expected a proof directory holding manifest.json)") from None
  if not stat.S_ISDIR(mode):
    refuse("", f"not a directory ({kind(mode) if not stat.S_ISREG(mode) else 'a file'})")
  top = open_at(src, os.O_DIRECTORY, "", None)
  try:
    copy_dir(top, dst, "", 0)
  finally:
    os.close(top)
  return total


def _names(fd: int, rel: str):
  """The names in the open directory ``fd``, one at a time (a huge directory is refused before it is all read)."""
  try:
    with os.scandir(fd) as entries:
      for entry in entries:
        yield entry.name
  except OSError as e:
    raise proof.ProofError(rel or "proof directory", "file", f"cannot be listed ({e.strerror})") from None


def _write_tree(path: str, tree: PyTree) -> dict[str, str]:
  """Writes ``tree``'s leaves as raw bytes (``.npz``, no pickle); returns their digests."""
  leaves = [np.ascontiguousarray(np.asarray(x)) for x in jax.tree.leaves(tree)]
  with open(path, "wb") as f:
    np.savez(f, *[np.frombuffer(x.tobytes(), np.uint8) for x in leaves])
  return proof.leaf_digests(tree)


def _read_tree(path: str, like: PyTree, digests: dict[str, str]) -> PyTree:
  """The tree :func:`_write_tree` wrote, with ``like``'s structure, dtypes and shapes, checked against ``digests``."""
  refs, treedef = jax.tree.flatten(like)
  with np.load(path, allow_pickle=False) as stored:
    if len(stored.files) != len(refs):
      raise ValueError(f"{path}: {len(stored.files)} leaves, expected {len(refs)}")
    raw = [stored[f"arr_{i}"] for i in range(len(refs))]
  leaves = []
  for ref, r in zip(refs, raw, strict=True):
    dtype, shape = np.dtype(ref.dtype), tuple(ref.shape)
    if r.dtype != np.uint8 or r.size != dtype.itemsize * math.prod(shape):
      raise ValueError(f"{path}: a leaf of {r.size} bytes, expected {dtype}{list(shape)}")
    leaves.append(np.frombuffer(r.tobytes(), dtype).reshape(shape))
  tree = jax.tree.unflatten(treedef, leaves)
  if proof.leaf_digests(tree) != digests:
    raise ValueError(f"{path}: the leaves are not the ones written")
  return tree


def _judge_server(common: dict) -> Callable[[dict, Callable[[], None]], dict]:
  """The judging child's set-up (:class:`pol_jax.isolation.Server`): rebuilds the coordinator's program once.

  Returns the handler that judges one upload per job: it loads the job's
  start state (the caller's, checked against its digests; kept while the
  next jobs name the same), then, after ``ready()``, copies the upload and
  judges the copy.
  """
  from pol_jax import workers

  for name, value in common["jax_config"].items():
    jax.config.update(name, value)
  if common["compilation_cache"]:
    jax.config.update("jax_compilation_cache_dir", common["compilation_cache"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import importlib.util

    if importlib.util.find_spec("filelock") is not None:  # a size limit makes JAX lock it: parallel children
      jax.config.update("jax_compilation_cache_max_size", 4 << 30)
  if jax.default_backend() != common["backend"]:  # JAX fell back to another backend: every verdict would be wrong
    raise RuntimeError(
      f"the judging child runs JAX on {jax.default_backend()}, the coordinator on {common['backend']} "
      "(on GPU, CUDA needs more address space than a memory limit leaves it: give judge_memory=0)"
    )
  program, dataset = workers.load_builder(common["builder"])(common["config"])
  like = jax.eval_shape(program.init, training.derive_keys(0).init)
  loaded: dict = {}  # the last start state: {"key": (path, digests), "tree": ...}

  def handler(job: dict, ready: Callable[[], None]) -> dict:
    key = (job["start"], job["start_digests"])
    if loaded.get("key") != key:
      loaded.clear()
      loaded.update(key=key, tree=_read_tree(job["start"], like, job["start_digests"]))
    start = loaded["tree"]
    assignment = Assignment(**job["assignment"])
    ready()  # from here on, whatever fails is the upload's doing
    t0 = time.perf_counter()
    copy, final = job["copy"], None
    try:
      private_copy(job["proof"], copy, job["max_bytes"])
    except _Oversized:
      reason = f"the proof holds more bytes than the limit of {job['max_bytes']}"
      judgement = Judgement(assignment.worker, "rejected", "size", reason)
    except proof.ProofError as e:
      judgement = Judgement(assignment.worker, "rejected", "integrity", f"worker upload: {e}")
    else:
      copied = time.perf_counter() - t0
      if job["verify"]:
        judgement, final = judge(
          copy, assignment, start, program.step, dataset, strategy=job["strategy"],
          num_segments=job["segments"], seed=job["seed"], max_bytes=job["max_bytes"],
        )  # fmt: skip
      else:
        final = final_state_unchecked(copy, start)
        status, detail = ("accepted", "not verified") if final is not None else ("dropped", "unreadable final state")
        judgement = Judgement(assignment.worker, status, None, detail)
        try:
          judgement.root = str(proof.read_json(os.path.join(copy, proof.MANIFEST), proof.MANIFEST)["root"])
        except (proof.ProofError, KeyError, TypeError):
          pass
      judgement.isolation_seconds = copied
    judgement.verify_seconds = time.perf_counter() - t0 - judgement.isolation_seconds
    out = dataclasses.asdict(judgement)
    out["final_digests"] = _write_tree(job["final"], final) if final is not None else None
    return out

  return handler


def _child_environment() -> dict[str, str]:
  """This process's environment, with the XLA flags and x64 setting its JAX started with."""
  from pol_jax import fingerprint

  env = dict(os.environ)
  env["XLA_FLAGS"] = fingerprint.started_flags()
  env["JAX_ENABLE_X64"] = "1" if jax.config.jax_enable_x64 else "0"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


class Judge:
  """Judges uploads in a child process that rebuilds the coordinator's program once; the coordinator's way to judge.

  The child (:class:`pol_jax.isolation.Server`) rebuilds the coordinator's
  program and data with ``builder`` (``"module:function"``, the
  coordinator's choice, never a proof's) from ``config`` once, then judges
  one upload per call, in turn: it loads ``start`` from a file this process
  wrote (checked against its digests), copies the upload with
  :func:`private_copy` into a directory of that call's own and judges the
  copy (:func:`judge`), the verifier seed drawn from the OS after the copy.
  Whatever an upload makes its judgement do, that worker is rejected by the
  check ``judgement`` with the reason (``"judgement timed out after 600 s"``,
  ``"judgement ran out of memory (...)"``, ``"judgement failed (exit status
  1): RecursionError: ..."``): the child ends with everything it started,
  and the next call gets a fresh child, so the other uploads are judged as
  if nothing had happened, and this process goes on. Each call has the
  whole of ``limits.seconds``; the child's start-up has a limit of its own.

  One judgement costs what it costs in the child (copying, reading,
  replaying) plus about 10 ms; the start-up (a Python process, JAX,
  building the program: about 2 s on a 2-core CPU) is paid once per child,
  by the call that starts it (in its ``isolation_seconds``). Measured on
  the smoke MLP proof, 2-core CPU: 0.11 s per judgement in a warm child,
  against 2.4 s with a child per judgement (:func:`judge_isolated`).

  Not thread-safe: one call at a time. Use it as a context manager, or call
  :meth:`close`.

  >>> with Judge(builder=build.BUILDER, config=config, limits=setup.limits) as judge:  # doctest: +SKIP
  ...   judgement, final = judge(proof_dir, assignment, start, max_bytes=64 << 20)

  Args:
    builder: rebuilds ``(program, dataset)`` from ``config`` in the child.
    config: the coordinator's config, JSON-serialisable.
    limits: the child's start-up time and each judgement's wall-clock time,
      and the child's address space (default
      :class:`pol_jax.isolation.Limits`: 600 s, 8 GiB).
    scratch: where the child's private files go (default: the system's
      temporary directory); never the shared storage.
    compilation_cache: a private directory for JAX's persistent compilation
      cache, shared by the children of one coordinator: a restarted or a
      parallel child compiles the step from it (measured: the smoke MLP's
      compile and first run 3.1 s -> 0.45 s). The cached executable is the
      one XLA compiled, so replay stays bit for bit.
  """

  def __init__(
    self,
    *,
    builder: str,
    config: dict,
    limits: isolation.Limits | None = None,
    scratch: str | None = None,
    compilation_cache: str | None = None,
  ):
    self._own = tempfile.mkdtemp(prefix="pol-jax-judge-", dir=scratch)  # mode 0700: this process's alone
    self._made_for = (builder, json.dumps(config, sort_keys=True), limits or isolation.Limits())
    common = {
      "builder": builder,
      "config": config,
      "jax_config": {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision},
      "compilation_cache": compilation_cache,
      "backend": jax.default_backend(),
    }
    self._server = isolation.Server(
      _JUDGE, common, self._made_for[2], self._own, env=_child_environment(), label="judgement"
    )
    self._start: tuple[dict[str, str], str] | None = None  # the digests and file of the last start state written
    self._calls = 0

  def __enter__(self) -> Judge:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def made_for(self, builder: str, config: dict, limits: isolation.Limits) -> bool:
    """Whether this judge rebuilds ``builder``'s program from ``config`` and judges under ``limits``."""
    return self._made_for == (builder, json.dumps(config, sort_keys=True), limits)

  @property
  def starts(self) -> int:
    """Children started so far: 1 while no judgement has failed."""
    return self._server.starts

  def __call__(
    self,
    proof_dir: str,
    assignment: Assignment,
    start: PyTree,
    *,
    verify: bool = True,
    strategy: str = "uniform",
    num_segments: int = 8,
    seed: int | None = None,
    max_bytes: int,
  ) -> tuple[Judgement, PyTree | None]:
    """Judges the upload ``proof_dir`` of ``assignment`` from ``start``; arguments and result as :func:`judge_isolated`."""
    self._calls += 1
    digests = proof.leaf_digests(start)
    if self._start is None or self._start[0] != digests:
      path = os.path.join(self._own, f"start{self._calls}.npz")
      _write_tree(path, start)
      if self._start is not None:
        os.remove(self._start[1])
      self._start = (digests, path)
    own = tempfile.mkdtemp(prefix="upload-", dir=self._own)
    try:
      job = {
        "proof": os.path.abspath(proof_dir),
        "copy": os.path.join(own, "proof"),
        "final": os.path.join(own, "final.npz"),
        "start": self._start[1],
        "start_digests": digests,
        "assignment": dataclasses.asdict(assignment),
        "verify": verify,
        "strategy": strategy,
        "segments": num_segments,
        "seed": seed,
        "max_bytes": max_bytes,
      }
      t0 = time.perf_counter()
      try:
        out = self._server(job)
      except isolation.SetupFailed as e:
        raise CoordinatorError(f"the coordinator cannot judge: {e}") from None
      except isolation.Failed as e:
        status = "rejected" if verify else "dropped"
        return Judgement(
          assignment.worker, status, "judgement", str(e), time.perf_counter() - t0, verifier_seed=seed
        ), None
      wall = time.perf_counter() - t0
      final_digests = out.pop("final_digests")
      judgement = Judgement(**out)
      judgement.isolation_seconds = wall - judgement.verify_seconds
      final = _read_tree(job["final"], start, final_digests) if final_digests is not None else None
      return judgement, final
    finally:
      shutil.rmtree(own, ignore_errors=True)

  def close(self) -> None:
    """Ends the child and removes its files."""
    self._server.close()
    shutil.rmtree(self._own, ignore_errors=True)


def judge_isolated(
  proof_dir: str,
  assignment: Assignment,
  start: PyTree,
  *,
  builder: str,
  config: dict,
  verify: bool = True,
  strategy: str = "uniform",
  num_segments: int = 8,
  seed: int | None = None,
  max_bytes: int,
  limits: isolation.Limits | None = None,
  scratch: str | None = None,
  compilation_cache: str | None = None,
) -> tuple[Judgement, PyTree | None]:
  """:func:`judge` in a child process of its own, on a private copy of the upload: one :class:`Judge` call.

  Whatever the upload makes the judgement do, the worker is rejected by the
  check ``judgement`` with the reason (``"judgement timed out after 600
  s"``, ``"judgement ran out of memory (...)"``, ``"judgement failed (exit
  status 1): RecursionError: ..."``), and this process goes on. To judge
  many uploads, keep a :class:`Judge`: it starts a child once, not per upload.

  Args:
    proof_dir: the worker's proof, on the shared storage.
    assignment: the worker's assignment.
    start: the coordinator's state the worker started from.
    builder: rebuilds ``(program, dataset)`` from ``config`` in the child.
    config: the coordinator's config, JSON-serialisable.
    verify: judge (:func:`judge`), or only take the final state
      (``verify=False``, for the coordinators without a defence).
    strategy: which segments to replay.
    num_segments: n, for ``uniform``.
    seed: the verifier seed (default, and the coordinator's way: drawn from
      the OS in the child, after it has copied the upload, so that it
      exists nowhere while the upload can still change). Give one only to
      repeat a recorded judgement.
    max_bytes: the most the upload may hold.
    limits, scratch, compilation_cache: as :class:`Judge`.

  Returns:
    The judgement (with the proof's root and, for ``uniform``, the verifier
    seed) and, if accepted, the proof's final state, checked against the
    digests the child computed.

  Raises:
    CoordinatorError: the child failed before it touched the upload (the
      builder, the config or the limits do not let it start).
  """
  with Judge(builder=builder, config=config, limits=limits, scratch=scratch, compilation_cache=compilation_cache) as j:
    return j(
      proof_dir, assignment, start, verify=verify, strategy=strategy, num_segments=num_segments, seed=seed,
      max_bytes=max_bytes,
    )  # fmt: skip


def aggregate(start: PyTree, finals: Sequence[PyTree], how: str = "mean") -> PyTree:
  """The new coordinator state from the workers' final states, in the order given (worker order).

  Floating leaves: the mean (summed in order, in float64, then cast) or the
  coordinate-wise median. Other leaves (step counters) from the first. With
  no final state, ``start`` is kept. The step is ``start``'s: rounds are
  counted by the coordinator.
  """
  if how not in AGGREGATORS:
    raise ValueError(f"Expected aggregator in {AGGREGATORS}, got {how!r}.")
  if not finals:
    return start

  def leaf(*xs):
    xs = [np.asarray(x) for x in xs]
    if not np.issubdtype(xs[0].dtype, np.floating):
      return xs[0]
    stacked = np.stack([x.astype(np.float64) for x in xs])
    out = stacked.mean(axis=0) if how == "mean" else np.median(stacked, axis=0)
    return out.astype(xs[0].dtype)

  merged = jax.tree.map(leaf, *[f.replace(step=start.step) for f in finals])
  return merged.replace(step=start.step)


class Worker:
  """Trains an assignment from the coordinator's state and writes its proof: an honest worker.

  Built once per worker process: ``build()`` -> ``(program, dataset)``, so the
  compiled step is reused every round. An engine calls :meth:`run` with the
  behaviour it gives the worker; this class plays ``"honest"`` only. A
  subclass given to an engine (``worker=``) plays others: it extends
  :data:`BEHAVIOURS`, overrides :meth:`play` and, if it keeps anything
  between rounds, :meth:`reset` (``experiments.byzantine.Worker``).
  """

  BEHAVIOURS: tuple[str, ...] = ("honest",)

  def __init__(
    self, worker: int, build: Callable[[], tuple[training.Program, data_lib.Dataset]], config: dict, workers: int = 1
  ):
    self.worker, self.config, self.workers = worker, config, workers
    self.program, self.dataset = build()

  def reset(self) -> None:
    """Forgets what the worker kept between rounds, before a new run (an honest one keeps nothing)."""

  def run(
    self, state: PyTree, assignment: Assignment, proof_dir: str, behaviour: str = "honest", **options
  ) -> dict | None:
    """Trains ``assignment`` from ``state``; returns ``{"proof": dir, "seconds": s}``, or None for no submission.

    ``options``: keyword arguments of :meth:`play` (a subclass's settings).
    """
    if behaviour not in self.BEHAVIOURS:
      raise ValueError(f"Expected behaviour in {self.BEHAVIOURS}, got {behaviour!r}.")
    t0 = time.perf_counter()
    shutil.rmtree(proof_dir, ignore_errors=True)
    submitted = self.play(behaviour, state, assignment, proof_dir, **options)
    return {"proof": proof_dir, "seconds": time.perf_counter() - t0} if submitted else None

  def play(self, behaviour: str, state: PyTree, assignment: Assignment, proof_dir: str) -> bool:
    """Writes what ``behaviour`` submits to ``proof_dir``; False: it submits nothing. Here: trains honestly."""
    self.train(state, assignment, proof_dir)
    return True

  def recorded_config(self, assignment: Assignment, **changes) -> dict:
    """The recorded config: the coordinator's, bound to the assignment's owner with its nonce as ``seed``."""
    return {
      **self.config,
      "owner": assignment.owner,
      "seed": assignment.nonce,
      "steps": assignment.steps,
      "k": assignment.k,
      **changes,
    }

  def train(self, state: PyTree, assignment: Assignment, proof_dir: str) -> None:
    """Trains ``assignment`` from ``state`` with the same segment runner as everywhere else, recording its proof."""
    program = training.Program(starting_at(state), self.program.step)
    recorder.record(proof_dir, program, self.dataset, assignment.plan, config=self.recorded_config(assignment))


def worker_dir(root: str, round_: int, worker: int) -> str:
  """Where ``worker``'s proof of ``round_`` goes, under a storage root every node can read."""
  return os.path.join(root, f"round_{round_:05d}", f"worker_{worker}")


DEFENCES = ("none", "pol", "median")
"""none: average every returned update; pol: verify each proof, average the accepted; median: coordinate-wise median."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a coordinator runs: the same setup with the same workers gives the same states, round by round."""

  seed: int
  """The run's seed: the coordinator's initial state and every round seed derive from it."""
  owner: str
  """The run's Ed25519 public key (64 hex digits), e.g. the coordinator's: every worker proof is bound to it."""
  workers: int
  rounds: int
  steps: int
  """Local steps per worker and round."""
  k: int
  batch_size: int
  runner: str
  defence: str = "pol"
  strategy: str = "uniform"
  segments: int = 8
  max_bytes: int = 64 << 20
  exclude: bool = False
  """Exclude a worker from later rounds after a rejection."""
  judge_seconds: float = 600.0
  """Wall-clock limit of one judgement, and of a judging child's start-up (about 3 s on a 2-core CPU),
  which is paid once per child, not per judgement. A child's first judgement compiles the step, and
  every judgement replays ``segments * k`` steps: raise it for long segments."""
  judge_memory: int = 8 << 30
  """Address-space limit of a judging child, in bytes (0: none). JAX's CPU runtime maps about
  1 GiB; the rest holds the dataset, the start state and two states per replayed segment, with room
  for CIFAR-size data and ResNets. On GPU give 0: CUDA reserves address space beyond any such limit."""

  def __post_init__(self):
    if self.defence not in DEFENCES:
      raise ValueError(f"Expected defence in {DEFENCES}, got {self.defence!r}.")
    if self.workers < 1 or self.rounds < 1:
      raise ValueError(f"Expected at least one worker and one round, got {self.workers} and {self.rounds}.")
    proof.Plan(self.owner, self.seed, self.k, self.steps, self.batch_size, self.runner)  # validates the rest
    isolation.Limits(self.judge_seconds, self.judge_memory)  # validates the judgement limits

  @property
  def limits(self) -> isolation.Limits:
    return isolation.Limits(self.judge_seconds, self.judge_memory)

  def assignment(self, round_: int, worker: int) -> Assignment:
    nonce = round_seed(self.seed, round_, worker)
    return Assignment(round_, worker, self.owner, nonce, self.steps, self.k, self.batch_size, self.runner)


Dispatch = Callable[[int, PyTree, dict[int, Assignment], dict[int, str]], dict[int, Any]]
"""``dispatch(round, state, assignments, proof_dirs) -> {worker: {"proof", "seconds"} | None | "why it was dropped"}``."""

COORDINATOR = "coordinator"
ROUNDS = "rounds.json"
SETUP = "setup.json"


def _seconds(value: Any) -> float:
  """A worker's own report of its training time, if it is a plausible number of seconds (else 0)."""
  if isinstance(value, bool) or not isinstance(value, int | float):
    return 0.0
  value = float(value) if not isinstance(value, int) or abs(value) < 2**53 else 0.0
  return value if math.isfinite(value) and 0 <= value < 1e9 else 0.0


def coordinate(
  workdir: str,
  setup: Setup,
  program: training.Program,
  dispatch: Dispatch,
  *,
  builder: str,
  config: dict,
  evaluate: Callable[[PyTree], float] | None = None,
  on_round: Callable[[dict], None] | None = None,
  scratch: str | None = None,
  parallel: int = 1,
  judges: Sequence[Judge] | None = None,
  key=None,
) -> dict:
  """Runs the rounds of ``setup``, or resumes them after the last completed one.

  Worker proofs go to ``workdir/rounds/round_R/worker_W`` (a storage path
  every node must be able to read); the coordinator's own record goes to
  ``workdir/coordinator``: ``setup.json`` (the setup, nothing secret), the
  state after every round (Orbax, with leaf digests), and ``rounds.json``,
  rewritten atomically after each round's state is on disk, with every
  judgement (and its verifier seed, written only now that it is used), the
  roots of the proofs it aggregated and the state's digest. A killed
  coordinator restarted with the same arguments resumes after the last round
  in ``rounds.json`` and ends on the same state as an uninterrupted run
  (when every judgement's verdict does not depend on its draw: an honest
  proof's never does).

  Each submission is judged by a :class:`Judge` (``verify=False`` without
  the ``pol`` defence): in a child process under ``setup``'s limits, which
  rebuilds ``program`` with ``builder`` from ``config`` once and then, per
  submission, copies the upload and only then draws the verifier seed from
  the OS. A judgement that fails (hangs, crashes, runs out of memory) ends
  its child and rejects that worker only; the next submission gets a fresh
  child. The coordinator keeps no verifier secret, reads nothing a worker
  wrote but through that child, and uses its own path for each worker's
  proof (not the one a worker returns).

  Args:
    workdir: the run's directory, on storage every worker node reads.
    setup: what to run.
    program: the coordinator's program (its initial state).
    dispatch: runs a round's assignments on the workers.
    builder: ``"module:function"`` that rebuilds ``(program, dataset)`` from
      ``config`` in the judging child (``pol_jax.build.BUILDER``).
    config: the coordinator's config, JSON-serialisable.
    evaluate: the accuracy of a state, recorded per round.
    on_round: called with each round's record.
    scratch: where to make a private directory for the judging children's
      files and their compilation cache (default: the system's temporary
      directory), removed at the end; never the shared ``workdir``.
    parallel: judging children at once (each under ``setup``'s limits, each
      kept for the whole run). The judgements and the states are the same
      for any value.
    judges: judge with these (one judgement at a time each, instead of
      ``parallel`` made for this run and ended with it): for a caller that
      runs several coordinators of one program and keeps its judging
      children warm between them. They must have been made with this
      run's ``builder``, ``config`` and ``setup.limits``.
    key: the run's Ed25519 private key (``ownership.load_key``), kept off
      ``workdir``. Each round's record is then signed with it, chained to
      the setup and the record before it (:func:`sign_record`), and a resume
      first checks every signature: the record sits on storage the workers
      write, and a resume trusts the state whose digest it names. Without
      it, records are unsigned and a resume trusts them; a resume without
      it of a run whose records are signed is refused.

  Returns:
    ``{"state": final state, "rounds": [round records]}``.

  Raises:
    CoordinatorError: the judging child cannot start (builder, config, limits).
    ValueError: ``judges`` made for another builder, config or limits.
    proof.ProofError: a record to resume that is not the run's (another
      setup, a signature that does not verify, signed records and no key).
  """
  if judges is not None and (not judges or any(not j.made_for(builder, config, setup.limits) for j in judges)):
    raise ValueError("Expected judges made with this run's builder, config and setup.limits.")
  own = os.path.join(workdir, COORDINATOR)
  done, state = _open_run(own, workdir, setup, program, key)
  excluded = {w for r in done for w in r.get("excluded", [])}
  private = tempfile.mkdtemp(prefix="pol-jax-coordinator-", dir=scratch)  # mode 0700: this process's alone
  writer = store.Writer(own)
  pool = _Judges(judges, builder=builder, config=config, limits=setup.limits, scratch=private)
  try:
    for r in range(len(done), setup.rounds):
      assignments = {w: setup.assignment(r, w) for w in range(setup.workers) if w not in excluded}
      dirs = {w: worker_dir(os.path.join(workdir, "rounds"), r, w) for w in assignments}
      start = starting_at(state)(None)
      results = dispatch(r, start, assignments, dirs)
      judgements, finals, roots = _judge_round(setup, pool, start, assignments, dirs, results, parallel)
      how = "median" if setup.defence == "median" else "mean"
      state = aggregate(start, finals, how).replace(step=np.asarray((r + 1) * setup.steps, np.int32))
      digest = writer.save(state, {"round": r})
      newly = [j.worker for j in judgements if j.status == "rejected"] if setup.exclude else []
      excluded.update(newly)
      record = {
        "round": r,
        "judgements": [dataclasses.asdict(j) for j in judgements],
        "aggregated": sorted(roots),
        "roots": {str(w): root for w, root in roots.items()},
        "excluded": newly,
        "state_digest": digest,
        "accuracy": evaluate(state) if evaluate else None,
      }
      if key is not None:
        record["signature"] = sign_record(key, setup, done[-1] if done else None, record)
      writer.wait()  # the state is on disk before the round counts as done
      done.append(record)
      proof.write_json_atomic(os.path.join(own, ROUNDS), done)
      if on_round:
        on_round(record)
  finally:
    pool.close()
    writer.close()
    shutil.rmtree(private, ignore_errors=True)
  return {"state": state, "rounds": done}


def _signed_message(setup: Setup, previous: dict | None, record: dict) -> bytes:
  """What a round's signature covers: the setup, the previous record (signature included) and this one."""
  unsigned = {k: v for k, v in record.items() if k != "signature"}
  return proof.canonical_json(
    {
      "setup": dataclasses.asdict(setup),
      "previous": None if previous is None else proof.digest_json(previous),
      "record": unsigned,
    }
  )


def sign_record(key, setup: Setup, previous: dict | None, record: dict) -> str:
  """The hex Ed25519 signature of a round's record by the run's key, chained to the record before it."""
  return key.sign(_signed_message(setup, previous, record)).hex()


def check_records(done: Any, setup: Setup, public_key) -> str | None:
  """Why the records ``done`` are not the run's, signed round after round by ``public_key`` (None: they are).

  A prefix of the run's records passes (a record rolled back to an earlier
  round replays rounds the run already judged, from a state it made).
  """
  from cryptography.exceptions import InvalidSignature

  if not isinstance(done, list):
    return "not a list of round records"
  previous = None
  for i, record in enumerate(done):
    signature = record.get("signature") if isinstance(record, dict) else None
    if not isinstance(signature, str) or len(signature) != 128:
      return f"round {i}: no signature"
    if not isinstance(record.get("round"), int) or record["round"] != i:
      return f"round {i}: numbered {record.get('round')!r:.20}"
    try:
      public_key.verify(bytes.fromhex(signature), _signed_message(setup, previous, record))
    except (InvalidSignature, ValueError):
      return f"round {i}: the signature is not the run key's over this record and the ones before it"
    previous = record
  return None


def _open_run(own: str, workdir: str, setup: Setup, program: training.Program, key=None) -> tuple[list[dict], PyTree]:
  """The rounds a run in ``workdir`` completed and the state after the last (or the initial state).

  Records ``setup`` in a new run; refuses a ``workdir`` that holds a run of another setup, or
  records that ``key`` did not sign (and signed records when there is no ``key``).
  """
  os.makedirs(own, exist_ok=True)
  setup_path = os.path.join(own, SETUP)
  if os.path.exists(setup_path):
    saved = proof.read_json(setup_path, SETUP)
    if saved.get("setup") != dataclasses.asdict(setup):
      raise proof.ProofError(SETUP, "setup", f"{workdir} holds a run of another setup; use a new workdir")
  else:
    proof.write_json_atomic(setup_path, {"setup": dataclasses.asdict(setup)})
  rounds_path = os.path.join(own, ROUNDS)
  done = proof.read_json(rounds_path, ROUNDS) if os.path.exists(rounds_path) else []
  if key is not None:
    wrong = check_records(done, setup, key.public_key())
    if wrong:
      raise proof.ProofError(
        ROUNDS, "signature", f"{wrong}: the record in {own} was changed where the workers write; start a new run"
      )
  elif any(isinstance(r, dict) and "signature" in r for r in (done if isinstance(done, list) else [])):
    raise proof.ProofError(ROUNDS, "signature", "the rounds are signed: resume with the run's key (--key=FILE)")
  state = starting_at(training.to_host(program.init(training.derive_keys(setup.seed).init)))(None)
  if done:
    state, _ = store.restore(own, len(done) * setup.steps, state, done[-1]["state_digest"])
  return done, state


class _Judges:
  """The judging children of a run: the caller's (one per judging thread), else made on demand and kept.

  Calling it judges one submission with a child not judging now; :meth:`close`
  ends the children it made (never the caller's).
  """

  def __init__(self, given: Sequence[Judge] | None, *, builder: str, config: dict, limits, scratch: str):
    self.given = given
    self._make = functools.partial(
      Judge, builder=builder, config=config, limits=limits, scratch=scratch,
      compilation_cache=os.path.join(scratch, "xla-cache"),
    )  # fmt: skip
    self._idle: queue.SimpleQueue[Judge] = queue.SimpleQueue()  # the children not judging now
    for j in given or ():
      self._idle.put(j)
    self._made: list[Judge] = []

  def threads(self, parallel: int) -> int:
    """Judging threads for a round: one per given child, else ``parallel``."""
    return len(self.given) if self.given else max(1, parallel)

  def __call__(self, *args, **kwargs):
    try:
      j = self._idle.get(block=self.given is not None)  # the caller's: there is one for every thread
    except queue.Empty:
      j = self._make()
      self._made.append(j)
    try:
      return j(*args, **kwargs)
    finally:
      self._idle.put(j)

  def close(self) -> None:
    for j in self._made:
      j.close()


def _judge_round(
  setup: Setup, pool: _Judges, start: PyTree, assignments: dict, dirs: dict, results: dict, parallel: int
) -> tuple[list[Judgement], list[PyTree], dict[int, str]]:
  """Judges a round's submissions, in parallel: ``(judgements by worker, accepted final states, their roots)``.

  A worker that returned no result dict is dropped (with what it returned, if a string).
  """
  pending = {}
  with concurrent.futures.ThreadPoolExecutor(pool.threads(parallel)) as threads:
    for w in sorted(assignments):
      if isinstance(results.get(w), dict):
        pending[w] = threads.submit(
          pool, dirs[w], assignments[w], start, verify=setup.defence == "pol", strategy=setup.strategy,
          num_segments=setup.segments, max_bytes=setup.max_bytes,
        )  # fmt: skip
  judgements, finals, roots = [], [], {}
  for w in sorted(assignments):
    result = results.get(w)
    if w not in pending:
      why = result if isinstance(result, str) and result else "no submission"
      judgements.append(Judgement(w, "dropped", None, why[:300]))
      continue
    judgement, final = pending[w].result()
    judgement.train_seconds = _seconds(result.get("seconds"))
    judgements.append(judgement)
    if final is not None:
      finals.append(final)
      roots[w] = judgement.root
  return judgements, finals, roots


class LocalEngine:
  """Runs :class:`Worker` s one after another in this process: for debugging and small runs, no cluster.

  ``behaviours[w]`` is what worker ``w`` plays (settable between runs), ``worker`` the class that plays it,
  ``options`` the keyword arguments every :meth:`Worker.run` gets (settable too).
  """

  def __init__(
    self,
    behaviours: Sequence[str],
    build: Callable[[], tuple[training.Program, data_lib.Dataset]],
    config: dict,
    *,
    worker: type[Worker] = Worker,
    options: dict | None = None,
  ):
    self.behaviours, self.options = list(behaviours), dict(options or {})
    shared = build()  # one program and dataset for every worker: they are identical
    self.workers = [worker(w, lambda: shared, config, len(self.behaviours)) for w in range(len(self.behaviours))]

  def reset(self) -> None:
    for w in self.workers:
      w.reset()

  def __call__(self, round_, state, assignments, dirs):
    return {
      w: self.workers[w].run(state, assignments[w], dirs[w], self.behaviours[w], **self.options) for w in assignments
    }

  def shutdown(self) -> None:
    pass


def _ray_worker_class(worker: type[Worker]):
  import ray

  return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(worker)


class RayEngine:
  """Dispatches rounds to :class:`Worker` s running as Ray actors.

  ``address=None`` starts a local Ray cluster (``ray.init()``); ``"HOST:PORT"``
  joins an existing one, whose nodes must have pol-jax installed and reach
  the proof storage path. The state travels through the object store, the
  proofs through the storage path. A worker that crashes or does not answer
  within ``timeout`` seconds is dropped for the round and restarted for the
  next. ``behaviours[w]`` is what worker ``w`` plays (settable between runs),
  ``worker`` the class that plays it (a :class:`Worker`, importable on every
  node), ``options`` the keyword arguments every :meth:`Worker.run` gets
  (settable too).
  """

  def __init__(
    self,
    behaviours: Sequence[str],
    build: Callable[[], tuple[training.Program, data_lib.Dataset]],
    config: dict,
    *,
    worker: type[Worker] = Worker,
    options: dict | None = None,
    address: str | None = None,
    timeout: float = 300.0,
  ):
    try:
      import ray
    except ImportError:
      raise ImportError(
        "Ray workers need Ray: pip install 'pol-jax[distributed]' (or run them in-process with LocalEngine)"
      ) from None

    if not ray.is_initialized():
      ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    self.behaviours, self.build, self.config = list(behaviours), build, config
    self.timeout, self.options = timeout, dict(options or {})
    self._cls = _ray_worker_class(worker)
    self.actors = [self._start(w) for w in range(len(self.behaviours))]

  def _start(self, w: int):
    return self._cls.remote(w, self.build, self.config, len(self.behaviours))

  def reset(self) -> None:
    """Forgets what the workers kept between rounds (e.g. a stale worker's withheld proof), before a new run."""
    import ray

    ray.get([a.reset.remote() for a in self.actors])

  def __call__(self, round_, state, assignments, dirs):
    import ray

    state_ref = ray.put(state)
    refs = {
      w: self.actors[w].run.remote(state_ref, assignments[w], dirs[w], self.behaviours[w], **self.options)
      for w in assignments
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout)
    ready = set(ready)
    results = {}
    for w, ref in refs.items():
      if ref not in ready:
        results[w] = f"timed out after {self.timeout:g} s"
        ray.kill(self.actors[w], no_restart=True)
        self.actors[w] = self._start(w)
        continue
      try:
        results[w] = ray.get(ref)
      except ray.exceptions.RayError as e:
        results[w] = f"crashed ({type(e).__name__})"
        self.actors[w] = self._start(w)
    return results

  def shutdown(self) -> None:
    import ray

    for a in self.actors:
      ray.kill(a, no_restart=True)


def audit(workdir: str, setup: Setup, program: training.Program) -> list[str]:
  """Re-checks a coordinator's record: each round's state is the aggregate of the proofs it names.

  For every recorded round: each aggregated worker proof is still there with
  the recorded root, and aggregating their final states (restored and
  checked against their digests) from the previous recorded state gives,
  bit for bit, the recorded state of the round. It does not re-verify the
  worker proofs: :func:`judge` does, given the same start, and each recorded
  judgement carries its ``verifier_seed`` (written after it was used), so
  ``judge(..., seed=verifier_seed)`` repeats its draw exactly. It needs no
  secret of the coordinator's. It reads the worker proofs in this process:
  run it on uploads already judged, or in a child process. Returns the
  problems found, none for a faithful record.
  """
  own = os.path.join(workdir, COORDINATOR)
  rounds = proof.read_json(os.path.join(own, ROUNDS), ROUNDS)
  state = starting_at(training.to_host(program.init(training.derive_keys(setup.seed).init)))(None)
  how = "median" if setup.defence == "median" else "mean"
  problems = []
  for record in rounds:
    r = record["round"]
    start = starting_at(state)(None)
    replayed = training.Program(starting_at(start), program.step)
    finals = []
    for w in record["aggregated"]:
      d = worker_dir(os.path.join(workdir, "rounds"), r, w)
      try:
        manifest = proof.validate_manifest(proof.read_manifest(d))  # its root is its body's digest
        proof.check_files(d, manifest)
        if manifest.get("root") != record["roots"].get(str(w)):
          problems.append(f"round {r}: worker {w}'s proof root is not the recorded one")
          continue
        finals.append(recorder.final_state(d, replayed, manifest))
      except (proof.ProofError, proof.IntegrityError) as e:
        problems.append(f"round {r}: worker {w}'s proof is unusable: {e}")
    complete = len(finals) == len(record["aggregated"])  # else the proofs are to blame, not the aggregate
    expected = (aggregate(start, finals, how) if complete else start).replace(
      step=np.asarray((r + 1) * setup.steps, np.int32)
    )
    try:
      state, _ = store.restore(own, (r + 1) * setup.steps, expected, record["state_digest"])
    except proof.IntegrityError as e:
      problems.append(f"round {r}: the recorded state is unusable: {e}")
      break
    if complete and proof.leaf_digests(state) != proof.leaf_digests(expected):
      problems.append(f"round {r}: the recorded state is not the aggregate of the proofs the round names")
  return problems
