"""Forging moves: how someone who knows pol-jax's proof format writes a proof of their choosing.

The spoofing attacks (:mod:`experiments.attack`) and the Byzantine workers
of a distributed run (:mod:`experiments.byzantine`) are made of these. They
write proofs in pol-jax's own layout, sealed with a self-computed root, as a
forger who knows the format would: the point is that integrity alone proves
nothing, and replay must decide.

* :func:`write_proof` writes any sequence of states as a sealed proof.
* :func:`seed_order` is the index log a plan's seed derives (the batches an
  honest prover takes).
* :func:`checkpoints` trains segment by segment with the real segment
  runner, letting the forger claim any state it likes at the end of any
  segment instead (lazy, poisoned, spliced or interpolated segments).
* :func:`interpolated` moves checkpoints in equal steps from a start to a
  target: the infinitesimal-update attack's fake training.
* :func:`interpolate` moves a pytree of floats part of the way to another;
  :func:`perturb` pushes it along a random direction.
* :func:`rank_match` builds the infinitesimal-update attack's fake
  initialisation: a genuine initialisation sample rearranged into the rank
  order of the stolen weights, so a KS test sees a genuine sample.
* :func:`reseal` edits a proof's manifest and recomputes its root.
* :func:`replace_checkpoint` swaps one recorded state for another and reseals.
* :func:`splice_stolen` trains honestly but for one checkpoint, which holds a
  stolen model, and on from it: a one-segment fake.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from pol_jax import data as data_lib
from pol_jax import proof, recorder, sampling, store, training

PyTree = Any


def write_proof(
  proof_dir: str,
  program: training.Program,
  dataset: data_lib.Dataset,
  plan: proof.Plan,
  states: Iterable[PyTree],
  log: np.ndarray,
  config: dict,
) -> dict:
  """Writes ``states`` (step 0, every k steps, the end) as a sealed proof.

  The manifest carries the environment and program digests of ``program``
  (the declared one), the real data digests, and ``log`` as the index log.
  Returns the manifest.
  """
  os.makedirs(proof_dir, exist_ok=True)
  body, _ = recorder.start_body(program, dataset, plan, config)
  digests = dataset.digests()
  body["dataset"]["merkle_root"] = data_lib.merkle_root(digests)
  writer = store.Writer(proof_dir)
  checkpoints = {}
  try:
    for state in states:
      host = training.to_host(state)
      checkpoints[str(int(host.step))] = writer.save(host, {})
  finally:
    writer.close()
  expected = [str(s) for s in proof.checkpoint_steps(plan.k, plan.steps)]
  if sorted(checkpoints, key=int) != expected:
    raise ValueError(f"Expected states at steps {expected}, got {sorted(checkpoints, key=int)}.")
  return recorder.finish(proof_dir, body, checkpoints, np.asarray(log, np.int32), digests)


def seed_order(plan: proof.Plan, size: int, seed: int | None = None) -> np.ndarray:
  """The index log ``plan``'s seed derives for a dataset of ``size`` examples: the batches an honest prover takes.

  ``seed``: another seed's order, of the plan's shape (a prover that picks its own examples).
  """
  order = training.derive_keys(plan.seed if seed is None else seed).order
  return sampling.index_log(order, size, plan.batch_size, plan.steps)


Claim = Callable[[int, PyTree, int, Callable[[], PyTree]], PyTree]
"""``claim(i, state, end, train)``: the state segment ``i`` is claimed to end on (at step ``end``), from the
``state`` claimed before it; ``train()`` runs the segment honestly from ``state``."""


def checkpoints(
  program: training.Program,
  dataset: data_lib.Dataset,
  plan: proof.Plan,
  log: np.ndarray,
  claim: Claim | None = None,
  start: PyTree | None = None,
) -> list[PyTree]:
  """The states a forger claims at every checkpoint of ``plan``, on host.

  From ``start`` (default: the initial state ``program`` derives from the
  plan's seed), segment after segment: ``claim(i, state, end, train)`` says
  what segment ``i`` ends on, where ``train()`` runs it with the real segment
  runner on ``log``'s batches from the state claimed before it. Without
  ``claim`` every segment is trained: an honest run, as the recorder's.
  """
  keys = training.derive_keys(plan.seed)
  segment = training.make_segment(program.step, plan.runner)
  states = [training.to_host(program.init(keys.init)) if start is None else start]
  for i, (s, e) in enumerate(proof.segments(plan)):

    def train(state=states[-1], s=s, e=e):
      return training.to_host(segment.run(state, dataset.batch(log[s:e]), keys.step)[0])

    states.append(train() if claim is None else claim(i, states[-1], e, train))
  return states


def interpolated(start: PyTree, bounds: Sequence[tuple[int, int]], **targets: PyTree) -> list[PyTree]:
  """``start``, then the state claimed at the end of each segment of ``bounds``: ``start`` with each field named in
  ``targets`` moved ``(i + 1) / len(bounds)`` of the way to its target, at segment ``i``; the last is the target.

  Nothing is trained: this is Fang et al.'s infinitesimal update, whose every
  segment is a small, equal step towards a model the forger did not train.
  """
  n = len(bounds)
  return [start] + [
    start.replace(step=np.int32(e), **{f: interpolate(getattr(start, f), t, (i + 1) / n) for f, t in targets.items()})
    for i, (_, e) in enumerate(bounds)
  ]


def perturb(tree: PyTree, rng: np.random.Generator, scale: float) -> PyTree:
  """``tree`` with Gaussian noise of standard deviation ``scale`` added to every floating leaf (in its dtype)."""
  return jax.tree.map(
    lambda x: (x + rng.normal(0.0, scale, np.shape(x))).astype(np.asarray(x).dtype)
    if np.issubdtype(np.asarray(x).dtype, np.floating) else x,
    tree,
  )  # fmt: skip


def rank_match(genuine: PyTree, target: PyTree) -> PyTree:
  """``genuine``'s values per leaf, placed in the rank order of ``target``'s.

  Each leaf of the result holds exactly the multiset of values of a genuine
  initialisation (so a KS test against the initialiser cannot tell), while
  its smallest value sits where ``target`` has its smallest, and so on: the
  result is as close to ``target`` as such a sample can be.

  >>> rank_match(np.array([1.0, 2.0, 3.0]), np.array([0.5, -1.0, 9.0]))
  array([2., 1., 3.])
  """

  def one(g, t):
    g, t = np.asarray(g), np.asarray(t)
    out = np.empty(g.size, g.dtype)
    out[np.argsort(t, axis=None, kind="stable")] = np.sort(g, axis=None)
    return out.reshape(g.shape)

  return jax.tree.map(one, genuine, target)


def interpolate(a: PyTree, b: PyTree, fraction: float) -> PyTree:
  """``a + fraction (b - a)`` for floating leaves; other leaves from ``b`` at 1, else ``a``."""

  def one(x, y):
    x, y = np.asarray(x), np.asarray(y)
    if fraction >= 1.0:
      return y
    if not np.issubdtype(x.dtype, np.floating):
      return x
    return (x.astype(np.float64) + fraction * (y.astype(np.float64) - x.astype(np.float64))).astype(x.dtype)

  return jax.tree.map(one, a, b)


def replace_checkpoint(proof_dir: str, state: PyTree, fingerprints: np.ndarray | None = None) -> dict:
  """Replaces the recorded state at ``state.step`` by ``state`` (host arrays) and reseals.

  The batch that holds it is rewritten with the other states as they were
  (their metas, hence their digests, unchanged). ``fingerprints``: the
  per-step state fingerprints to record for the segment that ends there
  (none by default, as a forger that omits them).
  """
  step = int(np.asarray(state.step))
  batch = store.batch_of(step, store.batches(proof_dir))
  metas = store.read_batch_meta(proof_dir, batch)["states"]
  recorded = store.restore_batch(proof_dir, batch, state, dict.fromkeys(map(int, metas)))
  scratch = os.path.abspath(proof_dir) + ".replace"
  writer = store.Writer(scratch, flush_seconds=float("inf"), flush_states=len(recorded) + 1)
  try:
    for s, (old, meta) in sorted(recorded.items()):
      if s == step:
        digest = writer.save(state, {}, fingerprints)
      else:
        writer.save(old, meta["metrics"], meta.get("fingerprints"))
  finally:
    writer.close()
  target = os.path.join(proof_dir, proof.CHECKPOINTS, str(batch))
  shutil.rmtree(target)
  shutil.copytree(os.path.join(scratch, proof.CHECKPOINTS, str(batch)), target)
  shutil.rmtree(scratch)
  return proof.reseal(proof_dir, lambda body: body["checkpoints"].update({str(step): digest}))


def splice_stolen(
  proof_dir: str,
  program: training.Program,
  dataset: data_lib.Dataset,
  plan: proof.Plan,
  stolen: PyTree,
  at: int,
  config: dict,
) -> dict:
  """Trains honestly, swapping the state at checkpoint ``at`` for a stolen model; writes the sealed proof.

  From the seed's initialisation the real segment runner trains ``at``
  segments; the state it reaches takes ``stolen``'s parameters and model
  state (the forger's own optimizer state and step stay), and training goes
  on honestly from there to the end. Only segment ``at - 1``, which ends on
  the swapped state, fails to replay, and its update is a jump to another
  model: the largest of its epoch. With a learning rate too small to move a
  float32 weight (1e-30), the tail keeps the stolen parameters bit for bit.
  Returns the manifest.
  """
  bounds = proof.segments(plan)
  if not 1 <= at <= len(bounds):
    raise ValueError(f"Expected 1 <= at <= {len(bounds)} (a checkpoint after step 0), got at={at}.")

  def swap_at(i, state, end, train):
    trained = train()
    return trained.replace(params=stolen.params, model_state=stolen.model_state) if i + 1 == at else trained

  log = seed_order(plan, len(dataset))
  return write_proof(proof_dir, program, dataset, plan, checkpoints(program, dataset, plan, log, swap_at), log, config)
