"""The reproduction experiment: update size against reproduction error, against k, and cost against n."""

from __future__ import annotations

import json

from conftest import smoke_config

from experiments import reproduce
from pol_jax import challenge, verifier


def test_reproduce_measures_every_segment_of_every_k(tmp_path):
  config = smoke_config("cnn")
  result = reproduce.run(config, str(tmp_path), ks=[2, 4], counts=(1, 2))
  assert list(result["per_k"]) == ["2", "4"]
  for k, expected_segments in (("2", 6), ("4", 3)):
    rows = result["per_k"][k]["segments"]
    assert len(rows) == expected_segments
    assert [(r["start"], r["end"]) for r in rows] == [(i * int(k), (i + 1) * int(k)) for i in range(expected_segments)]
    assert all(r["exact_bitwise"] and r["exact_error"]["l2"] == 0.0 for r in rows)
    assert all(r["update"]["l2"] > 0 for r in rows)
    # The vmapped replay is close, and its error is far below the update it reproduces.
    assert all(0.0 <= r["vmapped_error"]["l2"] < 1e-3 * r["update"]["l2"] for r in rows), rows
  # A longer interval makes bigger updates.
  assert result["per_k"]["4"]["summary"]["median_update_l2"] > result["per_k"]["2"]["summary"]["median_update_l2"]
  cost = result["cost"]
  assert [(p["segments"], p["integrity"]) for p in cost["points"]] == [
    (n, i) for n in (1, 2, 3) for i in ("full", "sampled")
  ]
  assert all(p["accepted"] and p["seconds"] > 0 for p in cost["points"])
  # Each recorded proof is an ordinary proof that verifies.
  program, train = reproduce.build.rebuild(result["per_k"]["2"]["proof"])
  assert verifier.verify(result["per_k"]["2"]["proof"], program, train, challenge=challenge.All()).accepted
  json.dumps(result)
  reproduce.plot(result, str(tmp_path / "figure.png"))
  with open(tmp_path / "figure.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "exact err" in reproduce.table(result)
