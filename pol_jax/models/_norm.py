"""BatchNorm with one hand-written backward pass (``jax.custom_vjp``).

Same parameters and statistics as ``nnx.BatchNorm`` (``scale``, ``bias``,
``mean``, ``var``: a proof's leaf names do not change), the same forward and
running-statistics rule (batch mean and biased variance over every axis but
the last, ``E[x^2] - E[x]^2`` clipped at 0, exponential averages with
``momentum``). What differs is the gradient: autodiff of the normalisation
differentiates through the mean and the variance as separate reductions and
broadcasts; the closed form needs two reductions of the cotangent,

  dbias = sum(dy), dscale = sum(dy * xhat),
  dx = scale / sqrt(var + eps) / n * (n * dy - dbias - xhat * dscale),

which XLA:CPU fuses into far fewer passes over the activations. The batch
statistics carry no gradient (they only feed the running averages), as in
``nnx.BatchNorm``. The bits differ from ``nnx.BatchNorm``'s (another order of
operations), deterministically.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize(x, scale, bias, epsilon):
  y, mean, var, _ = _forward(x, scale, bias, epsilon)
  return y, mean, var


def _forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = jnp.maximum((x * x).mean(axes) - mean * mean, 0.0)
  inv = jax.lax.rsqrt(var + epsilon)
  xhat = (x - mean) * inv
  return xhat * scale + bias, mean, var, (xhat, inv)


def _fwd(x, scale, bias, epsilon):
  y, mean, var, (xhat, inv) = _forward(x, scale, bias, epsilon)
  return (y, mean, var), (xhat, inv, scale)


def _bwd(epsilon, residuals, cotangents):
  del epsilon
  xhat, inv, scale = residuals
  dy = cotangents[0]  # the statistics' cotangents are zero: they only feed the running averages
  axes = tuple(range(dy.ndim - 1))
  n = dy.size // dy.shape[-1]
  dbias = dy.sum(axes)
  dscale = (dy * xhat).sum(axes)
  dx = (scale * inv / n) * (n * dy - dbias - xhat * dscale)
  return dx, dscale, dbias


_normalize.defvjp(_fwd, _bwd)


class BatchNorm(nnx.Module):
  """``nnx.BatchNorm(num_features, momentum=, epsilon=)`` over the last axis, with a fused backward."""

  def __init__(self, num_features: int, *, momentum: float = 0.99, epsilon: float = 1e-5, rngs: nnx.Rngs):
    del rngs  # nothing random: the same signature as nnx.BatchNorm
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.momentum, self.epsilon = momentum, epsilon
    self.use_running_average = False

  def __call__(self, x):
    if self.use_running_average:
      return (x - self.mean[...]) * (self.scale[...] * jax.lax.rsqrt(self.var[...] + self.epsilon)) + self.bias[...]
    y, mean, var = _normalize(x, self.scale[...], self.bias[...], self.epsilon)
    mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
    self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
    return y
