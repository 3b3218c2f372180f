"""pol_jax.sampling: the data order, seed-derived epoch permutations laid out as the index log."""

from __future__ import annotations

import numpy as np

from pol_jax import sampling, training


def test_index_log_is_the_seed_order_epoch_by_epoch():
  order = training.derive_keys(0).order
  log = sampling.index_log(order, 100, 32, 9)  # 3 steps per epoch, 3 epochs
  assert log.shape == (9, 32) and log.dtype == np.int32
  for epoch in range(3):
    used = log[3 * epoch : 3 * epoch + 3].ravel()
    assert len(set(used)) == 96, "an epoch draws without replacement"
  assert not np.array_equal(log[:3], log[3:6]), "each epoch has its own permutation"
  np.testing.assert_array_equal(sampling.index_log(order, 100, 32, 9, start=4), log[4:])
  assert not np.array_equal(sampling.index_log(training.derive_keys(1).order, 100, 32, 9), log)
