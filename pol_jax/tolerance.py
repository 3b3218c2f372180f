"""The tolerance mode's acceptance rule: a delta per metric, where it came from, and its calibration.

Exact replay accepts on equal digests. The tolerance mode (a vmapped replay,
or any replay on an environment other than the prover's) accepts a segment
when, for every metric, its distance to the recorded state is at most delta.
Distances are normalised as the paper's analysis does: l1, l2 and linf are
divided by the same metric of the segment's recorded update (so 1.0 means
"as far off as the whole claimed update"); cosine distance is used as it is.
A delta is only as good as its calibration: :func:`calibrate` measures the
honest reproduction noise of the vmapped replay against exact replay, and
proposes delta as that noise times a stated margin, never below a floor.

Any delta > 0 leaves slack that spoofing attacks live in (see DESIGN.md);
the verdict always says which mode decided and which delta it used.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

from pol_jax import challenge, distances, fingerprint, replay, training, verifier
from pol_jax import data as data_lib

# The smallest delta a calibration proposes: float32 rounding in one segment
# can move a replay by this much relative to its update even where the
# calibration sample happened to reproduce exactly.
FLOOR = {"l1": 1e-5, "l2": 1e-5, "linf": 1e-5, "cosine": 1e-9}

HONEST_RANGE = {"l1": 0.2, "l2": 0.3, "linf": 0.5}
"""Normalised distances beyond which no honest replay was measured, with a margin: a segment
replayed farther than this from its recorded end is rejected. Measured (``experiments.calibrate``
on every segment of 20 honest proofs: the default BatchNorm CNN and the MLP, seeds 0-9, 660 steps,
k = 22, jax 0.10.2, 2-core CPU): the vmapped replay's worst normalised distance over 600 segments
was l1 0.022, l2 0.034, linf 0.052 (medians 1e-6 to 4e-6: the noise is heavy-tailed), and each
bound here is about 10x that. Between delta and this range a segment is undecided: exact replay,
where the environment allows it, decides; cosine distance, not normalised by the update, never
rejects on its own."""


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """A delta per metric, the range beyond which a distance rejects, and their source.

  A segment is within (accepted) when every metric is at most its delta;
  rejected when a metric of ``reject`` exceeds its bound; otherwise undecided.
  The default ``reject`` is :data:`HONEST_RANGE` (never below delta), so a
  distance inside the range honest replays were measured to reach is never
  a rejection. The paper's verifier rejects at delta (``reject=delta``).
  ``replay.Tolerance(delta=...)`` takes one.
  """

  delta: dict[str, float]
  normalised: bool = True
  source: str = "given"
  reject: dict[str, float] | None = None

  def __post_init__(self):
    for name, values in (("delta", self.delta), ("reject", self.reject)):
      if values is None and name == "reject":
        continue
      unknown = set(values) - set(distances.METRICS)
      if unknown or not values:
        raise ValueError(f"Expected {name} for metrics among {distances.METRICS}, got {sorted(values)}.")
      bad = {m: d for m, d in values.items() if not (isinstance(d, int | float) and d >= 0 and math.isfinite(d))}
      if bad:
        raise ValueError(f"Expected finite {name} >= 0, got {bad}.")

  @property
  def bounds(self) -> dict[str, float]:
    """The distances beyond which a segment is rejected."""
    if self.reject is not None:
      return dict(self.reject)
    return {m: max(bound, self.delta.get(m, 0.0)) for m, bound in HONEST_RANGE.items()}

  def judge(self, distance: dict[str, float], update: dict[str, float]) -> bool | None:
    """True within delta; False beyond a rejection bound; None (undecided) between."""
    if self.within(distance, update):
      return True
    measured = self.measure(distance, update)
    if any(not measured[m] <= bound for m, bound in self.bounds.items()):  # NaN rejects too
      return False
    return None

  def measure(self, distance: dict[str, float], update: dict[str, float]) -> dict[str, float]:
    """The distances this tolerance compares with delta."""
    return normalise(distance, update) if self.normalised else dict(distance)

  def within(self, distance: dict[str, float], update: dict[str, float]) -> bool:
    measured = self.measure(distance, update)
    return all(measured[m] <= d for m, d in self.delta.items())

  def describe(self) -> str:
    kind = "normalised" if self.normalised else "raw"
    values = ", ".join(f"{m}<={d:.3g}" for m, d in self.delta.items())
    return f"{kind} distances {values} ({self.source})"

  def describe_bounds(self) -> str:
    return ", ".join(f"{m}>{d:.3g}" for m, d in self.bounds.items())

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def normalise(distance: dict[str, float], update: dict[str, float]) -> dict[str, float]:
  """l1, l2, linf divided by the recorded update's; cosine unchanged."""
  out = {}
  for m in distances.METRICS:
    if m == "cosine":
      out[m] = distance[m]
    elif update[m] > 0:
      out[m] = distance[m] / update[m]
    else:
      out[m] = 0.0 if distance[m] == 0 else math.inf
  return out


def parse(text: str, source: str | None = None) -> Thresholds:
  """``"l2=1e-4,linf=1e-3"`` -> normalised Thresholds, their ``source`` (default: the text) reported in the verdict.

  >>> parse("l2=1e-4,linf=1e-3").delta
  {'l2': 0.0001, 'linf': 0.001}
  """
  delta = {}
  for item in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = item.partition("=")
    try:
      delta[name.strip()] = float(value)
    except ValueError:
      raise ValueError(f"{item!r} is not METRIC=NUMBER") from None
  return Thresholds(delta, normalised=True, source=f"given as {text!r}" if source is None else source)


def propose(noise: dict[str, float], margin: float) -> dict[str, float]:
  """delta = max(noise x margin, FLOOR) per metric."""
  return {m: max(noise[m] * margin, FLOOR[m]) for m in distances.METRICS}


def load(path: str) -> Thresholds:
  """The Thresholds a calibration file proposes.

  Raises:
    ValueError: the file is unreadable or malformed, naming the field.
  """
  try:
    with open(path) as f:
      record = json.load(f)
    delta = record["delta"]
    margin = record["margin"]
    count = len(record["segments"]) if isinstance(record["segments"], list) else None
    root = record["proof_root"]
  except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON, an integer of too many digits
    raise ValueError(f"{path}: unreadable calibration ({type(e).__name__}: {str(e)[:120]})") from None
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: field {e}: missing from the calibration") from None
  if count is None:
    raise ValueError(f"{path}: segments: expected a list")
  if not isinstance(delta, dict) or sorted(delta) != sorted(distances.METRICS):
    raise ValueError(f"{path}: delta: expected an object with a bound for each of {', '.join(distances.METRICS)}")
  reject = record.get("reject")
  if reject is not None and not isinstance(reject, dict):
    raise ValueError(f"{path}: reject: expected an object")
  for name, values in (("delta", delta), ("reject", reject or {})):
    bad = [m for m, v in values.items() if isinstance(v, bool) or not isinstance(v, int | float)]
    if bad:
      raise ValueError(f"{path}: {name}.{bad[0]}: expected a number, got {values[bad[0]]!r:.40}")
  try:
    return Thresholds(
      {m: float(v) for m, v in delta.items()},
      normalised=True,
      source=f"calibrated in {path}: {margin!r:.20}x the honest noise of {count} segments of proof {str(root)[:16]}...",
      reject=None if reject is None else {m: float(v) for m, v in reject.items()},
    )
  except (TypeError, ValueError, OverflowError) as e:
    raise ValueError(f"{path}: delta: {e}") from None


def calibrate(
  proof_dir: str,
  program: training.Program,
  dataset: data_lib.Dataset,
  *,
  num_segments: int | None = None,
  margin: float = 10.0,
  chunk: int = 16,
  devices: int | None = None,
  on_segment: Callable[[replay.SegmentResult], None] | None = None,
) -> dict:
  """Measures the tolerance mode's honest noise on a proof and proposes delta.

  The proof must first verify exactly on every segment (or on
  ``num_segments`` Fiat-Shamir segments), so its recorded states are what
  exact replay computes here; the same segments are then replayed with
  ``jit(vmap(...))`` (``chunk`` at a time, on ``devices``), and the noise per
  metric is the largest normalised distance to the recorded state. The
  proposed delta is ``max(noise x margin, FLOOR)``. The noise is heavy-tailed
  (one segment of 30 can sit four orders of magnitude above the median), so
  no delta from one proof bounds another's: a distance above delta but inside
  :data:`HONEST_RANGE` is undecided, never rejected.

  Returns:
    A JSON-serialisable record: the proof root, the noise, the margin, the
    proposed delta and every segment's distances (:func:`load` reads it).

  Raises:
    ValueError: the proof does not verify exactly here.
  """
  which = challenge.All() if num_segments is None else challenge.FiatShamir(num_segments)
  exact = verifier.verify(proof_dir, program, dataset, challenge=which, replay=replay.Exact(devices))
  if not exact.accepted:
    raise ValueError(f"calibrate on a proof that verifies exactly here; this one: {exact.summary()}")
  loose = Thresholds({m: 1e300 for m in distances.METRICS}, source="calibration")
  noisy = verifier.verify(
    proof_dir, program, dataset, challenge=which, replay=replay.Tolerance(loose, chunk, devices), on_segment=on_segment
  )
  noise = {m: max(s.normalised[m] for s in noisy.segments) for m in distances.METRICS}
  return {
    "proof_root": exact.root,
    "margin": margin,
    "noise": noise,
    "delta": propose(noise, margin),
    "floor": FLOOR,
    "reject": HONEST_RANGE,
    "normalised": True,
    "chunk": chunk,
    "environment": fingerprint.environment(),
    "segments": [
      {"index": s.index, "start": s.start, "end": s.end, "bitwise": s.match, "normalised": s.normalised}
      for s in noisy.segments
    ],
  }
