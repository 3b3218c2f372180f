"""pol-jax: Proof-of-Learning with bit-exact replay on JAX.

Import modules, not names::

  from pol_jax import recorder, verify
  manifest = recorder.record("runs/x/proof", program, dataset, plan)
  verdict = verify.verify("runs/x/proof", program, dataset)
"""

from pol_jax import challenge, data, distances, fingerprint, numerics, proof, recorder, sampling, training, verify

__version__ = "0.1.0"
__all__ = [
  "challenge",
  "data",
  "distances",
  "fingerprint",
  "numerics",
  "proof",
  "recorder",
  "sampling",
  "training",
  "verify",
]
