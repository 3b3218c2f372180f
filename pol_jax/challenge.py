"""Which segments a verifier replays.

``all`` replays every segment. ``uniform`` draws n segments from a verifier's
seed, drawn after the prover handed the proof over (interactive): the prover
cannot know where the verifier will look. ``fiat-shamir`` draws them from the
proof's root digest, so anyone can repeat the check without the verifier
(non-interactive), but a forger can re-roll the draw at the cost of resealing:
change any recorded byte of a faked proof, get a new root and a new draw, until
the draw misses the faked segments. With m faked segments of S, each try
passes with :func:`pass_probability`; Fiat-Shamir therefore needs n large
enough that ``tries * pass_probability`` is small, whereas for ``uniform`` one
try is all the forger gets. ``top-q`` is the paper's: per
epoch and per metric, the Q segments with the largest recorded update, united
over the metrics; a prover knows in advance which segments it selects, which is
what the blindfold attack exploits, so it is never our only check.

``uniform`` and ``fiat-shamir`` always include the last segment
(:func:`including_last`): it ends on the model the proof is about, so a proof
whose last checkpoint was swapped for another model (a stolen one) is caught
whatever the draw; the other n - 1 segments are drawn from the rest.

``top-q+uniform`` (:data:`DEFAULT`) is the union of the three: top-q, the last
segment, and n of the other segments drawn from the verifier's seed. Alone, a
uniform draw is blind to where a forger put its fake: a proof that is honest
but for one segment that jumps to a stolen model passes a draw of n of S with
probability (S - n) / (S - 1), which a prover makes as large as it likes by
choosing a small k. That jump is the largest update of its epoch, so top-q
replays it whatever the draw. A fake top-q misses moves the weights by no more
than the largest honest update of its epoch (which top-q replays), so to get
far from honest training a forger must fake many segments, and the uniform
part catches a proof with m faked segments with the probability
:meth:`Guarantee.catch_probability` states; :func:`sample_size` sizes n from S
for a stated detection probability of a stated fraction of faked segments.
"""

from __future__ import annotations

import dataclasses
import fractions
import hashlib
import math

import numpy as np

DEFAULT = "top-q+uniform"
"""The default strategy: top-q, the last segment and a uniform draw."""
STRATEGIES = (DEFAULT, "fiat-shamir", "uniform", "top-q", "all")

DETECT = 0.99
"""Default detection probability the uniform part is sized for."""
FAKED_FRACTION = 0.05
"""Default fraction of faked segments it must detect. A fake that top-q does
not replay moves the weights no further than the largest honest update of its
epoch, so a forger who fakes fewer than 5% of the segments did more than 95%
of the honest work, and its fakes moved the weights by at most 0.05 S honest
updates. With 0.99 the uniform part then needs at most 90 segments, whatever
S (``ln 0.01 / ln 0.95``): the cost of verifying stays bounded as proofs
grow; small proofs (S <= 20: m = 1) replay nearly every segment."""


def all_segments(num_segments: int) -> list[int]:
  return list(range(num_segments))


def uniform(num_segments: int, n: int, seed: int) -> list[int]:
  """``min(n, num_segments)`` distinct segments drawn from the verifier's ``seed``."""
  rng = np.random.default_rng(seed)
  return sorted(int(i) for i in rng.choice(num_segments, size=min(n, num_segments), replace=False))


def fiat_shamir(num_segments: int, n: int, root: str) -> list[int]:
  """``min(n, num_segments)`` distinct segments drawn from the proof root.

  Draws 64-bit values ``SHA-256(root || counter)`` and rejects those above the
  largest multiple of ``num_segments``, so every segment is equally likely.

  >>> fiat_shamir(10, 3, "00" * 32) == fiat_shamir(10, 3, "00" * 32)
  True
  """
  n = min(n, num_segments)
  limit = (2**64 // num_segments) * num_segments
  chosen: set[int] = set()
  counter = 0
  while len(chosen) < n:
    value = int.from_bytes(hashlib.sha256(f"pol-jax/challenge/v1:{root}:{counter}".encode()).digest()[:8], "big")
    counter += 1
    if value < limit:
      chosen.add(value % num_segments)
  return sorted(chosen)


def including_last(num_segments: int, n: int, draw) -> list[int]:
  """The last segment and ``n - 1`` others chosen by ``draw(num_others, n - 1)``.

  >>> including_last(10, 3, lambda count, m: list(range(m)))
  [0, 1, 9]
  >>> including_last(1, 8, lambda count, m: list(range(m)))
  [0]
  """
  if n < 1:
    return []
  others = draw(num_segments - 1, n - 1) if num_segments > 1 and n > 1 else []
  return sorted({*others, num_segments - 1})


def pass_probability(num_segments: int, n: int, false_segments) -> float:
  """The probability that an :func:`including_last` draw of n misses every false segment.

  That is, that a proof whose ``false_segments`` do not replay is accepted by
  a draw of ``n`` of ``num_segments`` segments that always includes the last:
  0 if the last is false, else ``C(S-1-m, n-1) / C(S-1, n-1)`` for the m false
  others.

  >>> pass_probability(30, 8, {29})
  0.0
  >>> round(pass_probability(30, 8, {14, 15}), 3)
  0.569
  >>> pass_probability(30, 8, set())
  1.0
  """
  import math

  false_segments = set(false_segments)
  if not false_segments:
    return 1.0
  if num_segments - 1 in false_segments or n >= num_segments:
    return 0.0
  others, draws, m = num_segments - 1, max(0, n - 1), len(false_segments)
  return math.comb(others - m, draws) / math.comb(others, draws)


def top_q(update_sizes: dict[str, np.ndarray], epochs: np.ndarray, q: int) -> list[int]:
  """Per epoch, the ``q`` segments with the largest update under any metric.

  Args:
    update_sizes: ``{metric: [num_segments]}`` distance between the recorded
      states at each segment's start and end.
    epochs: ``[num_segments]`` the epoch each segment starts in.
    q: segments per epoch and metric.
  """
  chosen: set[int] = set()
  epochs = np.asarray(epochs)
  for sizes in update_sizes.values():
    sizes = np.asarray(sizes)
    for epoch in np.unique(epochs):
      members = np.flatnonzero(epochs == epoch)
      order = members[np.argsort(-sizes[members], kind="stable")]
      chosen.update(int(i) for i in order[:q])
  return sorted(chosen)


def faked_segments(num_segments: int, faked_fraction: float) -> int:
  """m = ``ceil(faked_fraction * num_segments)``, at least 1 (computed exactly).

  >>> faked_segments(30, 0.05), faked_segments(20, 0.05), faked_segments(1000, 0.05)
  (2, 1, 50)
  """
  if not 0 < faked_fraction <= 1:
    raise ValueError(f"Expected 0 < faked_fraction <= 1, got faked_fraction={faked_fraction}.")
  return max(1, math.ceil(fractions.Fraction(str(faked_fraction)) * num_segments))


def miss_probability(population: int, drawn: int, faked: int) -> float:
  """``C(population - faked, drawn) / C(population, drawn)``: a uniform draw misses every faked one.

  The chance that ``drawn`` distinct segments, drawn uniformly from
  ``population``, include none of ``faked`` of them (0 when they cannot all
  be missed).

  >>> miss_probability(10, 3, 1)
  0.7
  >>> miss_probability(10, 9, 2)
  0.0
  """
  if faked > population - drawn:
    return 0.0
  miss = 1.0
  for i in range(drawn):  # the product form: no huge binomials for large proofs
    miss *= (population - faked - i) / (population - i)
  return miss


def sample_size(population: int, faked: int, detect: float) -> int:
  """The smallest n such that n drawn of ``population`` hit one of ``faked`` with probability >= ``detect``.

  Hypergeometric: the smallest n with ``C(population - faked, n) /
  C(population, n) <= 1 - detect`` (:func:`miss_probability`); ``population``
  when even that is not enough, 0 when there is nothing to draw from.

  >>> sample_size(1000, 50, 0.99)  # 5% of 1000 segments faked
  86
  >>> sample_size(10**6, 50_000, 0.99)  # about ln(0.01) / ln(0.95), whatever S
  90
  >>> sample_size(29, 2, 0.99)  # two of 29 faked: nearly all of them
  26
  >>> sample_size(0, 1, 0.99)
  0
  """
  if not 0 < detect <= 1:
    raise ValueError(f"Expected 0 < detect <= 1, got detect={detect}.")
  limit = (1 - detect) * (1 + 1e-12)  # the product's rounding must not cost a segment
  miss = 1.0
  for n in range(population):
    if miss <= limit or faked > population - n:
      return n
    miss *= (population - faked - n) / (population - n)
  return population


@dataclasses.dataclass(frozen=True)
class Guarantee:
  """What a challenge with a uniform part shows about the segments it did not replay.

  Segments in :attr:`certain` are replayed whatever the draw; :attr:`drawn`
  others are drawn uniformly from the remaining :attr:`population`. A proof
  with at least :attr:`faked` segments that do not replay is caught with
  probability at least :attr:`catch` (if one is certain, always; else the
  draw must hit one of them).

  >>> g = Guarantee(strategy="uniform", segments=30, certain=(29,), drawn=7, faked=2)
  >>> round(g.catch, 3), round(g.catch_probability({3}), 3), g.catch_probability({29})
  (0.431, 0.241, 1.0)
  """

  strategy: str
  segments: int
  """S, the segments of the proof."""
  certain: tuple[int, ...]
  """Replayed whatever the draw: top-q and the last (``top-q+uniform``), the last (``uniform``, ``fiat-shamir``)."""
  drawn: int
  """n, drawn uniformly from the other segments."""
  faked: int
  """m: the guarantee is for proofs with at least this many faked segments."""
  detect: float | None = None
  """The probability n was sized for (None: n was given)."""

  @property
  def population(self) -> int:
    return self.segments - len(self.certain)

  @property
  def replayed(self) -> int:
    return len(self.certain) + self.drawn

  @property
  def catch(self) -> float:
    """The least probability that a proof with >= :attr:`faked` faked segments is caught."""
    return 1.0 - miss_probability(self.population, self.drawn, self.faked)

  def catch_probability(self, false_segments) -> float:
    """The probability that a draw like this one catches a proof whose ``false_segments`` do not replay."""
    false_segments = set(false_segments)
    if not false_segments:
      return 0.0
    if false_segments & set(self.certain):
      return 1.0
    return 1.0 - miss_probability(self.population, self.drawn, len(false_segments))

  def composition(self) -> str:
    """Which segments were replayed: ``"the last, and 7 of the other 29 drawn uniformly"``."""
    how = f"{len(self.certain)} by top-q and the last" if self.strategy == DEFAULT else "the last"
    if self.drawn >= self.population > 0:
      return how + ", and every other one"
    if self.population and self.drawn:
      return how + f", and {self.drawn} of the other {self.population} drawn uniformly"
    if self.population:
      return how + f", none of the other {self.population}"
    return how

  def statement(self) -> str:
    """What it guarantees, rounded down: ``"a proof with >= 2 faked segments is caught with probability >= 0.431"``."""
    p = self.catch
    if p <= 0.0:
      return f"a proof whose faked segments are all among the other {self.population} is not caught"
    line = f"a proof with >= {self.faked} faked segment{'s' if self.faked > 1 else ''} is caught " + (
      "with certainty" if p >= 1.0 else f"with probability >= {math.floor(p * 1000) / 1000:.3f}"
    )
    if self.strategy == "fiat-shamir" and p < 1.0:
      line += " per draw, and a forger can re-roll a Fiat-Shamir draw by resealing"
    return line

  def describe(self) -> str:
    """One line: what was replayed, and what it guarantees.

    >>> print(Guarantee("uniform", 30, (29,), 7, 2).describe())
    8 of 30 segments (the last, and 7 of the other 29 drawn uniformly): a proof with >= 2 faked segments is caught with probability >= 0.431
    """
    return f"{self.replayed} of {self.segments} segments ({self.composition()}): {self.statement()}"


def top_q_uniform(
  update_sizes: dict[str, np.ndarray], epochs: np.ndarray, q: int, n: int, seed: int
) -> tuple[list[int], list[int]]:
  """``top-q+uniform``: top-q, the last segment, and ``n`` of the others from ``seed``.

  Returns:
    ``(chosen, certain)``: every chosen segment, and those chosen whatever
    the seed (top-q and the last).

  >>> sizes = {"l2": np.array([1.0, 9.0, 2.0, 3.0, 1.0, 1.0])}
  >>> top_q_uniform(sizes, np.zeros(6), 1, 0, 0)
  ([1, 5], [1, 5])
  >>> chosen, certain = top_q_uniform(sizes, np.zeros(6), 1, 2, 7)
  >>> len(chosen), set(certain) < set(chosen)
  (4, True)
  """
  count = len(np.asarray(epochs))
  certain = sorted({*top_q(update_sizes, epochs, q), count - 1})
  others = [i for i in range(count) if i not in set(certain)]
  drawn = [others[i] for i in uniform(len(others), n, seed)]
  return sorted({*certain, *drawn}), certain


def select(
  strategy: str,
  num_segments: int,
  *,
  n: int | None = None,
  seed: int | None = None,
  root: str | None = None,
  update_sizes: dict[str, np.ndarray] | None = None,
  epochs: np.ndarray | None = None,
  q: int = 1,
  detect: float = DETECT,
  faked_fraction: float = FAKED_FRACTION,
) -> tuple[list[int], Guarantee | None]:
  """The segments ``strategy`` replays, and what replaying them guarantees.

  Args:
    strategy: one of :data:`STRATEGIES`.
    num_segments: S, the segments of the proof.
    n: the uniform part: for ``uniform`` and ``fiat-shamir`` the segments
      replayed, the last included; for ``top-q+uniform`` those drawn beyond
      top-q and the last. None: sized by :func:`sample_size`, so that a proof
      with ``faked_segments(S, faked_fraction)`` faked segments is caught with
      probability at least ``detect``.
    seed: the verifier's seed (``uniform``, ``top-q+uniform``).
    root: the proof's root (``fiat-shamir``).
    update_sizes: ``{metric: [S]}`` recorded update sizes (``top-q``,
      ``top-q+uniform``).
    epochs: ``[S]`` the epoch each segment starts in (``top-q``, ``top-q+uniform``).
    q: segments per epoch and metric, for the top-q part.
    detect: the detection probability n is sized for.
    faked_fraction: the fraction of faked segments it is sized to detect.

  Returns:
    ``(chosen, guarantee)``; the guarantee is None for ``top-q`` (the prover
    knows which segments it replays) and ``all`` (every segment is replayed).

  >>> select("uniform", 30, n=8, seed=1)[1].describe()[:69]
  '8 of 30 segments (the last, and 7 of the other 29 drawn uniformly): a'
  >>> chosen, g = select("uniform", 30, seed=1)  # sized: two faked of 30, caught w.p. >= 0.99
  >>> len(chosen), g.catch >= 0.99
  (27, True)
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"Expected strategy in {STRATEGIES}, got {strategy!r}.")
  if n is not None and n < 1 and strategy in ("uniform", "fiat-shamir"):
    raise ValueError(f"Expected n >= 1 for {strategy!r} (the last segment is always replayed), got n={n}.")
  if n is not None and n < 0:
    raise ValueError(f"Expected n >= 0, got n={n}.")
  if strategy == "all":
    return all_segments(num_segments), None
  if strategy in ("top-q", DEFAULT) and (update_sizes is None or epochs is None):
    raise ValueError(f"Strategy {strategy!r} needs update_sizes and epochs.")
  if strategy == "top-q":
    return top_q(update_sizes, epochs, q), None
  faked = faked_segments(num_segments, faked_fraction)
  if strategy == DEFAULT:
    certain = sorted({*top_q(update_sizes, epochs, q), num_segments - 1})
    population = num_segments - len(certain)
    draws = sample_size(population, faked, detect) if n is None else min(n, population)
    chosen, certain = top_q_uniform(update_sizes, epochs, q, draws, seed)
  else:
    population = num_segments - 1
    draws = sample_size(population, faked, detect) if n is None else min(n - 1, population)
    draw = (lambda c, m: uniform(c, m, seed)) if strategy == "uniform" else (lambda c, m: fiat_shamir(c, m, root))
    chosen, certain = including_last(num_segments, draws + 1, draw), [num_segments - 1]
  guarantee = Guarantee(strategy, num_segments, tuple(certain), draws, faked, detect if n is None else None)
  return chosen, guarantee


# The strategies as typed values: each a frozen dataclass with one method,
# ``select(segments)``, over what a verifier knows of the proof's segments.
# Each refuses impossible settings when it is made, naming the argument.


def _check_settings(challenge, least_n: int) -> None:
  name = type(challenge).__name__
  if getattr(challenge, "q", 1) < 1:
    raise ValueError(f"Expected q >= 1 for {name}, got q={challenge.q}.")
  n = getattr(challenge, "n", None)
  if n is not None and n < least_n:
    why = " (the last segment is always replayed)" if least_n else ""
    raise ValueError(f"Expected n >= {least_n} for {name}{why}, got n={n}.")
  if not 0 < getattr(challenge, "detect", DETECT) <= 1:
    raise ValueError(f"Expected 0 < detect <= 1, got detect={challenge.detect}.")
  if not 0 < getattr(challenge, "faked_fraction", FAKED_FRACTION) <= 1:
    raise ValueError(f"Expected 0 < faked_fraction <= 1, got faked_fraction={challenge.faked_fraction}.")


@dataclasses.dataclass(frozen=True)
class Segments:
  """What a challenge chooses from: the proof's segments and what is recorded of them.

  ``update_sizes`` (``{metric: [S]}``) and ``epochs`` (``[S]``, the epoch each
  segment starts in) are needed by the top-q strategies only; ``root`` (the
  proof's root digest) by Fiat-Shamir only.
  """

  count: int
  root: str | None = None
  update_sizes: dict[str, np.ndarray] | None = None
  epochs: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class All:
  """Replay every segment."""

  name = "all"
  needs_update_sizes = False

  def select(self, segments: Segments) -> tuple[list[int], Guarantee | None]:
    return select(self.name, segments.count)


@dataclasses.dataclass(frozen=True)
class TopQ:
  """The paper's: per epoch and metric, the ``q`` segments with the largest recorded update."""

  q: int = 1
  name = "top-q"
  needs_update_sizes = True

  def __post_init__(self):
    _check_settings(self, 0)

  def select(self, segments: Segments) -> tuple[list[int], Guarantee | None]:
    return select(self.name, segments.count, update_sizes=segments.update_sizes, epochs=segments.epochs, q=self.q)


@dataclasses.dataclass(frozen=True)
class Uniform:
  """``n`` segments (the last included) drawn from the verifier's ``seed``; n None: sized for ``detect``."""

  n: int | None = None
  seed: int | None = None
  detect: float = DETECT
  faked_fraction: float = FAKED_FRACTION
  name = "uniform"
  needs_update_sizes = False

  def __post_init__(self):
    _check_settings(self, 1)

  def select(self, segments: Segments) -> tuple[list[int], Guarantee | None]:
    return select(
      self.name, segments.count, n=self.n, seed=self.seed, detect=self.detect, faked_fraction=self.faked_fraction
    )


@dataclasses.dataclass(frozen=True)
class FiatShamir:
  """``n`` segments (the last included) drawn from the proof's root: repeatable by anyone, re-rollable by a forger."""

  n: int | None = None
  detect: float = DETECT
  faked_fraction: float = FAKED_FRACTION
  name = "fiat-shamir"
  needs_update_sizes = False

  def __post_init__(self):
    _check_settings(self, 1)

  def select(self, segments: Segments) -> tuple[list[int], Guarantee | None]:
    return select(
      self.name, segments.count, n=self.n, root=segments.root, detect=self.detect, faked_fraction=self.faked_fraction
    )


@dataclasses.dataclass(frozen=True)
class TopQUniform:
  """The default: top-q, the last segment, and ``n`` others from the verifier's ``seed`` (None: sized)."""

  q: int = 1
  n: int | None = None
  seed: int | None = None
  detect: float = DETECT
  faked_fraction: float = FAKED_FRACTION
  name = DEFAULT
  needs_update_sizes = True

  def __post_init__(self):
    _check_settings(self, 0)

  def select(self, segments: Segments) -> tuple[list[int], Guarantee | None]:
    return select(
      self.name,
      segments.count,
      n=self.n,
      seed=self.seed,
      update_sizes=segments.update_sizes,
      epochs=segments.epochs,
      q=self.q,
      detect=self.detect,
      faked_fraction=self.faked_fraction,
    )


Challenge = All | TopQ | Uniform | FiatShamir | TopQUniform
"""Any of the strategies, as a value."""


def from_name(
  strategy: str,
  *,
  n: int | None = None,
  seed: int | None = None,
  q: int = 1,
  detect: float = DETECT,
  faked_fraction: float = FAKED_FRACTION,
) -> Challenge:
  """The typed challenge a strategy name and its settings describe (the CLI's ``--strategy``).

  >>> from_name("uniform", n=8, seed=3)
  Uniform(n=8, seed=3, detect=0.99, faked_fraction=0.05)
  """
  if strategy == "all":
    return All()
  if strategy == "top-q":
    return TopQ(q)
  if strategy == "uniform":
    return Uniform(n, seed, detect, faked_fraction)
  if strategy == "fiat-shamir":
    return FiatShamir(n, detect, faked_fraction)
  if strategy == DEFAULT:
    return TopQUniform(q, n, seed, detect, faked_fraction)
  raise ValueError(f"Expected strategy in {STRATEGIES}, got {strategy!r}.")
