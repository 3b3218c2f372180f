"""Which segments a verifier replays.

``all`` replays every segment. ``uniform`` draws n segments from a verifier's
seed, drawn after the prover handed the proof over (interactive): the prover
cannot know where the verifier will look. ``fiat-shamir`` draws them from the
proof's root digest, so anyone can repeat the check without the verifier
(non-interactive), but a forger can re-roll the draw at the cost of resealing:
change any recorded byte of a faked proof, get a new root and a new draw, until
the draw misses the faked segments. With m faked segments of S, each try
passes with :func:`pass_probability`; Fiat-Shamir therefore needs n large
enough that ``tries * pass_probability`` is small, whereas for ``uniform`` one
try is all the forger gets. ``top-q`` is the paper's: per
epoch and per metric, the Q segments with the largest recorded update, united
over the metrics; a prover knows in advance which segments it selects, which is
what the blindfold attack exploits, so it is never our only check.

``uniform`` and ``fiat-shamir`` always include the last segment
(:func:`including_last`): it ends on the model the proof is about, so a proof
whose last checkpoint was swapped for another model (a stolen one) is caught
whatever the draw; the other n - 1 segments are drawn from the rest.
"""

from __future__ import annotations

import hashlib

import numpy as np

STRATEGIES = ("fiat-shamir", "uniform", "top-q", "all")


def all_segments(num_segments: int) -> list[int]:
  return list(range(num_segments))


def uniform(num_segments: int, n: int, seed: int) -> list[int]:
  """``min(n, num_segments)`` distinct segments drawn from the verifier's ``seed``."""
  rng = np.random.default_rng(seed)
  return sorted(int(i) for i in rng.choice(num_segments, size=min(n, num_segments), replace=False))


def fiat_shamir(num_segments: int, n: int, root: str) -> list[int]:
  """``min(n, num_segments)`` distinct segments drawn from the proof root.

  Draws 64-bit values ``SHA-256(root || counter)`` and rejects those above the
  largest multiple of ``num_segments``, so every segment is equally likely.

  >>> fiat_shamir(10, 3, "00" * 32) == fiat_shamir(10, 3, "00" * 32)
  True
  """
  n = min(n, num_segments)
  limit = (2**64 // num_segments) * num_segments
  chosen: set[int] = set()
  counter = 0
  while len(chosen) < n:
    value = int.from_bytes(hashlib.sha256(f"pol-jax/challenge/v1:{root}:{counter}".encode()).digest()[:8], "big")
    counter += 1
    if value < limit:
      chosen.add(value % num_segments)
  return sorted(chosen)


def including_last(num_segments: int, n: int, draw) -> list[int]:
  """The last segment and ``n - 1`` others chosen by ``draw(num_others, n - 1)``.

  >>> including_last(10, 3, lambda count, m: list(range(m)))
  [0, 1, 9]
  >>> including_last(1, 8, lambda count, m: list(range(m)))
  [0]
  """
  if n < 1:
    return []
  others = draw(num_segments - 1, n - 1) if num_segments > 1 and n > 1 else []
  return sorted({*others, num_segments - 1})


def pass_probability(num_segments: int, n: int, false_segments) -> float:
  """The probability that an :func:`including_last` draw of n misses every false segment.

  That is, that a proof whose ``false_segments`` do not replay is accepted by
  a draw of ``n`` of ``num_segments`` segments that always includes the last:
  0 if the last is false, else ``C(S-1-m, n-1) / C(S-1, n-1)`` for the m false
  others.

  >>> pass_probability(30, 8, {29})
  0.0
  >>> round(pass_probability(30, 8, {14, 15}), 3)
  0.569
  >>> pass_probability(30, 8, set())
  1.0
  """
  import math

  false_segments = set(false_segments)
  if not false_segments:
    return 1.0
  if num_segments - 1 in false_segments or n >= num_segments:
    return 0.0
  others, draws, m = num_segments - 1, max(0, n - 1), len(false_segments)
  return math.comb(others - m, draws) / math.comb(others, draws)


def top_q(update_sizes: dict[str, np.ndarray], epochs: np.ndarray, q: int) -> list[int]:
  """Per epoch, the ``q`` segments with the largest update under any metric.

  Args:
    update_sizes: ``{metric: [num_segments]}`` distance between the recorded
      states at each segment's start and end.
    epochs: ``[num_segments]`` the epoch each segment starts in.
    q: segments per epoch and metric.
  """
  chosen: set[int] = set()
  epochs = np.asarray(epochs)
  for sizes in update_sizes.values():
    sizes = np.asarray(sizes)
    for epoch in np.unique(epochs):
      members = np.flatnonzero(epochs == epoch)
      order = members[np.argsort(-sizes[members], kind="stable")]
      chosen.update(int(i) for i in order[:q])
  return sorted(chosen)
