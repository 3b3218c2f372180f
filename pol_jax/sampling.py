"""The data order: seed-derived epoch permutations, laid out as the index log.

Step ``t`` of a run uses the examples ``log[t]`` of the ``int32 [T, B]`` index
log. Epoch ``e`` is ``jax.random.permutation(fold_in(order_key, e), N)`` cut
into ``N // B`` batches (the remainder is dropped), so the whole order follows
from the committed seed and a verifier recomputes it exactly.
"""

from __future__ import annotations

import jax
import numpy as np


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch."""
  if not 0 < batch_size <= num_examples:
    raise ValueError(f"Expected 0 < batch_size <= {num_examples}, got batch_size={batch_size}.")
  return num_examples // batch_size


def epoch_order(order_key: jax.Array, epoch: int, num_examples: int) -> np.ndarray:
  """The permutation of ``range(num_examples)`` for ``epoch``."""
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    perm = jax.random.permutation(jax.random.fold_in(order_key, epoch), num_examples)
  return np.asarray(perm, np.int32)


def index_log(order_key: jax.Array, num_examples: int, batch_size: int, num_steps: int, start: int = 0) -> np.ndarray:
  """``int32 [num_steps - start, B]``: the indices of steps ``start`` to ``num_steps``.

  >>> from pol_jax import training
  >>> index_log(training.derive_keys(0).order, 100, 10, 12).shape
  (12, 10)
  """
  per_epoch = steps_per_epoch(num_examples, batch_size)
  out = np.empty((num_steps - start, batch_size), np.int32)
  epoch, order = -1, None
  for t in range(start, num_steps):
    if t // per_epoch != epoch:
      epoch = t // per_epoch
      order = epoch_order(order_key, epoch, num_examples)
    b = t % per_epoch
    out[t - start] = order[b * batch_size : (b + 1) * batch_size]
  return out


def index_log_job(job: dict, ready) -> dict:
  """``{"sha256": ...}`` of the index log that ``job`` describes, computed in this process's JAX settings.

  For :func:`pol_jax.isolation.run`: the verifier derives the seed's order in a
  child process started with the prover's x64 setting (the order depends on
  it) when its own differs. ``job``: ``seed``, ``num_examples``, ``batch_size``,
  ``num_steps``.
  """
  from pol_jax import proof, training

  ready()
  order = training.derive_keys(int(job["seed"])).order
  log = index_log(order, int(job["num_examples"]), int(job["batch_size"]), int(job["num_steps"]))
  return {"sha256": proof.leaf_digest("indices", log)}
