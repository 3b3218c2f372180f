"""pol_jax.challenge: which segments a verifier replays, and a sample a prover cannot game.

The strategies as typed values select what the strategy names select.

Sampling a prover cannot game: the default challenge against one-segment fakes.
Two forgeries, made with the real training code (``forge.splice_stolen``):
honest training from the seed, one checkpoint swapped for another run's final
model (the stolen one), and honest training from it to the end. Only the
segment ending on the swapped checkpoint fails to replay. With a tiny
learning rate (1e-30) and k = 1 the tail also keeps the stolen weights bit for
bit (a CNN: an MLP's dead ReLU units keep biases of exactly 0, which even
1e-30 moves). A uniform draw misses the one fake with probability (S - n) / (S - 1);
the default ``top-q+uniform`` never does (the jump is the largest update of
its epoch), and the ``progress`` check rejects a proof whose replayed segments
move no parameter bit.

Integrity and the update sizes do not depend on the verifier's seed, so the
50 seeds are drawn through ``challenge.select`` with the sizes a full replay
reports, after one real verification shows that it selects the same segments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import load_manifest, record, run_cli, smoke_config

from experiments import forge
from pol_jax import build, challenge, distances, proof, recorder, sampling, store, verifier

# ------------------------------------------------------------------ typed values


@pytest.mark.parametrize("strategy", challenge.STRATEGIES)
def test_each_typed_challenge_selects_what_its_strategy_name_selects(strategy):
  rng = np.random.default_rng(0)
  sizes = {"l2": rng.random(40), "linf": rng.random(40)}
  epochs = np.repeat(np.arange(4), 10)
  segments = challenge.Segments(40, root="ab" * 32, update_sizes=sizes, epochs=epochs)
  typed = challenge.from_name(strategy, n=6 if strategy != "top-q" else None, seed=11, q=2)
  assert typed.name == strategy and typed.needs_update_sizes == (strategy in ("top-q", challenge.DEFAULT))
  chosen, guarantee = typed.select(segments)
  expected = challenge.select(
    strategy, 40, n=6 if strategy != "top-q" else None, seed=11, root="ab" * 32, update_sizes=sizes, epochs=epochs, q=2
  )
  assert (chosen, guarantee) == expected
  assert chosen == sorted(set(chosen)) and all(0 <= i < 40 for i in chosen)
  if strategy in ("uniform", "fiat-shamir", challenge.DEFAULT):
    assert 39 in chosen and guarantee.strategy == strategy  # the last segment, always
  # Frozen values: a challenge is a setting, not a state.
  with pytest.raises(AttributeError):
    typed.name = "other"


def test_an_unknown_strategy_name_is_refused_naming_the_known_ones():
  with pytest.raises(ValueError, match="Expected strategy in"):
    challenge.from_name("random")


@pytest.mark.parametrize(
  "make, words",
  [
    (lambda: challenge.Uniform(n=0), "Expected n >= 1 for Uniform (the last segment is always replayed), got n=0."),
    (lambda: challenge.FiatShamir(n=0), "Expected n >= 1 for FiatShamir"),
    (lambda: challenge.TopQUniform(n=-1), "Expected n >= 0 for TopQUniform, got n=-1."),
    (lambda: challenge.TopQ(q=0), "Expected q >= 1 for TopQ, got q=0."),
    (lambda: challenge.Uniform(detect=0.0), "Expected 0 < detect <= 1, got detect=0.0."),
    (lambda: challenge.TopQUniform(faked_fraction=1.5), "Expected 0 < faked_fraction <= 1, got faked_fraction=1.5."),
  ],
)
def test_impossible_settings_are_refused_when_made_naming_the_argument(make, words):
  with pytest.raises(ValueError) as e:
    make()
  assert words in str(e.value), str(e.value)


def test_the_default_uniform_part_may_be_empty_and_the_others_accept_their_least_n():
  assert challenge.TopQUniform(n=0).n == 0
  assert challenge.Uniform(n=1).n == challenge.FiatShamir(n=1).n == 1


# ------------------------------------------------------------------ the draws


def test_fiat_shamir_is_a_deterministic_distinct_draw_from_the_root():
  a = challenge.fiat_shamir(50, 8, "ab" * 32)
  assert a == challenge.fiat_shamir(50, 8, "ab" * 32)
  assert len(set(a)) == 8 and all(0 <= i < 50 for i in a)
  assert a != challenge.fiat_shamir(50, 8, "ac" * 32)
  assert challenge.fiat_shamir(5, 99, "00" * 32) == [0, 1, 2, 3, 4]
  counts = np.bincount(sum((challenge.fiat_shamir(10, 1, f"{r:064x}") for r in range(2000)), []), minlength=10)
  assert counts.min() > 140, counts  # roughly uniform: 200 expected per segment


def test_top_q_takes_the_largest_updates_per_epoch_united_over_metrics():
  sizes = {"l2": np.array([1.0, 5.0, 2.0, 9.0, 3.0, 1.0]), "linf": np.array([7.0, 1.0, 1.0, 1.0, 1.0, 8.0])}
  epochs = np.array([0, 0, 0, 1, 1, 1])
  assert challenge.top_q(sizes, epochs, 1) == [0, 1, 3, 5]


# ------------------------------------------------------------------ a sample a prover cannot game: the default against one-segment fakes


SEEDS = range(50)
OLD_N = 8
"""The old default: ``uniform``, 8 segments with the last."""


def _rebuild(proof_dir: str):
  from ml_collections import ConfigDict

  config = ConfigDict(load_manifest(proof_dir)["config"])
  train = build.dataset(config, "train")
  return build.program(config, train), train


@pytest.fixture(scope="module")
def stolen(other_seed, tmp_path_factory):
  """The final state of another run, per model: the model each forger steals."""
  cnn = str(tmp_path_factory.mktemp("stolen") / "proof")
  record(cnn, smoke_config("cnn", seed=1))
  out = {}
  for model, path in (("mlp", other_seed), ("cnn", cnn)):
    program, _ = _rebuild(path)
    out[model] = recorder.final_state(path, program, load_manifest(path))
  return out


# name: (model, config overrides, the checkpoint swapped for the stolen model)
FORGERIES = {
  "splice": ("mlp", dict(k=2, steps=24), 7),
  "frozen": ("cnn", dict(k=1, steps=24, learning_rate=1e-30, schedule="constant"), 12),
}


@pytest.fixture(scope="module")
def forged(tmp_path_factory, stolen):
  out = {}
  for name, (model, overrides, at) in FORGERIES.items():
    config = smoke_config(model, **overrides)
    train = build.dataset(config, "train")
    path = str(tmp_path_factory.mktemp(name) / "proof")
    program = build.program(config, train)
    forge.splice_stolen(path, program, train, build.plan(config), stolen[model], at, config.to_dict())
    out[name] = path
  return out


def _sizes_and_epochs(proof_dir: str, everything: verifier.Verdict):
  """What the verifier's top-q part sees: every segment's recorded update, and its epoch."""
  manifest = load_manifest(proof_dir)
  sizes = {m: np.array([s.update[m] for s in everything.segments]) for m in distances.METRICS}
  per_epoch = sampling.steps_per_epoch(manifest["dataset"]["size"], manifest["batch_size"])
  return sizes, np.array([s.start // per_epoch for s in everything.segments])


@pytest.mark.parametrize("name", list(FORGERIES))
def test_the_default_rejects_a_one_segment_fake_for_every_seed_and_uniform_does_not(forged, name):
  path = forged[name]
  program, train = _rebuild(path)
  everything = verifier.verify(path, program, train, challenge=challenge.All())
  faked = FORGERIES[name][2] - 1
  assert [s.index for s in everything.segments if not s.match] == [faked], everything.table()
  count = everything.num_segments
  sizes, epochs = _sizes_and_epochs(path, everything)
  assert all(sizes[m][faked] == sizes[m].max() for m in distances.METRICS)  # the jump: the largest update

  # One real verification per uniform size: rejected by replay, and challenge.select draws what verify drew.
  for n in (None, 0):
    verdict = verifier.verify(path, program, train, challenge=challenge.TopQUniform(n=n, seed=0))
    assert verdict.strategy == challenge.DEFAULT and verdict.status == "rejected", verdict.table()
    assert verdict.failed[0].name == "replay" and faked in verdict.guarantee.certain, verdict.table()
    chosen, _ = challenge.select(challenge.DEFAULT, count, n=n, seed=0, update_sizes=sizes, epochs=epochs)
    assert [s.index for s in verdict.segments] == chosen
  for seed in SEEDS:
    for n in (None, 0, 1):
      chosen, _ = challenge.select(challenge.DEFAULT, count, n=n, seed=seed, update_sizes=sizes, epochs=epochs)
      assert faked in chosen, (seed, n)

  # The old default, uniform n = 8: misses the fake for some seeds, with the stated probability.
  missed = [s for s in SEEDS if faked not in challenge.select("uniform", count, n=OLD_N, seed=s)[0]]
  assert 0 < len(missed) < len(SEEDS)
  assert challenge.pass_probability(count, OLD_N, {faked}) == pytest.approx((count - OLD_N) / (count - 1))
  old = verifier.verify(path, program, train, challenge=challenge.Uniform(n=OLD_N, seed=missed[0]))
  assert faked not in [s.index for s in old.segments]
  assert old.checks[verifier.CHECKS.index("replay")].passed, old.table()
  if name == "splice":
    assert old.accepted, old.table()  # what the old default said of it
  else:  # only the new progress check rejects it: the replayed tail moves no bit
    assert [c.name for c in old.failed] == ["progress"], old.table()
    assert verifier.verify(
      path, program, train, challenge=challenge.Uniform(n=OLD_N, seed=missed[0]), progress_check=False
    ).accepted


def test_the_frozen_tail_keeps_the_stolen_weights_and_the_progress_check_rejects_it(forged, stolen):
  path = forged["frozen"]
  manifest = load_manifest(path)
  final = store.read_meta(path, manifest["steps"], manifest["checkpoints"][str(manifest["steps"])])["leaves"]
  theirs = proof.leaf_digests(stolen["cnn"])
  assert {p: d for p, d in final.items() if p.startswith("params/")} == {
    p: d for p, d in theirs.items() if p.startswith("params/")
  }
  program, train = _rebuild(path)
  verdict = verifier.verify(path, program, train, challenge=challenge.All())
  progress = verdict.checks[verifier.CHECKS.index("progress")]
  tail = manifest["steps"] - FORGERIES["frozen"][2]  # k = 1: one segment a step after the swap
  assert progress.passed is False, verdict.table()
  assert progress.detail.startswith(f"{tail} of 24 replayed segments moved no parameter bit"), progress.detail
  assert "k or the learning rate is too small for replay to be evidence" in progress.detail


def test_honest_proofs_pass_the_default_and_move_every_segment(honest, other_seed, tmp_path):
  more = str(tmp_path / "proof")  # the splice forgery's config, trained honestly: 12 segments
  config = smoke_config(**FORGERIES["splice"][1])
  train = build.dataset(config, "train")
  recorder.record(more, build.program(config, train), train, build.plan(config), config=config.to_dict())
  for path in (honest, other_seed, more):
    program, train = _rebuild(path)
    verdict = verifier.verify(path, program, train)
    assert verdict.accepted and verdict.strategy == challenge.DEFAULT, verdict.table()
    assert verdict.checks[verifier.CHECKS.index("progress")].passed, verdict.table()
    g = verdict.guarantee
    assert g.catch >= challenge.DETECT and g.faked == challenge.faked_segments(verdict.num_segments, 0.05)
    assert f"a proof with >= {g.faked} faked segment" in verdict.summary()
    assert verdict.to_json()["guarantee"]["statement"] == g.describe()
  # Asked for a uniform part of 2: top-q and the last, 2 more, and the weaker guarantee it gives.
  verdict = verifier.verify(more, program, train, challenge=challenge.TopQUniform(n=2, seed=5))
  g = verdict.guarantee
  assert verdict.accepted and g.drawn == 2 and len(verdict.segments) == len(g.certain) + 2
  assert g.catch == pytest.approx(1 - math.comb(g.population - 1, 2) / math.comb(g.population, 2))
  assert verdict.one_false_segment_passes == pytest.approx((g.population - 2) / g.population)
  assert f"probability >= {math.floor(g.catch * 1000) / 1000:.3f}" in verdict.summary()


@pytest.mark.parametrize("population", [0, 1, 5, 29, 200])
@pytest.mark.parametrize("faked", [1, 2, 10])
@pytest.mark.parametrize("detect", [0.5, 0.9, 0.99, 1.0])
def test_sample_size_is_the_smallest_n_that_detects(population, faked, detect):
  def miss(n):  # exact hypergeometric, independent of the product form
    return math.comb(population - faked, n) / math.comb(population, n) if faked <= population else 0.0

  n = challenge.sample_size(population, faked, detect)
  assert 0 <= n <= population
  assert miss(n) <= 1 - detect + 1e-12 or n == population
  if n > 0:
    assert miss(n - 1) > 1 - detect
  assert challenge.miss_probability(population, n, faked) == pytest.approx(miss(n), abs=1e-12)


def test_the_default_proof_and_large_proofs_get_a_bounded_sample():
  assert challenge.faked_segments(30, 0.05) == 2  # the default config: 660 steps, k = 22
  assert challenge.sample_size(10**6, challenge.faked_segments(10**6, 0.05), 0.99) == 90
  chosen, g = challenge.select("uniform", 10**4, seed=0)
  assert len(chosen) == g.replayed == 91 and g.catch >= 0.99  # the last and 90 others, whatever S
  with pytest.raises(ValueError, match="detect"):
    challenge.sample_size(10, 1, 0.0)
  with pytest.raises(ValueError, match="faked_fraction"):
    challenge.faked_segments(10, 1.5)


def test_the_cli_defaults_to_top_q_uniform_and_sizes_it_from_its_flags(forged, tmp_path):
  import json

  report = tmp_path / "report.json"
  done = run_cli("experiments.verify", f"--proof={forged['splice']}", f"--report={report}")
  assert done.returncode == 1 and done.stdout.startswith("REJECTED by the replay check: segment 6"), done.stdout
  verdict = json.loads(report.read_text())
  assert verdict["strategy"] == challenge.DEFAULT and 6 in verdict["guarantee"]["certain"], verdict["guarantee"]
  # Asked to catch half the segments faked with probability 0.9: the uniform part needs fewer segments.
  done = run_cli(
    "experiments.verify", f"--proof={forged['splice']}", "--faked_fraction=0.5", "--detect=0.9", f"--report={report}"
  )
  g = json.loads(report.read_text())["guarantee"]
  assert done.returncode == 1 and g["faked"] == 6 and g["detect"] == 0.9 and g["catch"] >= 0.9, g
  assert g["drawn"] == challenge.sample_size(12 - len(g["certain"]), 6, 0.9) < 12 - len(g["certain"]), g
