"""Rebuilds a program from a recorded config: this project's models, data and optimizers.

A config (an ``ml_collections.ConfigDict`` or the plain dict a proof
records) names a dataset, a model, an optimizer and a plan;
:func:`program`, :func:`dataset` and :func:`plan` turn it into the explicit
arguments :func:`pol_jax.record` and :func:`pol_jax.verify` take. The
prover and the verifier both call these: a verifier rebuilds the program
from the config in the proof's manifest (:func:`rebuild`), and its worker
processes and a coordinator's judging children rebuild it by name
(:data:`BUILDER`).

A proof's config is input from the prover: :func:`from_config` refuses a
field this builder does not know and a model over a size limit before
anything is built, and the data come from this process's own data
directory, never from one the config names.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
from ml_collections import ConfigDict

from pol_jax import augment, data, numerics, proof, training, workers
from pol_jax.models import cnn, mlp, resnet

DATASETS = ("digits", *data.TFDS_DATASETS)
MODELS = ("mlp", "cnn", *(n for n in resnet.VARIANTS))
AUGMENTATIONS = ("none", "crop_flip")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")
FIELDS = frozenset(
  {
    "dataset", "model", "augment", "widths", "features", "dropout", "optimizer", "learning_rate", "momentum",
    "weight_decay", "schedule", "batch_size", "steps", "k", "seed", "owner", "runner", "numerics",
  }
)  # fmt: skip
"""The config fields this builder knows (those of ``experiments/configs/default.py``)."""


class ConfigError(ValueError):
  """A config field the builder cannot use: ``config.<field>: <why>``."""

  def __init__(self, field: str, message: str):
    super().__init__(f"config.{field}: {message}")
    self.field = field


class ProgramUnavailable(Exception):
  """The builder a verifier names (``program=``) cannot be imported here."""


def _get(config, field: str, kind: type | tuple[type, ...]):
  if field not in config:
    raise ConfigError(field, "missing")
  value = config[field]
  if kind in (int, float) and isinstance(value, bool):
    raise ConfigError(field, f"expected {kind.__name__}, got {value!r}")
  if kind is float and isinstance(value, int):
    value = float(value)
  if not isinstance(value, kind):
    names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise ConfigError(field, f"expected {names}, got {value!r:.60}")
  return value


def _choice(config, field: str, known: tuple[str, ...]) -> str:
  value = _get(config, field, str)
  if value not in known:
    raise ConfigError(field, f"unknown {field} {value!r} (known: {', '.join(known)})")
  return value


def _positive_ints(config, field: str) -> tuple[int, ...]:
  value = _get(config, field, (tuple, list))
  if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
    raise ConfigError(field, f"expected a list of positive integers, got {value!r:.60}")
  return tuple(value)


def dataset(config, split: str = "train") -> data.Dataset:
  """The dataset a config names.

  TFDS data are read from this process's own data directory, ``$TFDS_DATA_DIR``
  (:func:`set_data_dir`, the CLIs' ``--data_dir``), never from a directory a
  config names: a proof's config must not choose what its verifier reads.
  """
  name = _choice(config, "dataset", DATASETS)
  if name == "digits":
    return data.load_digits(split)
  try:
    return data.load_tfds(name, split, os.environ.get("TFDS_DATA_DIR") or None)
  except data.DataUnavailable as e:
    raise ConfigError("dataset", str(e)) from None


def set_data_dir(data_dir: str | None) -> None:
  """Makes ``data_dir`` this process's (and its workers') TFDS data directory; the CLIs' ``--data_dir``."""
  if data_dir:
    os.environ["TFDS_DATA_DIR"] = os.path.abspath(os.path.expanduser(data_dir))


MAX_PARAMS = 250_000_000
"""The most parameters a verifier builds from a proof's config by default (1 GB of float32)."""
MAX_LAYERS = 256
"""The most hidden layers (``features``) or blocks (``widths``) a config may name."""


def check_fields(config) -> None:
  """Refuses a config field this builder does not know (a reseal must not make a copy look independent)."""
  unknown = sorted(set(config) - FIELDS)
  if unknown:
    raise ConfigError(unknown[0], "unknown field: a proof's config may hold only the fields this builder knows")


def check_size(config, ds: data.Dataset, max_params: int = MAX_PARAMS) -> int:
  """The parameter count of the model a config names, refused over ``max_params`` before anything is allocated."""
  for field in ("features", "widths"):
    if field in config and isinstance(config[field], (list, tuple)) and len(config[field]) > MAX_LAYERS:
      raise ConfigError(field, f"{len(config[field])} layers is over the {MAX_LAYERS}-layer limit")
  _, init_fn = _model(config, ds)
  shapes = jax.eval_shape(init_fn, jax.random.key(0))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
  if count > max_params:
    raise ConfigError(
      "model",
      f"{count:,} parameters is over this verifier's limit of {max_params:,} (the max_params argument raises it)",
    )
  return count


def _num_classes(config) -> int:
  return data.TFDS_DATASETS.get(config.dataset, 10)


def plan(config) -> proof.Plan:
  """The plan a config describes: bound to ``config.owner``'s key, with ``config.seed`` as its nonce."""
  owner = _get(config, "owner", str)
  if not owner:
    raise ConfigError(
      "owner",
      "missing: the hex Ed25519 public key the proof is bound to (set config.owner to an ownership.new_key's)",
    )
  try:
    return proof.Plan(
      owner=owner,
      nonce=_get(config, "seed", int),
      k=_get(config, "k", int),
      steps=_get(config, "steps", int),
      batch_size=_get(config, "batch_size", int),
      runner=_choice(config, "runner", training.RUNNERS),
    )
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    message = str(e)
    if "public key" in message:
      raise ConfigError("owner", message) from None
    field = message.split("got ", 1)[-1].split("=", 1)[0]
    raise ConfigError("seed" if field == "nonce" else field, message) from None


def _model(config, ds: data.Dataset):
  name = _choice(config, "model", MODELS)
  num_classes = _num_classes(config)
  scale = 1.0 / 16.0 if config.dataset == "digits" else 1.0 / 255.0
  if name in resnet.VARIANTS:
    return resnet.build(name, in_channels=ds.inputs.shape[-1], num_classes=num_classes, input_scale=scale)
  dropout = _get(config, "dropout", float)
  if not 0.0 <= dropout < 1.0:
    raise ConfigError("dropout", f"expected 0 <= dropout < 1, got {dropout}")
  if name == "mlp":
    features = _positive_ints(config, "features")
    return mlp.build(
      in_features=int(np.prod(ds.inputs.shape[1:])),
      features=features,
      num_classes=num_classes,
      dropout=dropout,
      input_scale=scale,
    )
  widths = _positive_ints(config, "widths")
  return cnn.build(
    in_channels=ds.inputs.shape[-1], widths=widths, num_classes=num_classes, dropout=dropout, input_scale=scale
  )


def optimizer(config) -> optax.GradientTransformation:
  """The optimizer a config describes, with its learning-rate schedule and weight decay."""
  steps = _get(config, "steps", int)
  lr = _get(config, "learning_rate", float)
  if not lr > 0:
    raise ConfigError("learning_rate", f"expected > 0, got {lr}")
  schedule = _choice(config, "schedule", SCHEDULES)
  if schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, max(steps, 1))
  elif schedule == "step":
    lr = optax.piecewise_constant_schedule(lr, {int(steps * 0.5): 0.1, int(steps * 0.75): 0.1})
  name = _choice(config, "optimizer", OPTIMIZERS)
  decay = _get(config, "weight_decay", float)
  if name == "sgd":
    tx = optax.sgd(lr, momentum=_get(config, "momentum", float) or None)
  else:
    tx = optax.adam(lr)
  return optax.chain(optax.add_decayed_weights(decay), tx) if decay else tx


def program(config, ds: data.Dataset) -> training.Program:
  """The ``init`` and ``step`` a config describes."""
  apply_fn, init_fn = _model(config, ds)
  tx = optimizer(config)

  def init(key):
    params, model_state = init_fn(key)
    return training.init_state(params, tx, model_state)

  augmentation = _choice(config, "augment", AUGMENTATIONS) if "augment" in config else "none"
  augment_fn = augment.crop_and_flip if augmentation == "crop_flip" else None
  step = training.make_step(apply_fn, training.cross_entropy, tx, augment=augment_fn)
  program = training.Program(init=init, step=step)
  if kind_of_numerics(config) == "portable":
    try:
      numerics.check_backend()
    except numerics.Unsupported as e:
      raise ConfigError("numerics", str(e)) from None
    program = numerics.portable_program(program)
  return program


def kind_of_numerics(config) -> str:
  """``config.numerics``: "float32" (default) or "portable" (``pol_jax.numerics``)."""
  return _choice(config, "numerics", numerics.KINDS) if "numerics" in config else "float32"


def set_numerics(config) -> None:
  """Turns x64 on for a portable config (it computes in float64); call before anything is traced.

  The CLIs call it; a library user sets ``jax_enable_x64`` themselves.
  """
  if kind_of_numerics(config) == "portable":
    jax.config.update("jax_enable_x64", True)


def evaluate(config, state: training.TrainState, ds: data.Dataset, batch_size: int = 512) -> float:
  """Accuracy of ``state`` on ``ds`` (inference mode)."""
  apply_fn, _ = _model(config, ds)
  predict = jax.jit(lambda p, s, x: jax.numpy.argmax(apply_fn(p, s, x, train=False)[0], -1))
  correct = 0
  for i in range(0, len(ds), batch_size):
    x, y = ds.batch(np.arange(i, min(i + batch_size, len(ds))))
    correct += int((np.asarray(predict(state.params, state.model_state, x)) == y).sum())
  return correct / len(ds)


BUILDER = "pol_jax.build:from_config"
"""This module's builder, as the verifier names it to its worker processes (``pol_jax.workers``) and a
coordinator to its judging children (``pol_jax.distributed``)."""


def from_config(config: dict, max_params: int | None = None) -> tuple[training.Program, data.Dataset]:
  """The program and training data a recorded config describes.

  Refuses unknown fields and a model over ``max_params`` parameters (default
  ``$POL_JAX_MAX_PARAMS`` or :data:`MAX_PARAMS`: the verifier's own setting,
  which its worker processes inherit) before it is built; the data come from
  this process's own data directory.

  >>> from_config({"dataset": "digits", "model": "transformer"})
  Traceback (most recent call last):
  pol_jax.build.ConfigError: config.model: unknown model 'transformer' (known: mlp, cnn, ...)

  Raises:
    ConfigError: a field the builder cannot use.
  """
  check_fields(config)
  config = ConfigDict(config)
  train = dataset(config, "train")
  check_size(config, train, max_params or int(os.environ.get("POL_JAX_MAX_PARAMS") or MAX_PARAMS))
  return program(config, train), train


def rebuild(
  proof_dir: str, max_params: int | None = None, program: str | None = None
) -> tuple[training.Program, data.Dataset]:
  """The program and training data a proof's recorded config describes.

  ``program``: the verifier's own ``"package.module:function"`` (``--program``)
  that builds ``(program, dataset)`` from the recorded config, for a proof a
  user's program recorded (``experiments.train --program``). A proof only names
  its builder; it is imported when the verifier names it, never because the
  proof does.

  Raises:
    proof.ProofError: the manifest is unusable, its config cannot be rebuilt,
      or it names a builder the verifier did not pass.
    ProgramUnavailable: ``program`` cannot be imported here.
  """
  manifest = proof.read_manifest(proof_dir)
  recorded = manifest.get("builder")
  if program is None and recorded is not None:
    raise proof.ProofError(
      proof.MANIFEST,
      "builder",
      f"recorded by {recorded['target']} (version {recorded['version']}); install that package and pass "
      f"program={recorded['target']!r} (pol-jax never imports code a proof names)",
    )
  if program is not None:
    return user_builder(program)(manifest["config"])
  try:
    return from_config(manifest["config"], max_params)
  except ConfigError as e:
    raise proof.ProofError(proof.MANIFEST, f"config.{e.field}", str(e).split(": ", 1)[1]) from None


def user_builder(target: str):
  """The user's ``build(config) -> (program, dataset)`` that ``target`` names, with its failures as one-line errors.

  Raises:
    ProgramUnavailable: ``target`` cannot be imported here.
  """
  try:
    fn = workers.load_builder(target)
  except ValueError as e:
    raise ProgramUnavailable(str(e)) from None

  def build_it(config: dict):
    try:
      program, dataset = fn(config)
    except Exception as e:  # the user's code: say whose and what
      raise proof.ProofError(
        proof.MANIFEST, "config", f"{target} could not build it ({type(e).__name__}: {e})"
      ) from None
    return program, dataset

  return build_it
