"""A multilayer perceptron with dropout."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from pol_jax.models._functional import functional


class MLP(nnx.Module):
  """Flatten, then Dense-ReLU-Dropout per hidden layer, then a Dense head."""

  def __init__(self, in_features: int, features: Sequence[int], num_classes: int, dropout: float, *, rngs: nnx.Rngs):
    sizes = [in_features, *features]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
    self.dropout = nnx.Dropout(dropout)
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = self.dropout(nnx.relu(layer(x)), rngs=rngs)
    return self.head(x)


def build(
  *,
  in_features: int = 64,
  features: Sequence[int] = (128,),
  num_classes: int = 10,
  dropout: float = 0.1,
  input_scale: float = 1.0,
):
  """Returns ``(apply_fn, init_fn)`` for an MLP (see ``pol_jax.models``)."""
  features = tuple(features)
  return functional(lambda rngs: MLP(in_features, features, num_classes, dropout, rngs=rngs), input_scale)
