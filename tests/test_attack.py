"""experiments/attack.py, the attack table: each spoof is rejected by our verifier, with the named check.

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

import pytest
from conftest import smoke_config

from experiments import attack
from pol_jax import challenge

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
  "splice-stolen": "replay",
  "splice-stolen-frozen": "replay",
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
  every = row["verdicts"]["ours-all"]
  assert not every["accepted"] and every["check"] == CAUGHT_BY[name], row
  assert row["seconds"] > 0 and row["cost"] > 0
  for verifier in ("ours", "ours-uniform"):
    drawn = row["verdicts"][verifier]
    if CAUGHT_BY[name] != "replay":  # whatever the draw
      assert not drawn["accepted"] and drawn["check"] == CAUGHT_BY[name] and drawn["catch_probability"] == 1.0, row
      continue
    # Replay decides: a draw rejects exactly when it hits a false segment (or, for progress, an unmoved one).
    bad, chosen = set(every["false_segments"]) | set(every["unmoved_segments"]), set(drawn["segments"])
    assert every["false_segments"] and drawn["accepted"] == (not bad & chosen), row
    if verifier == "ours-uniform":
      assert len(chosen) == N, row
      assert drawn["catch_probability"] == pytest.approx(1 - challenge.pass_probability(every["num_segments"], N, bad))


def test_a_spliced_checkpoint_grinds_fiat_shamir_but_not_a_verifier_seed(table):
  """The finding: a forger re-rolls a root-derived draw by resealing; a uniform draw from a verifier seed it cannot."""
  row = row_of(table, "tamper-splice")
  assert row["details"]["ground"] and row["details"]["faked_segments"] == [2, 3], row
  assert row["verdicts"]["ours-fiat-shamir"]["accepted"], row
  assert row["verdicts"]["ours-uniform"]["catch_probability"] == pytest.approx(1 - 3 / 10)  # C(3,2)/C(5,2) pass
  assert row["verdicts"]["ours"]["catch_probability"] >= 1 - 3 / 10


@pytest.mark.parametrize("name", ["splice-stolen", "splice-stolen-frozen"])
def test_a_one_segment_jump_to_the_stolen_model_is_always_caught_by_the_default_only(table, name):
  """The finding: one faked segment slips past a uniform draw; it is the largest update of its epoch, so top-q
  always replays it. With a learning rate of 1e-30 the replayed tail moves no bit, and the progress check says so."""
  row = row_of(table, name)
  ours, uniform = row["verdicts"]["ours"], row["verdicts"]["ours-uniform"]
  assert row["verdicts"]["ours-all"]["false_segments"] == row["details"]["faked_segments"], row
  assert not ours["accepted"] and ours["check"] == "replay" and ours["catch_probability"] == 1.0, row
  if name == "splice-stolen":
    assert 0 < uniform["catch_probability"] < 1, row
  else:  # a uniform draw always replays the frozen last segment: the progress check rejects whatever it draws
    assert uniform["catch_probability"] == 1.0 and not uniform["accepted"], row
    hit = set(row["details"]["faked_segments"]) & set(uniform["segments"])
    assert uniform["check"] == ("replay" if hit else "progress"), row
    assert hit or "k or the learning rate is too small for replay to be evidence" in uniform["detail"], row


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
