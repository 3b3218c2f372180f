"""Building blocks of the published spoofing attacks on Proof-of-Learning.

These are the forger's tools, used by ``experiments.attack`` to show which
verifier rejects which spoof. They write proofs in pol-jax's own layout, sealed
with a self-computed root, as a forger who knows the format would: the point
is that integrity alone proves nothing, and replay must decide.

* :func:`write_proof` writes any sequence of states as a sealed proof.
* :func:`rank_match` builds the infinitesimal-update attack's fake
  initialisation: a genuine initialisation sample rearranged into the rank
  order of the stolen weights, so a KS test sees a genuine sample.
* :func:`interpolate` moves a pytree of floats part of the way to another.
* :func:`reseal` edits a proof's manifest and recomputes its root.
* :func:`replace_checkpoint` swaps one recorded state for another and reseals.
* :func:`splice_stolen` trains honestly but for one checkpoint, which holds a
  stolen model, and on from it: a one-segment fake.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from pol_jax import data as data_lib
from pol_jax import proof, recorder, sampling, training

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
  writer = proof.Writer(proof_dir)
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


def reseal(proof_dir: str, edit: Callable[[dict], None]) -> dict:
  """Edits the manifest body with ``edit(body)`` and recomputes the root.

  The ``files`` listing is re-hashed first (a forger who changed files can),
  so ``edit`` sees, and may still change, the listing of the files as they are.
  """
  manifest = proof.read_json(os.path.join(proof_dir, proof.MANIFEST), proof.MANIFEST)
  body = {k: v for k, v in manifest.items() if k != "root"}
  if "files" in body:
    body["files"] = proof.file_listing(proof_dir)
  edit(body)
  sealed = proof.seal(body)
  proof.write_json_atomic(os.path.join(proof_dir, proof.MANIFEST), sealed)
  return sealed


def replace_checkpoint(proof_dir: str, state: PyTree, fingerprints: np.ndarray | None = None) -> dict:
  """Replaces the recorded state at ``state.step`` by ``state`` (host arrays) and reseals.

  The batch that holds it is rewritten with the other states as they were
  (their metas, hence their digests, unchanged). ``fingerprints``: the
  per-step state fingerprints to record for the segment that ends there
  (none by default, as a forger that omits them).
  """
  step = int(np.asarray(state.step))
  batch = proof.batch_of(step, proof.batches(proof_dir))
  metas = proof.read_batch_meta(proof_dir, batch)["states"]
  recorded = proof.restore_batch(proof_dir, batch, state, dict.fromkeys(map(int, metas)))
  scratch = os.path.abspath(proof_dir) + ".replace"
  writer = proof.Writer(scratch, flush_seconds=float("inf"), flush_states=len(recorded) + 1)
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
  return reseal(proof_dir, lambda body: body["checkpoints"].update({str(step): digest}))


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
  _, (state, segment, keys) = recorder.start_body(program, dataset, plan, config)
  log = sampling.index_log(keys.order, len(dataset), plan.batch_size, plan.steps)
  states = [state]
  for i, (start, end) in enumerate(bounds):
    state, _ = segment.run(state, dataset.batch(log[start:end]), keys.step)
    state = training.to_host(state)
    if i + 1 == at:
      state = state.replace(params=stolen.params, model_state=stolen.model_state)
    states.append(state)
  return write_proof(proof_dir, program, dataset, plan, states, log, config)
