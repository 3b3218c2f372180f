"""Training state, the pure training step, and the segment runner.

The segment runner is the only thing in pol-jax that advances training: the
prover's ``record`` and the verifier's replay both call :meth:`Segment.run` on
a :class:`Segment` built by :func:`make_segment` from the same step function,
so they execute the same compiled program in the same sequence.

All randomness derives from one seed (``derive_keys``); the key of a step is
``jax.random.fold_in(keys.step, state.step)``, computed inside the compiled
program, so a replay starting from a recorded state draws the same keys.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Batch = Any
"""A pytree of arrays: what the dataset's ``batch(indices)`` returns (``(inputs, labels)``, a dict, ...)."""
StepFn = Callable[["TrainState", Batch, jax.Array], tuple["TrainState", dict]]
ApplyFn = Callable[..., tuple[jax.Array, PyTree]]

RUNNERS = ("scan", "loop")
STATE_FINGERPRINT = "state_fingerprint"
"""The metrics key of the per-step state fingerprint the segment runner adds."""


@flax.struct.dataclass
class TrainState:
  """The whole training state: what a proof records every k steps.

  Attributes:
    step: int32 scalar, the number of steps taken so far.
    params: trainable parameters.
    opt_state: the optimizer's state (momentum, Adam moments, counts).
    model_state: non-trainable model state, e.g. BatchNorm statistics.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  model_state: PyTree


class Keys(NamedTuple):
  """The keys derived from the committed seed.

  ``init`` initialises the model, ``order`` draws the data order, ``step`` is
  the root of the per-step keys.
  """

  init: jax.Array
  order: jax.Array
  step: jax.Array


def derive_keys(seed: int) -> Keys:
  """Derives every key of a run from its seed (the determinism contract).

  >>> keys = derive_keys(0)
  >>> keys.init.dtype
  key<fry>
  """
  root = jax.random.key(int(seed), impl="threefry2x32")
  return Keys(*(jax.random.fold_in(root, i) for i in range(3)))


class Program(NamedTuple):
  """What a prover runs and a verifier re-runs.

  Attributes:
    init: ``init(key) -> TrainState``, the initial state from the init key.
    step: ``step(state, batch, key) -> (state, metrics)``, pure.
    numerics: ``"float32"`` (as written), or ``"portable"`` when ``init`` and
      ``step`` compute in float64 rounded after every op
      (``numerics.portable_program``): the same bits on every backend,
      version and thread count.
  """

  init: Callable[[jax.Array], TrainState]
  step: StepFn
  numerics: str = "float32"


def init_state(params: PyTree, tx: optax.GradientTransformation, model_state: PyTree = None) -> TrainState:
  """Builds step 0 of the training state."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    model_state={} if model_state is None else model_state,
  )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(
  apply_fn: ApplyFn,
  loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
  tx: optax.GradientTransformation,
  *,
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> StepFn:
  """Returns the pure training step ``(state, batch, key) -> (state, metrics)``.

  Args:
    apply_fn: ``apply_fn(params, model_state, x, *, train, key)`` returns
      ``(outputs, new_model_state)``; ``key`` feeds dropout.
    loss_fn: ``loss_fn(outputs, labels)``, a scalar.
    tx: the optax optimizer.
    augment: optional ``augment(x, key)``, run inside the step.

  >>> import optax
  >>> from pol_jax.models import mlp
  >>> apply_fn, init_fn = mlp.build(features=(8,), num_classes=10, dropout=0.0)
  >>> step = make_step(apply_fn, cross_entropy, optax.sgd(0.1))
  """

  def step(state: TrainState, batch: Batch, key: jax.Array):
    x, y = batch
    dropout_key, augment_key = jax.random.split(key)
    if augment is not None:
      x = augment(x, augment_key)

    def objective(params):
      outputs, model_state = apply_fn(params, state.model_state, x, train=True, key=dropout_key)
      return loss_fn(outputs, y), (outputs, model_state)

    (loss, (outputs, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
      model_state=model_state,
    )
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(outputs, -1) == y)}
    return new_state, metrics

  return step


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
  """Advances training by a run of steps; the prover's and the verifier's.

  ``kind="scan"`` compiles one ``lax.scan`` over the steps of a segment (few
  dispatches: the choice for GPU and TPU); ``kind="loop"`` runs a Python loop
  over one jitted step (the choice on CPU for convolutional models, which XLA:CPU
  runs far slower inside a loop body). The two give different bits, so a proof
  records its kind and the verifier builds the same one.

  A batched segment (``make_batched_segment``) runs many segments at once over
  a leading axis; its steps are on axis 1 and its bits are not the prover's.
  """

  kind: str
  compiled: Callable
  """The jitted function: the whole segment (scan) or one step (loop)."""
  step_axis: int = 0

  def run(self, state: TrainState, batches: Batch, step_root: jax.Array) -> tuple[TrainState, dict]:
    """Runs the steps of ``batches`` from ``state``; returns (state, stacked metrics)."""
    if self.kind == "scan":
      return self.compiled(state, batches, step_root)
    metrics = []
    axis = self.step_axis
    for i in range(jax.tree.leaves(batches)[0].shape[axis]):
      state, m = self.compiled(state, jax.tree.map(lambda a, i=i: a[(slice(None),) * axis + (i,)], batches), step_root)
      metrics.append(m)
    return state, jax.tree.map(lambda *ms: jnp.stack(ms, axis=axis), *metrics)

  def program_text(self, state: TrainState, batches: Batch, step_root: jax.Array) -> str:
    """The lowered StableHLO of the compiled function at these input shapes."""
    if self.kind == "loop":
      batches = jax.tree.map(lambda a: a[(slice(None),) * self.step_axis + (0,)], batches)
    return self.compiled.lower(state, batches, step_root).as_text(debug_info=False)


@functools.lru_cache(maxsize=16)
def make_segment(step: StepFn, kind: str) -> Segment:
  """Builds the segment runner of ``kind`` ("scan" or "loop") around ``step``.

  Memoised on ``(step, kind)``: verifying several proofs of one program in a
  process compiles its segment once.
  """
  if kind not in RUNNERS:
    raise ValueError(f"Expected runner in {RUNNERS}, got {kind!r}.")

  def one(state, batch, step_root):
    return _fingerprinted(step)(state, batch, jax.random.fold_in(step_root, state.step))

  if kind == "loop":
    return Segment(kind, jax.jit(one))

  def scanned(state, batches, step_root):
    return jax.lax.scan(lambda s, b: one(s, b, step_root), state, batches)

  return Segment(kind, jax.jit(scanned))


@functools.lru_cache(maxsize=16)
def make_batched_segment(step: StepFn, kind: str) -> Segment:
  """``jit(vmap(...))`` of the runner of ``kind`` over a leading axis of segments.

  For the tolerance mode only: XLA folds the segment axis into the step's
  matrix products, so the results are close to, but in general not bitwise
  equal to, the prover's.
  """
  if kind not in RUNNERS:
    raise ValueError(f"Expected runner in {RUNNERS}, got {kind!r}.")

  def one(state, batch, step_root):
    return _fingerprinted(step)(state, batch, jax.random.fold_in(step_root, state.step))

  if kind == "loop":
    return Segment(kind, jax.jit(jax.vmap(one, in_axes=(0, 0, None))), step_axis=1)

  def scanned(state, batches, step_root):
    return jax.lax.scan(lambda s, b: one(s, b, step_root), state, batches)

  return Segment(kind, jax.jit(jax.vmap(scanned, in_axes=(0, 0, None))), step_axis=1)


def _fingerprinted(step: StepFn) -> StepFn:
  def run(state, batch, key):
    new_state, metrics = step(state, batch, key)
    return new_state, {**metrics, STATE_FINGERPRINT: state_fingerprint(new_state)}

  return run


_ONE_PASS_WORDS = 1 << 18
"""States up to this many 32-bit words are fingerprinted in one pass (its segment ids are a constant)."""


def _leaf_words(x: jax.Array) -> jax.Array:
  """A leaf's bits as a flat uint32 vector (one word per element of 4 bytes or less)."""
  if is_key(x):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size in (4, 8):
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif size in (1, 2):
    words = jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  else:
    raise TypeError(f"state leaf of dtype {x.dtype} cannot be fingerprinted")
  return words.ravel()


def state_fingerprint(state: PyTree) -> jax.Array:
  """One uint32 per state leaf: a position-sensitive hash of its bits.

  Computed inside the compiled step, after every step, so a verifier whose
  replay does not land on a recorded state can name the first step and leaf
  that diverged. The hash is a sum of mixed words modulo 2**32: integer
  addition is associative, so every reduction order gives the same value on
  every backend. It locates a divergence; it is not a commitment (the
  SHA-256 leaf digests of the recorded states are).

  >>> state_fingerprint({"a": jnp.zeros(3), "b": jnp.ones((), jnp.int32)}).shape
  (2,)
  """
  words = [_leaf_words(jnp.asarray(leaf)) for leaf in jax.tree.leaves(state)]
  if not words:
    return jnp.zeros((0,), jnp.uint32)
  sizes = [w.size for w in words]

  def weighted(w, offset: int):  # an odd weight per position: a change of one word changes the sum
    return w * ((jax.lax.iota(jnp.uint32, w.size) + jnp.uint32(offset % 2**32)) * jnp.uint32(0x9E3779B2) + 1)

  if sum(sizes) <= _ONE_PASS_WORDS:  # a small state: one pass (a kernel per leaf costs more than the hashing)
    leaf_of = np.repeat(np.arange(len(words), dtype=np.int32), sizes)
    return jax.ops.segment_sum(
      weighted(jnp.concatenate(words), 0), leaf_of, num_segments=len(words), indices_are_sorted=True
    )
  offsets = np.cumsum([0, *sizes[:-1]])
  return jnp.stack([jnp.sum(weighted(w, int(o)), dtype=jnp.uint32) for w, o in zip(words, offsets, strict=True)])


def to_host(tree: PyTree) -> PyTree:
  """Copies a pytree of arrays to host NumPy arrays, with JAX's dtypes.

  Python scalars become arrays of the dtype JAX gives them (``int32`` for a
  step counter without x64), so a state built on the host (Flax's
  ``TrainState.create`` starts at ``step=0``) has the same leaf dtypes as the
  states the compiled step returns.
  """
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf) for leaf in leaves]  # keys are jax.Arrays
  # A CPU array is read as it is (jax.device_get took 190 us for the default CNN's 25
  # leaves, this 25); the others by jax.device_get, which starts every copy before
  # waiting on any and is an explicit transfer under jax.transfer_guard.
  out: list = [None] * len(leaves)
  elsewhere = []
  for i, leaf in enumerate(leaves):
    if is_key(leaf):
      out[i] = leaf
    elif all(d.platform == "cpu" for d in leaf.sharding.device_set):
      out[i] = np.asarray(leaf)
    else:
      elsewhere.append(i)
  for i, host in zip(elsewhere, jax.device_get([leaves[i] for i in elsewhere]), strict=True):
    out[i] = np.asarray(host)
  return jax.tree.unflatten(treedef, out)


def is_key(leaf: Any) -> bool:
  """Whether ``leaf`` is a typed PRNG key array (``jax.random.key``; NNX ``Rngs`` hold them).

  Keys stay JAX arrays in a host state (NumPy cannot hold them); a proof
  stores their ``jax.random.key_data`` and restores them with the same
  implementation (``proof.leaf_digest`` names it: ``key<fry>``).
  """
  dtype = getattr(leaf, "dtype", None)
  if dtype is None or isinstance(dtype, np.dtype):  # NumPy's dtypes: the common case, without jnp's checks
    return False
  return jnp.issubdtype(dtype, jax.dtypes.prng_key)
