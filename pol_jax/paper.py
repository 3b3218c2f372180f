"""The paper's verifier (Jia et al., IEEE S&P 2021), for comparison: what the published attacks were built against.

Top-Q segments per epoch, replayed in tolerance mode with the paper code's
default raw deltas (:data:`PAPER_TOLERANCE`), a KS test of the initial state
(:func:`ks_init`) instead of the seed's initialisation, and no check of the
data order or of progress. Do not use it to accept proofs: the infinitesimal
update and blindfold top-Q attacks pass it (docs/attacks.md).
"""

from __future__ import annotations

import jax
import numpy as np

from pol_jax import challenge, proof, replay, tolerance, training, verifier
from pol_jax import data as data_lib

KS_SEED = 20210524
"""The key of the fresh initialisation the KS init check compares with."""
KS_ALPHA = 0.01
"""The paper code's threshold on the KS p-values (here family-wise, Holm-Bonferroni)."""

PAPER_TOLERANCE = tolerance.Thresholds(
  {"l1": 1000.0, "l2": 10.0, "linf": 0.1, "cosine": 0.001},
  normalised=False,
  source="the paper code's default deltas, raw distances",
  reject={"l1": 1000.0, "l2": 10.0, "linf": 0.1, "cosine": 0.001},  # the paper rejects outside delta
)


def ks_init(params, fresh) -> tuple[float, str, int]:
  """The paper's initialisation check: a two-sample KS test per parameter leaf.

  Compares each leaf of ``params`` (a recorded step 0) with the same leaf of
  ``fresh`` (an initialisation the verifier draws itself). A leaf the
  initialiser sets to a constant (biases: zeros) must equal it.

  Returns:
    ``(smallest p-value, its leaf, number of leaves tested)``; the family is
    rejected at level alpha when ``p * tests < alpha`` (Holm-Bonferroni).
  """
  from scipy import stats  # on use: scipy.stats takes a while to import

  results = []
  fresh_leaves = dict(proof.flatten(fresh))
  for names, leaf in proof.flatten(params):
    a, b = np.ravel(np.asarray(leaf, np.float64)), np.ravel(np.asarray(fresh_leaves[names], np.float64))
    if b.min() == b.max():
      p = 1.0 if (a == b[0]).all() else 0.0
    else:
      p = float(stats.ks_2samp(a, b, method="asymp").pvalue)
    results.append((p, proof.path_str(names)))
  p, leaf = min(results)
  return p, leaf, len(results)


def check_init(state0: training.TrainState, program: training.Program) -> verifier.Check:
  """The paper's init check (``verify(init_check=...)``): :func:`ks_init` of step 0 against a fresh init.

  It accepts any init drawn from the right distribution, which is what the
  infinitesimal-update attack exploits.
  """
  p_min, leaf, tests = ks_init(state0.params, program.init(jax.random.key(KS_SEED)).params)
  return verifier.Check(
    "init",
    p_min * tests >= KS_ALPHA,
    f"KS test of step 0 against a fresh init, {tests} parameter leaves: smallest p = {p_min:.3g} ({leaf}); "
    f"Holm-Bonferroni at alpha {KS_ALPHA} needs >= {KS_ALPHA / tests:.3g}",
  )


def paper(
  proof_dir: str, program: training.Program, dataset: data_lib.Dataset, *, q: int = 2, **kwargs
) -> verifier.Verdict:
  """The paper's verifier, for comparison: what the published attacks were built against.

  Top-Q segments per epoch (``q``, the paper code's default 2), replayed with
  the tolerance mode and the paper code's default raw deltas
  (:data:`PAPER_TOLERANCE`), the KS initialisation check instead of the
  seed's, and no check of the data order or of progress. Integrity, program and data
  digests are still ours. ``kwargs`` go to :func:`pol_jax.verifier.verify`
  (``integrity``, ``builder``, ...). Do not use it to accept proofs.
  """
  return verifier.verify(
    proof_dir,
    program,
    dataset,
    challenge=challenge.TopQ(q),
    replay=replay.Tolerance(PAPER_TOLERANCE),
    init_check=check_init,
    order_check=False,
    progress_check=False,
    **kwargs,
  )
