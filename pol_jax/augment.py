"""Deterministic data augmentation inside the compiled step, keyed per step.

The step passes its own key (``fold_in(step_root, step)``, split), so a
replay draws the same crops and flips as the prover did, and the proof needs
no record of them (the official PoL code left them unrecorded, which is one
reason its honest replays were noisy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def crop_and_flip(x: jax.Array, key: jax.Array, padding: int = 4) -> jax.Array:
  """Random crop after zero-padding by ``padding`` pixels, then a random horizontal flip.

  The CIFAR augmentation of the paper's code (torchvision's ``RandomCrop(32,
  padding=4)`` and ``RandomHorizontalFlip()``), drawn per example from ``key``.

  Args:
    x: ``[B, H, W, C]`` images (any dtype).
    key: the step's augmentation key.

  >>> x = jnp.arange(2 * 4 * 4, dtype=jnp.uint8).reshape(2, 4, 4, 1)
  >>> crop_and_flip(x, jax.random.key(0), padding=1).shape
  (2, 4, 4, 1)
  """
  b, h, w, _ = x.shape
  shift_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(shift_key, (b, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (b,))
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))
    return jnp.where(flip, crop[:, ::-1, :], crop)

  return jax.vmap(one)(padded, offsets, flips)
