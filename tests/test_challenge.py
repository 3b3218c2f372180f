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
