"""pol_jax.augment: deterministic augmentation inside the step, keyed per step."""

from __future__ import annotations

import jax
import numpy as np

from pol_jax import augment


def test_augmentation_differs_between_steps_and_repeats_for_the_same_key():
  x = np.arange(8 * 6 * 6 * 3, dtype=np.uint8).reshape(8, 6, 6, 3)
  a = np.asarray(augment.crop_and_flip(x, jax.random.key(1), padding=2))
  b = np.asarray(augment.crop_and_flip(x, jax.random.key(1), padding=2))
  c = np.asarray(augment.crop_and_flip(x, jax.random.key(2), padding=2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == x.shape and a.dtype == x.dtype
  for i in range(8):  # every output pixel is an input pixel or padding
    assert set(np.unique(a[i])) <= set(np.unique(x[i])) | {0}
