"""Distances between training states: l1, l2, linf and cosine.

Computed over every floating-point leaf of the state, flattened into one
vector, in float64 on the host. ``cosine`` is ``1 - <a, b> / (|a| |b|)`` (the
official PoL code divided by ``|a| * |a|``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pol_jax import proof

METRICS = ("l1", "l2", "linf", "cosine")


def _floating(tree: Any) -> list[np.ndarray]:
  out = []
  for _, leaf in proof.flatten(tree):
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating):
      out.append(leaf.astype(np.float64).ravel())
  return out


def distances(a: Any, b: Any) -> dict[str, float]:
  """``{metric: distance}`` between two states of the same structure.

  >>> d = distances({"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 1.0])})
  >>> d["l1"], d["linf"], d["cosine"]
  (2.0, 1.0, 1.0)
  """
  l1 = l2 = linf = dot = na = nb = 0.0
  for x, y in zip(_floating(a), _floating(b), strict=True):
    diff = np.abs(x - y)
    l1 += float(diff.sum())
    l2 += float(np.dot(diff, diff))
    linf = max(linf, float(diff.max(initial=0.0)))
    dot += float(np.dot(x, y))
    na += float(np.dot(x, x))
    nb += float(np.dot(y, y))
  cosine = 0.0 if na == nb == 0.0 else (1.0 if na == 0.0 or nb == 0.0 else 1.0 - dot / math.sqrt(na * nb))
  return {"l1": l1, "l2": math.sqrt(l2), "linf": linf, "cosine": max(cosine, 0.0)}
