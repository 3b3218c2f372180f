"""pol-jax: Proof-of-Learning with bit-exact replay on JAX.

Record a proof while training, verify it by replaying sampled segments::

  import pol_jax
  manifest = pol_jax.record("runs/x/proof", program, dataset, plan)
  verdict = pol_jax.verify("runs/x/proof", program, dataset)
  print(verdict.table())

The headline names are re-exported here; each concept lives in its module:

  augment       deterministic crop and flip inside the compiled step, keyed per step
  build         this project's models, data and optimizers from a (recorded) config
  challenge     which segments a verifier replays (``All``, ``TopQ``, ``Uniform``, ...)
  data          datasets, sources, example digests
  distances     distances between states (tolerance mode)
  distributed   training across untrusted workers: assignments, judging, engines
  fingerprint   the software/hardware environment and program fingerprints
  integrations  Flax NNX and Linen adapters
  models        the CNN, MLP and ResNet models the experiments use
  numerics      portable numerics (float64 compute rounded to float32)
  ownership     owner keys, signed commitments and ownership disputes
  paper         the paper's verifier (top-Q, KS test of the initial state)
  proof         the proof format: Plan, manifest, digests, files
  recorder      ``record``: the training loop that writes a proof
  replay        replaying segments: the modes ``Exact`` and ``Tolerance``
  sampling      the seed-derived data order
  store         the recorded states: batched Orbax checkpoints, written and restored
  tolerance     tolerance thresholds and their calibration
  training      TrainState, Program, the step and segment functions
  verifier      ``verify``: the checks and their Verdict

Internal (no stability promise): ``safeio``, ``isolation``, ``venv``,
``workers``.
"""

from pol_jax import (
  augment,
  build,
  challenge,
  data,
  distances,
  distributed,
  fingerprint,
  integrations,
  models,
  numerics,
  ownership,
  paper,
  proof,
  recorder,
  replay,
  sampling,
  store,
  tolerance,
  training,
  verifier,
)
from pol_jax.challenge import All, Challenge, FiatShamir, TopQ, TopQUniform, Uniform
from pol_jax.proof import Plan
from pol_jax.recorder import record
from pol_jax.replay import Exact, Mode, Tolerance
from pol_jax.training import Program, TrainState
from pol_jax.verifier import Check, Verdict, verify

__version__ = "0.1.0"
__all__ = [
  "All",
  "Challenge",
  "Check",
  "Exact",
  "FiatShamir",
  "Mode",
  "Plan",
  "Program",
  "Tolerance",
  "TopQ",
  "TopQUniform",
  "TrainState",
  "Uniform",
  "Verdict",
  "augment",
  "build",
  "challenge",
  "data",
  "distances",
  "distributed",
  "fingerprint",
  "integrations",
  "models",
  "numerics",
  "ownership",
  "paper",
  "proof",
  "record",
  "recorder",
  "replay",
  "sampling",
  "store",
  "tolerance",
  "training",
  "verifier",
  "verify",
]
