"""pol_jax.distances: l1, l2, linf and cosine between training states."""

from __future__ import annotations

import numpy as np
import pytest

from pol_jax import distances


def test_distances_are_correct_including_cosine():
  a = {"w": np.array([3.0, 4.0]), "i": np.array([1], np.int32)}
  b = {"w": np.array([4.0, 3.0]), "i": np.array([9], np.int32)}
  d = distances.distances(a, b)
  assert d == pytest.approx({"l1": 2.0, "l2": np.sqrt(2.0), "linf": 1.0, "cosine": 1 - 24 / 25})
  assert distances.distances(a, a) == {"l1": 0.0, "l2": 0.0, "linf": 0.0, "cosine": 0.0}
