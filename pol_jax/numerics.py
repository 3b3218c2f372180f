"""Portable numerics: one program that gives the same bits on every backend and version.

Float32 kernels differ between backends (CPU, GPU, TPU), XLA versions and CPU
thread counts: they sum in other orders, fuse multiply-adds, approximate
transcendentals otherwise. Exact replay then needs the prover's environment.
A *portable* program removes the dependence (protocol ``x64r``): its state is
stored in float32, and every operation of the step (forward, backward, the
optimizer; the initialisation too) is computed in float64 and its result
rounded to the precision of the float type it had in the program as written
(float32 at most) with ``lax.reduce_precision``. Products of two rounded
values are exact in float64, so a fused multiply-add and a separate multiply
and add agree; sums of such products differ between orders only in the last
float64 bits, which the rounding removes except near a float32 rounding tie
(about 1e-8 per output element for K = 128 terms). Integer and random-bit
operations are exact everywhere.

:func:`portable` applies this to any function by interpreting its jaxpr:
each primitive is bound on float64 operands and its float output rounded.
The backward pass is part of a training step's jaxpr, so every cotangent is
rounded too. Primitives that carry a sub-program (``pjit``, custom
derivatives, remat) are interpreted recursively; a loop or a branch
(``scan``, ``while``, ``cond``) raises :class:`Unsupported`, naming it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

PROTOCOL = "x64r/1"
"""The rounding protocol: float64 compute, ``reduce_precision`` to the op's float type (at most float32)."""

KINDS = ("float32", "portable")

# Primitives whose sub-program is interpreted in place, and the parameter that holds it.
_INLINE = {
  "pjit": "jaxpr",
  "jit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_vjp_call_jaxpr": "fun_jaxpr",
  "remat": "jaxpr",
  "checkpoint": "jaxpr",
}

# Primitives whose sub-program is only their combiner (an add, a max, a select): bound as they are,
# on float64 operands, and their output rounded like any other.
_COMBINERS = {"scatter-add", "scatter_add", "scatter-mul", "scatter_mul", "scatter-min", "scatter_min",
              "scatter-max", "scatter_max", "scatter", "select_and_scatter_add", "reduce_window",
              "select_and_gather_add"}  # fmt: skip

# Primitives that only move, select or compare values: their float64 result is one of their
# (already rounded) inputs, so rounding it again would change nothing; it is skipped.
_EXACT = {"reshape", "broadcast_in_dim", "transpose", "slice", "dynamic_slice", "dynamic_update_slice", "concatenate",
          "pad", "gather", "squeeze", "expand_dims", "rev", "select_n", "max", "min", "neg", "abs", "copy", "copy_p",
          "reduce_max", "reduce_min", "clamp", "sort", "stop_gradient", "optimization_barrier"}  # fmt: skip

# Primitives computed in their original dtypes: their result depends on the bit layout.
_BITWISE = {"bitcast_convert_type", "nextafter", "random_bits", "random_wrap", "random_unwrap", "random_seed"}

_BITS = {  # (exponent bits, mantissa bits) of each float type's precision
  np.dtype(jnp.float32): (8, 23),
  np.dtype(jnp.bfloat16): (8, 7),
  np.dtype(jnp.float16): (5, 10),
}


class Unsupported(TypeError):
  """A function that portable numerics cannot wrap: names the primitive or the backend."""


def _is_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def _bits(dtype) -> tuple[int, int]:
  """The precision an op whose program dtype is ``dtype`` is rounded to (float32 at most)."""
  return _BITS.get(np.dtype(dtype), _BITS[np.dtype(jnp.float32)])


def _round(x, dtype):
  if not _is_float(getattr(x, "dtype", np.float32)) or not _is_float(dtype):
    return x
  exponent, mantissa = _bits(dtype)
  return jax.lax.reduce_precision(x, exponent_bits=exponent, mantissa_bits=mantissa)


def _promote(x):
  dtype = getattr(x, "dtype", None)
  if dtype is not None and _is_float(dtype) and np.dtype(dtype) != np.float64:
    return jnp.asarray(x).astype(jnp.float64)
  return x


def _retype(sub):
  """A combiner's sub-program (an add, a max) retraced on float64 operands."""
  closed = isinstance(sub, core.ClosedJaxpr)
  jaxpr, consts = (sub.jaxpr, sub.consts) if closed else (sub, [])
  avals = [
    jax.ShapeDtypeStruct(v.aval.shape, jnp.float64 if _is_float(v.aval.dtype) else v.aval.dtype) for v in jaxpr.invars
  ]
  new = jax.make_jaxpr(core.jaxpr_as_fun(core.ClosedJaxpr(jaxpr, consts)))(*avals)
  if closed:
    return new
  if new.consts:
    raise Unsupported("portable numerics cannot retype a combiner with constants")
  return new.jaxpr


def _float64_params(params: dict) -> dict:
  out = {k: _retype(v) if isinstance(v, core.Jaxpr | core.ClosedJaxpr) else v for k, v in params.items()}
  for name in ("preferred_element_type", "dtype", "new_dtype"):
    value = out.get(name)
    if value is not None and _is_float(value):
      out[name] = np.dtype(jnp.float64)
  return out


# Giles (2010), "Approximating the erfinv function": single-precision coefficients.
_ERFINV_SMALL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087, -0.00125372503,
                 -0.00417768164, 0.246640727, 1.50140941)  # fmt: skip
_ERFINV_LARGE = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773, -0.0076224613,
                 0.00943887047, 1.00167406, 2.83297682)  # fmt: skip


def _erf_inv(x):
  """erfinv from operations that round alike everywhere (XLA's float64 erf_inv changed between versions).

  Accurate to float32 precision; every step is rounded like any other op.
  """
  r = functools.partial(_round, dtype=jnp.float32)
  w = r(-r(jnp.log(r(r(1.0 - x) * r(1.0 + x)))))

  def poly(coefficients, t):
    p = jnp.full_like(t, coefficients[0])
    for c in coefficients[1:]:
      p = r(c + r(p * t))
    return p

  small = poly(_ERFINV_SMALL, r(w - 2.5))
  large = poly(_ERFINV_LARGE, r(r(jnp.sqrt(w)) - 3.0))
  return r(jnp.where(w < 5.0, small, large) * x)


_REPLACED = {"erf_inv": _erf_inv}


def _eval(jaxpr, consts, args):
  env = {}

  def read(v):
    return _promote(v.val) if isinstance(v, core.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts, strict=True):
    env[v] = _promote(c)
  for v, a in zip(jaxpr.invars, args, strict=True):
    env[v] = _promote(a)
  for eqn in jaxpr.eqns:
    outs = _apply(eqn, [read(v) for v in eqn.invars])
    for v, o in zip(eqn.outvars, outs, strict=True):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def _apply(eqn, invals):
  name = eqn.primitive.name
  if name in _INLINE and _INLINE[name] in eqn.params:
    sub = eqn.params[_INLINE[name]]
    if isinstance(sub, core.ClosedJaxpr):
      return _eval(sub.jaxpr, sub.consts, invals)
    return _eval(sub, [], invals)
  if name not in _COMBINERS and any(True for _ in core.jaxprs_in_params(eqn.params)):
    raise Unsupported(
      f"portable numerics cannot wrap a step that calls {name!r} (a loop or branch with its own program); "
      "write it without it, or record in float32"
    )
  if name in _REPLACED:
    return [_round(jax.lax.optimization_barrier(_REPLACED[name](*invals)), eqn.outvars[0].aval.dtype)]
  if name in _BITWISE:
    demoted = [
      jnp.asarray(x).astype(v.aval.dtype) if _is_float(getattr(v.aval, "dtype", np.int32)) else x
      for x, v in zip(invals, eqn.invars, strict=True)
    ]
    outs = eqn.primitive.bind(*demoted, **eqn.params)
    outs = outs if eqn.primitive.multiple_results else [outs]
    return [_promote(o) for o in outs]
  outs = eqn.primitive.bind(*invals, **_float64_params(eqn.params))
  outs = outs if eqn.primitive.multiple_results else [outs]
  if name in _EXACT:
    return outs
  return [_round(o, getattr(v.aval, "dtype", np.int32)) for o, v in zip(outs, eqn.outvars, strict=True)]


def check_backend() -> None:
  """Raises :class:`Unsupported` unless x64 is on and the backend computes in float64."""
  if not jax.config.jax_enable_x64:
    raise Unsupported(
      "portable numerics computes in float64 and needs x64: set JAX_ENABLE_X64=1 (or "
      "jax.config.update('jax_enable_x64', True)) before JAX starts computing"
    )
  try:
    jax.block_until_ready(jnp.ones((2,), jnp.float64) * 3.0)
  except Exception as e:  # noqa: BLE001 - any backend failure means no float64 here.
    raise Unsupported(f"the {jax.default_backend()} backend cannot compute in float64 ({type(e).__name__})") from None


def portable_program(program):
  """``program`` (a ``training.Program``) with portable numerics: its ``init`` and ``step`` wrapped.

  Recorded as such in the proof; a verifier builds the same and replays it
  bit for bit on any backend, JAX version and thread count (x64 on).
  """
  if program.numerics == "portable":
    return program
  return program._replace(init=portable(program.init), step=portable(program.step), numerics="portable")


def describe(kind: str) -> dict:
  """The manifest's ``numerics`` record."""
  return {"kind": kind, "protocol": PROTOCOL if kind == "portable" else None}


def portable(fn: Callable) -> Callable:
  """``fn`` computed in float64 and rounded to its float types' precision after every operation.

  The wrapped function takes and returns what ``fn`` does, with the same
  dtypes (a float32 result is exactly representable: it was rounded).

  >>> import jax.numpy as jnp
  >>> f = portable(lambda x: (x * 3.0).sum())
  >>> jax.config.update("jax_enable_x64", True); y = f(jnp.ones(4, jnp.float32)); y.dtype
  dtype('float32')
  >>> jax.config.update("jax_enable_x64", False)
  """

  @functools.wraps(fn)
  def wrapped(*args):
    check_backend()
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    outs = [
      jnp.asarray(o).astype(v.aval.dtype) if _is_float(getattr(v.aval, "dtype", np.int32)) else o
      for o, v in zip(outs, closed.jaxpr.outvars, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  wrapped.numerics = "portable"
  return wrapped
