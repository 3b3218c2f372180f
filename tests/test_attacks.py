"""Spoofing attacks: each spoof is rejected by our verifier, with the named check.

Checks other than replay reject a spoof whatever segments are drawn; a spoof
that only replay can catch is caught by a draw with the probability the
verdict states, always by ``all``, and (the grinding finding) not by a
Fiat-Shamir draw the forger could re-roll. The paper's verifier (tolerance
with its default deltas, top-Q, KS init) is run beside it, to show which
attacks live in the slack it leaves.

The victim has six segments of two steps and the verifier draws n = 3, so
that the draw is a real sample.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import smoke_config

from experiments import attack
from pol_jax import attacks, challenge

# The check of our default verifier that must catch each attack first.
CAUGHT_BY = {
  "infinitesimal-update": "init",
  "blindfold-top-q": "replay",
  "adversarial-examples": "program",
  "forging": "data order",
  "retrain-stolen": "init",
  "tamper-hyperparameters": "program",
  "tamper-reorder": "data order",
  "tamper-substitute": "data order",
  "tamper-splice": "replay",
  "tamper-final": "replay",
}


N = 3


@pytest.fixture(scope="module")
def table(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("attacks"))
  return attack.run(smoke_config("cnn", k=2), workdir, list(attack.ATTACKS), segments=N)


def row_of(table, name):
  return next(r for r in table["attacks"] if r["attack"] == name)


def test_every_known_attack_has_an_expected_check():
  assert set(CAUGHT_BY) == set(attack.ATTACKS)


def test_the_honest_proof_is_accepted_by_both_verifiers(table):
  assert all(v["accepted"] for v in table["honest"].values()), table["honest"]


@pytest.mark.parametrize("name", list(CAUGHT_BY))
def test_our_verifier_rejects_each_spoof_with_the_named_check(table, name):
  row = row_of(table, name)
  every, drawn = row["verdicts"]["ours-all"], row["verdicts"]["ours"]
  assert not every["accepted"] and every["check"] == CAUGHT_BY[name], row
  assert row["seconds"] > 0 and row["cost"] > 0
  if CAUGHT_BY[name] != "replay":  # whatever the draw
    assert not drawn["accepted"] and drawn["check"] == CAUGHT_BY[name] and drawn["catch_probability"] == 1.0, row
    return
  # Replay decides: the default draw rejects exactly when it hits a false segment, with the stated probability.
  false = set(every["false_segments"])
  assert false and len(drawn["segments"]) == N
  assert drawn["accepted"] == (not false & set(drawn["segments"])), row
  assert drawn["catch_probability"] == pytest.approx(1 - challenge.pass_probability(6, N, false))


def test_a_spliced_checkpoint_grinds_fiat_shamir_but_not_a_verifier_seed(table):
  """The finding: a forger re-rolls a root-derived draw by resealing; the default uniform draw it cannot."""
  row = row_of(table, "tamper-splice")
  assert row["details"]["ground"] and row["details"]["faked_segments"] == [2, 3], row
  assert row["verdicts"]["ours-fiat-shamir"]["accepted"], row
  assert row["verdicts"]["ours"]["catch_probability"] == pytest.approx(1 - 3 / 10)  # C(3,2)/C(5,2) pass


def test_the_last_segment_is_always_drawn_so_a_swapped_final_model_is_always_caught(table):
  row = row_of(table, "tamper-final")
  assert row["verdicts"]["ours"]["catch_probability"] == 1.0
  assert not row["verdicts"]["ours-fiat-shamir"]["accepted"]


def test_adversarial_examples_are_caught_by_our_data_and_by_exact_replay_of_the_provers_data(table):
  row = row_of(table, "adversarial-examples")
  # With its own copy of the data our verifier compiles another program (the prover's data are floats).
  # Given the prover's forged data and no order check, the digests hold and exact replay alone catches it.
  given = row["verdicts"]["ours-all"]["given_prover_data"]
  assert not given["accepted"] and given["check"] == "replay", row
  assert row["details"]["median_step_l2_after"] <= row["details"]["median_step_l2_before"]


def test_infinitesimal_update_passes_the_papers_verifier(table):
  """The published result: with delta > 0, a KS-only init check and top-Q, the spoof is accepted."""
  row = row_of(table, "infinitesimal-update")
  assert row["verdicts"]["paper"]["accepted"], row
  # It cost the attacker a fraction of honest training.
  assert row["cost"] < 1.0, row


def test_blindfold_passes_top_q_but_not_a_sample_that_includes_interpolated_segments(table):
  row = row_of(table, "blindfold-top-q")
  assert row["verdicts"]["paper"]["accepted"], row
  assert row["details"]["honest_segments"] < row["details"]["segments"]


def test_rank_match_keeps_the_genuine_values_and_the_target_order():
  rng = np.random.default_rng(0)
  genuine, target = rng.normal(size=(16, 8)), rng.normal(size=(16, 8))
  matched = attacks.rank_match(genuine, target)
  np.testing.assert_array_equal(np.sort(matched, axis=None), np.sort(genuine, axis=None))
  np.testing.assert_array_equal(np.argsort(matched, axis=None), np.argsort(target, axis=None))
