"""Exports a proof's final model: ``python -m experiments.export --proof=DIR --out=model.safetensors|model.msgpack``.

Writes the parameters and model state (BatchNorm statistics) of the proof's
checked final state as safetensors or Flax msgpack, keys ``params/...`` and
``model_state/...``, the formats people publish models in. ``--dtype``
casts floating arrays first (``bfloat16``, ``float16``), as a lower-precision
release would. Exit status 0, or 2 with a one-line error.
"""

from __future__ import annotations

import sys

import jax
import ml_dtypes
import numpy as np
from absl import app, flags, logging

from experiments import cli
from pol_jax import build, ownership, proof, recorder


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  if not _OUT.value.endswith((".safetensors", ".msgpack")):
    print(f"error: --out={_OUT.value}: expected a .safetensors or .msgpack file name", file=sys.stderr)
    sys.exit(2)
  try:
    program, _ = build.rebuild(_PROOF.value)
    state = recorder.final_state(_PROOF.value, program, proof.read_manifest(_PROOF.value))
  except (proof.ProofError, proof.IntegrityError) as e:
    print(f"error: {cli.in_flags(str(e))}", file=sys.stderr)
    sys.exit(2)
  if _DTYPE.value:
    dtype = np.dtype(getattr(ml_dtypes, _DTYPE.value, None) or _DTYPE.value)
    cast = lambda x: np.asarray(x).astype(dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else x  # noqa: E731
    state = state.replace(params=jax.tree.map(cast, state.params), model_state=jax.tree.map(cast, state.model_state))
  if _OUT.value.endswith(".safetensors"):
    ownership.export_safetensors(state, _OUT.value)
  else:
    ownership.export_msgpack(state, _OUT.value)
  print(f"model: {_OUT.value}")


if __name__ == "__main__":
  _PROOF = flags.DEFINE_string("proof", None, "The finished proof directory.", required=True)
  _OUT = flags.DEFINE_string("out", None, "model.safetensors or model.msgpack.", required=True)
  _DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float16"], "Cast floating arrays first.")
  app.run(main, flags_parser=cli.parse_flags)
