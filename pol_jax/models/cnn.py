"""A small CNN: strided convolutions, BatchNorm (fused backward: ``_norm``), global average pooling.

Down-sampling uses stride-2 convolutions and the head uses average pooling:
max-pool's backward (select-and-scatter) has no deterministic GPU kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from pol_jax.models._functional import functional
from pol_jax.models._norm import BatchNorm


class CNN(nnx.Module):
  """Conv-BN-ReLU blocks (the first of each width at stride 2 after the stem)."""

  def __init__(self, in_channels: int, widths: Sequence[int], num_classes: int, dropout: float, *, rngs: nnx.Rngs):
    convs, norms = [], []
    channels = in_channels
    for i, width in enumerate(widths):
      stride = 1 if i == 0 else 2
      convs.append(nnx.Conv(channels, width, (3, 3), strides=stride, padding="SAME", use_bias=False, rngs=rngs))
      norms.append(BatchNorm(width, momentum=0.9, rngs=rngs))
      channels = width
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.dropout = nnx.Dropout(dropout)
    self.head = nnx.Linear(channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = nnx.relu(norm(conv(x)))
    x = x.mean(axis=(1, 2))
    return self.head(self.dropout(x, rngs=rngs))


def build(
  *,
  in_channels: int = 1,
  widths: Sequence[int] = (16, 32),
  num_classes: int = 10,
  dropout: float = 0.0,
  input_scale: float = 1.0,
):
  """Returns ``(apply_fn, init_fn)`` for the small CNN (see ``pol_jax.models``)."""
  widths = tuple(widths)
  return functional(lambda rngs: CNN(in_channels, widths, num_classes, dropout, rngs=rngs), input_scale)
