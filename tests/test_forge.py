"""experiments/forge.py: the forging moves the attacks and the Byzantine workers are made of."""

from __future__ import annotations

import numpy as np

from experiments import forge


def test_rank_match_keeps_the_genuine_values_and_the_target_order():
  rng = np.random.default_rng(0)
  genuine, target = rng.normal(size=(16, 8)), rng.normal(size=(16, 8))
  matched = forge.rank_match(genuine, target)
  np.testing.assert_array_equal(np.sort(matched, axis=None), np.sort(genuine, axis=None))
  np.testing.assert_array_equal(np.argsort(matched, axis=None), np.argsort(target, axis=None))
