"""pol_jax.challenge: the strategies as typed values select what the strategy names select."""

from __future__ import annotations

import numpy as np
import pytest

from pol_jax import challenge


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
