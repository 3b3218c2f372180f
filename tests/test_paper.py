"""The paper's verifier (``pol_jax.paper``), kept to show what the published attacks were built against.

Its KS initialisation check accepts any draw of the right distribution and
rejects another one, judging the family of per-leaf tests by Holm-Bonferroni;
its verdict leaves out the data order and progress checks. The attacks that
pass it are in ``test_attack.py``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import smoke_config

from pol_jax import build, paper, proof, training


@pytest.fixture(scope="module")
def cnn() -> training.Program:
  config = smoke_config("cnn")
  return build.program(config, build.dataset(config, "train"))


def _edit_leaf(state: training.TrainState, path: str, edit) -> training.TrainState:
  """``state`` with the parameter leaf at ``path`` (as :func:`pol_jax.proof.flatten` names it) replaced by ``edit(leaf)``."""
  leaves, tree = jax.tree_util.tree_flatten(state.params)
  names = [proof.path_str(n) for n, _ in proof.flatten(state.params)]
  i = names.index(path)
  leaves[i] = edit(leaves[i])
  return state.replace(params=jax.tree_util.tree_unflatten(tree, leaves))


def _leaves(state: training.TrainState, constant: bool) -> list[str]:
  """The parameter leaves the initialiser sets to one value (``constant``), or draws at random, largest first."""
  found = [(np.size(x), proof.path_str(n)) for n, x in proof.flatten(state.params) if (np.ptp(x) == 0) == constant]
  return [path for _, path in sorted(found, reverse=True)]


def _fresh(cnn: training.Program):
  return cnn.init(jax.random.key(paper.KS_SEED)).params


def test_an_init_from_another_seed_passes_the_ks_check(cnn):
  """The check is distributional: step 0 from any key passes, where our own init check wants the seed's, bit for bit."""
  leaves = len(proof.flatten(_fresh(cnn)))
  for seed in (1, 2, 3):
    check = paper.check_init(cnn.init(jax.random.key(seed)), cnn)
    assert check.passed, check.detail
    assert f"{leaves} parameter leaves" in check.detail


def test_a_rescaled_kernel_fails_and_the_check_names_it(cnn):
  state = cnn.init(jax.random.key(1))
  target = _leaves(state, constant=False)[0]
  scaled = _edit_leaf(state, target, lambda x: x * 3)
  check = paper.check_init(scaled, cnn)
  assert check.passed is False, check.detail
  assert f"({target})" in check.detail, check.detail


def test_a_constant_leaf_must_equal_the_initialisers_constant(cnn):
  """Biases start at zero: one entry off by 1e-6 is p = 0, whatever the rest."""
  state = cnn.init(jax.random.key(1))
  target = _leaves(state, constant=True)[0]
  nudged = _edit_leaf(state, target, lambda x: x.at[(0,) * x.ndim].add(1e-6))
  p, leaf, _ = paper.ks_init(nudged.params, _fresh(cnn))
  assert (p, leaf) == (0.0, target)
  assert paper.check_init(nudged, cnn).passed is False


def test_the_family_of_leaf_tests_is_judged_by_holm_bonferroni(cnn):
  """A leaf whose p-value alone would fail at alpha (p < 0.01), but not once multiplied by the number of
  leaves tested, passes: the paper code's threshold applies to the family, not to each leaf."""
  state = cnn.init(jax.random.key(1))
  target = _leaves(state, constant=False)[0]
  tests, fresh = len(proof.flatten(state.params)), _fresh(cnn)
  for scale in np.linspace(1.0, 1.5, 501):
    edited = _edit_leaf(state, target, lambda x, s=scale: x * s)
    p, leaf, _ = paper.ks_init(edited.params, fresh)
    if leaf == target and paper.KS_ALPHA / tests <= p < paper.KS_ALPHA:
      break
  else:
    pytest.fail("no scale puts the smallest p-value between alpha / tests and alpha")
  check = paper.check_init(edited, cnn)
  assert check.passed, check.detail
  assert f"smallest p = {p:.3g} ({target})" in check.detail
  harsher = _edit_leaf(state, target, lambda x: x * (scale + 0.2))
  assert paper.check_init(harsher, cnn).passed is False


def test_the_paper_verifier_accepts_an_honest_proof_without_order_or_progress_checks(honest):
  program, train = build.rebuild(honest)
  verdict = paper.paper(honest, program, train)
  assert verdict.accepted, verdict.table()
  checks = {c.name: c for c in verdict.checks}
  assert checks["data order"].passed is None and checks["progress"].passed is None
  assert checks["init"].passed and "KS test" in checks["init"].detail
  assert verdict.mode == "tolerance"
