"""Turns an NNX module into the pure ``(apply_fn, init_fn)`` pair."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def functional(make_module: Callable[[nnx.Rngs], nnx.Module], input_scale: float = 1.0):
  """Splits an NNX module into ``(apply_fn, init_fn)`` over explicit state.

  Args:
    make_module: ``make_module(rngs)`` builds the module. Its ``__call__(x, *,
      rngs)`` takes the dropout stream at call time, so the module holds no RNG
      state and every random draw comes from the step key.
    input_scale: inputs (stored as integers) are cast to float32 and multiplied
      by this inside the compiled step.

  Returns:
    ``apply_fn(params, model_state, x, *, train, key) -> (outputs, model_state)``
    and ``init_fn(key) -> (params, model_state)``.

  >>> from pol_jax.models import mlp
  >>> apply_fn, init_fn = mlp.build(features=(16,), num_classes=10)
  >>> params, model_state = init_fn(jax.random.key(0))
  """
  graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: make_module(nnx.Rngs(0))), nnx.Param, ...)

  def init_fn(key: jax.Array):
    _, params, model_state = nnx.split(make_module(nnx.Rngs(params=key)), nnx.Param, ...)
    return params, model_state

  def apply_fn(params, model_state, x, *, train: bool, key: jax.Array | None = None):
    module = nnx.merge(graphdef, params, model_state, copy=True)
    if train:
      module.train()
    else:
      module.eval()
    x = x.astype(jnp.float32) * input_scale
    outputs = module(x, rngs=nnx.Rngs(dropout=key) if key is not None else None)
    _, _, new_model_state = nnx.split(module, nnx.Param, ...)
    return outputs, new_model_state

  return apply_fn, init_fn
