"""Adapters for training code written the usual Flax way.

Linen's ``flax.training.train_state.TrainState`` needs no adapter: it already
has ``step`` and ``params`` and is a pytree (see ``examples/linen_train_state.py``).
An NNX loop keeps its state in objects it mutates (a module and an
``nnx.Optimizer``); :func:`nnx_program` turns the user's ``create`` and
``train_step`` into the pure :class:`~pol_jax.training.Program` that pol-jax
records and replays, without changing either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from pol_jax import training


@flax.struct.dataclass
class NNXState:
  """The whole state of an NNX training loop, as one pytree.

  Attributes:
    step: int32 scalar, the number of steps taken (pol-jax's count; the
      optimizer keeps its own in ``rest``).
    params: the ``nnx.Param`` variables of the objects ``create`` returns.
    rest: every other variable: BatchNorm statistics, RNG counts, the
      optimizer's moments and step.
  """

  step: jax.Array
  params: nnx.State
  rest: nnx.State


class NNXProgram(NamedTuple):
  """A :class:`~pol_jax.training.Program` over :class:`NNXState`, plus ``objects``.

  Attributes:
    init: ``init(key) -> NNXState``.
    step: ``step(state, batch, key) -> (state, metrics)``, pure.
    objects: ``objects(state)`` rebuilds what ``create`` returned, e.g.
      ``(model, optimizer)``, holding that state.
  """

  init: Callable[[jax.Array], NNXState]
  step: training.StepFn
  objects: Callable[[NNXState], Any]
  numerics: str = "float32"


def nnx_program(create: Callable[[jax.Array], Any], train_step: Callable[..., dict]) -> NNXProgram:
  """Wraps an NNX training loop as a pure program.

  Args:
    create: ``create(key)`` builds the objects of the loop, usually
      ``(model, nnx.Optimizer(model, tx, wrt=nnx.Param))``, drawing every
      random number from ``key`` (``nnx.Rngs(key)``).
    train_step: ``train_step(*objects, batch[, key])`` updates the objects in
      place, as an NNX step does (``optimizer.update(model, grads)``), and
      returns a dict of scalar metrics or nothing (the NNX tutorial's
      ``train_step(model, optimizer, metrics, batch)`` that updates an
      ``nnx.MultiMetric``: return it from ``create`` and it is carried as
      state). ``key``, when the step takes one more argument than the objects
      and the batch, is the step's key (``nnx.Rngs(dropout=key)``); a model that
      keeps its own ``nnx.Rngs`` works too (its keys are recorded). It may be
      decorated with ``nnx.jit``.

  Returns:
    A program whose ``init`` and ``step`` are pure functions of
    :class:`NNXState`; ``program.objects(state)`` gives the objects back.

  >>> import optax
  >>> def create(key):
  ...   model = nnx.Linear(4, 2, rngs=nnx.Rngs(key))
  ...   return model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  >>> def train_step(model, optimizer, batch, key):
  ...   x, y = batch
  ...   loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(model)
  ...   optimizer.update(model, grads)
  ...   return {"loss": loss}
  >>> program = nnx_program(create, train_step)
  >>> state = program.init(jax.random.key(0))
  >>> state, metrics = program.step(state, (jnp.ones((3, 4)), jnp.zeros((3, 2))), jax.random.key(1))
  >>> int(state.step), sorted(metrics)
  (1, ['loss'])
  >>> model, optimizer = program.objects(state)
  >>> int(optimizer.step[...])
  1
  """
  abstract = nnx.eval_shape(lambda: create(jax.random.key(0)))
  graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
  single = not isinstance(abstract, tuple)

  def split(objects) -> tuple[nnx.State, nnx.State]:
    _, params, rest = nnx.split(objects, nnx.Param, ...)
    return params, rest

  def objects(state: NNXState):
    return nnx.merge(graphdef, state.params, state.rest, copy=True)

  def init(key: jax.Array) -> NNXState:
    params, rest = split(create(key))
    return NNXState(step=jnp.zeros((), jnp.int32), params=params, rest=rest)

  count = 1 if single else len(abstract)
  takes_key = _takes_key(train_step, count)

  def step(state: NNXState, batch, key: jax.Array):
    live = objects(state)
    args = ((live,) if single else tuple(live)) + (batch,) + ((key,) if takes_key else ())
    metrics = train_step(*args)
    if metrics is not None and not isinstance(metrics, dict):
      raise TypeError(
        f"train_step returned {type(metrics).__name__}; expected None (metrics kept in an nnx.Metric object "
        "that create returns) or a dict of scalar metrics"
      )
    params, rest = split(live)
    return NNXState(step=state.step + 1, params=params, rest=rest), dict(metrics or {})

  return NNXProgram(init, step, objects)


def _takes_key(train_step: Callable, count: int) -> bool:
  """Whether ``train_step`` takes the step key after the ``count`` objects and the batch."""
  import inspect

  try:
    parameters = list(inspect.signature(train_step).parameters.values())
  except (TypeError, ValueError):
    return True  # not introspectable: the documented form with the key
  if any(p.kind is p.VAR_POSITIONAL for p in parameters):
    return True
  positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  required = sum(p.default is p.empty for p in positional)
  if len(positional) >= count + 2 and required <= count + 2:
    return True
  if required <= count + 1 <= len(positional):
    return False
  names = ", ".join(p.name for p in positional)
  raise TypeError(
    f"train_step({names}) does not fit the {count} objects create returns: expected "
    f"train_step(<{count} objects>, batch) or train_step(<{count} objects>, batch, key)"
  )
