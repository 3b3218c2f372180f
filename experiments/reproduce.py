"""The paper's reproduction analysis for a config: ``python -m experiments.reproduce``.

  python -m experiments.reproduce [--config=experiments/configs/default.py] \\
      [--workdir=runs/reproduce] [--ks=11,22,44] [--counts=1,2,4,8,16]

For each checkpoint interval k in ``--ks`` it records a proof of the config's
run (same seed, data and steps) and replays every segment twice: exactly (the
prover's compiled segment; the reproduction error must be zero) and with the
vmapped tolerance replay (``jit(vmap(...))``, whose error is measured). Per
segment it reports the size of the recorded update ``||W_end - W_start||``
against the reproduction error ``||W_replayed - W_end||`` (l2 and linf over the
parameters), how both move with k, and, for the config's own k, the cost of
exact verification against the number of segments replayed (Fiat-Shamir n,
with full and with sampled integrity checks) next to the cost of training.

It writes ``reproduce.json`` (every number) and ``reproduce.png`` (the three
panels) to ``--workdir`` and prints the tables. Every proof it records stays
in ``--workdir/k<k>/proof`` and verifies with ``experiments.verify``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags, logging
from tqdm import tqdm

from experiments import cli
from pol_jax import build, challenge, fingerprint, proof, recorder, replay, tolerance, verifier

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")


def _ints(values, field: str) -> list[int]:
  try:
    out = sorted({int(v) for v in values})
  except ValueError:
    raise cli.UsageError(f"{field}: expected comma-separated integers, got {','.join(values)!r}") from None
  if not out or out[0] < 1:
    raise cli.UsageError(f"{field}: expected positive integers, got {','.join(values)!r}")
  return out


def measure(proof_dir: str, program, train, chunk: int = 16) -> list[dict]:
  """Replays every segment of an honest proof exactly and vmapped; one row per segment.

  Each row has the segment's ``start`` and ``end``, the recorded ``update``,
  and the ``exact_error`` and ``vmapped_error`` (l1, l2, linf, cosine over the
  parameters) with whether each replay was bit for bit.

  Raises:
    RuntimeError: the proof does not verify exactly here (a bug to report:
      an honest proof replayed in the prover's environment must).
  """
  exact = verifier.verify(proof_dir, program, train, challenge=challenge.All())
  if not exact.accepted:
    raise RuntimeError(f"the honest proof {proof_dir} did not verify exactly: {exact.summary()}")
  loose = tolerance.Thresholds({"l2": 1e300}, source="reproduce: measurement only")
  vmapped = verifier.verify(proof_dir, program, train, challenge=challenge.All(), replay=replay.Tolerance(loose, chunk))
  rows = []
  for e, v in zip(exact.segments, vmapped.segments, strict=True):
    rows.append(
      {
        "start": e.start,
        "end": e.end,
        "update": e.update,
        "exact_bitwise": e.match,
        "exact_error": e.distance,
        "vmapped_bitwise": v.match,
        "vmapped_error": v.distance,
        "vmapped_error_normalised": v.normalised,
      }
    )
  return rows


def _summary(rows: list[dict]) -> dict:
  def med(key, metric):
    return statistics.median(r[key][metric] for r in rows)

  return {
    "segments": len(rows),
    "median_update_l2": med("update", "l2"),
    "max_exact_error_l2": max(r["exact_error"]["l2"] for r in rows),
    "exact_bitwise": sum(r["exact_bitwise"] for r in rows),
    "median_vmapped_error_l2": med("vmapped_error", "l2"),
    "max_vmapped_error_l2": max(r["vmapped_error"]["l2"] for r in rows),
    "max_vmapped_error_normalised_l2": max(r["vmapped_error_normalised"]["l2"] for r in rows),
    "vmapped_bitwise": sum(r["vmapped_bitwise"] for r in rows),
  }


def run(config, workdir: str, ks: list[int] | None = None, counts=(1, 2, 4, 8, 16), chunk: int = 16, progress=False):
  """Records a proof per k and measures the reproduction analysis; returns the result dict."""
  cli.bind_owner(config, os.path.join(workdir, "owner.key"))
  base_k = int(config.k)
  ks = sorted(set(ks or [max(1, base_k // 2), base_k, 2 * base_k]))
  if base_k not in ks:
    ks.append(base_k)
  train = build.dataset(config, "train")
  result = {"config": config.to_dict(), "ks": ks, "per_k": {}, "environment": fingerprint.environment()}
  for k in tqdm(ks, desc="k", disable=not progress, leave=False):
    c = config.copy_and_resolve_references()
    c.k = k
    plan = build.plan(c)
    program = build.program(c, train)
    proof_dir = os.path.join(workdir, f"k{k}", "proof")
    t0 = time.perf_counter()
    manifest = recorder.record(proof_dir, program, train, plan, config=c.to_dict())
    record_seconds = time.perf_counter() - t0
    rows = measure(proof_dir, program, train, chunk)
    result["per_k"][str(k)] = {
      "proof": proof_dir,
      "root": manifest["root"],
      "record_seconds": record_seconds,
      "proof_bytes": proof.size_bytes(proof_dir),
      "summary": _summary(rows),
      "segments": rows,
    }
    if k == base_k:
      result["cost"] = _cost(proof_dir, program, train, record_seconds, len(rows), counts, progress)
  return result


def _cost(proof_dir, program, train, record_seconds, num_segments, counts, progress) -> dict:
  """Wall time of exact verification (every check) against segments replayed."""
  points = []  # The segment program was compiled by the exact replay of every segment before.
  ns = sorted({c for c in counts if c <= num_segments} | {num_segments})
  for n in tqdm(ns, desc="cost", disable=not progress, leave=False):
    for integrity in ("full", "sampled"):
      t0 = time.perf_counter()
      drawn = challenge.Uniform(n=n)
      verdict = verifier.verify(proof_dir, program, train, challenge=drawn, integrity=integrity)
      seconds = time.perf_counter() - t0
      points.append(
        {
          "segments": n,
          "integrity": integrity,
          "accepted": verdict.accepted,
          "seconds": seconds,
          "fraction_of_recording": seconds / record_seconds,
        }
      )
  return {"record_seconds": record_seconds, "points": points}


def table(result: dict) -> str:
  c = result["config"]
  lines = [
    f"{c['model']} on {c['dataset']}, {c['runner']} runner, T={c['steps']}, B={c['batch_size']}, seed {c['seed']}",
    "",
    f"{'k':>5} {'segs':>5} {'update l2':>10} {'exact err':>10} {'bitwise':>8} {'vmapped err':>12} "
    f"{'max vmapped':>12} {'max / update':>12}",
  ]
  for k, r in result["per_k"].items():
    s = r["summary"]
    lines.append(
      f"{k:>5} {s['segments']:>5} {s['median_update_l2']:>10.3g} {s['max_exact_error_l2']:>10.3g} "
      f"{s['exact_bitwise']:>4}/{s['segments']:<3} {s['median_vmapped_error_l2']:>12.3g} "
      f"{s['max_vmapped_error_l2']:>12.3g} {s['max_vmapped_error_normalised_l2']:>12.3g}"
    )
  lines.append("(update and vmapped error: medians over segments; exact error: the largest; l2 over the parameters)")
  cost = result.get("cost")
  if cost:
    lines += [
      "",
      f"verification cost at k={c['k']} (exact, every check, program already compiled; "
      f"recording took {cost['record_seconds']:.2f} s)",
      f"{'segments':>9} {'integrity':>10} {'seconds':>8} {'of recording':>13}",
    ]
    for p in cost["points"]:
      lines.append(f"{p['segments']:>9} {p['integrity']:>10} {p['seconds']:>8.2f} {p['fraction_of_recording']:>13.2f}")
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  """Writes the three panels as a PNG."""
  import matplotlib  # deferred: the Agg backend must be chosen before pyplot loads

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a, b, cst) = plt.subplots(1, 3, figsize=(15, 4.2))
  colours = plt.cm.viridis([i / max(1, len(result["per_k"]) - 1) * 0.85 for i in range(len(result["per_k"]))])
  exact_segments = 0
  for colour, (k, r) in zip(colours, result["per_k"].items(), strict=True):
    update = [s["update"]["l2"] for s in r["segments"]]
    error = [max(s["vmapped_error"]["l2"], 1e-12) for s in r["segments"]]
    a.scatter(update, error, s=14, color=colour, label=f"vmapped, k={k}")
    exact_segments += sum(s["exact_error"]["l2"] == 0 for s in r["segments"])
  lo, hi = a.get_xlim()
  a.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="error = update")
  a.set(xscale="log", yscale="log", xlabel="recorded update ||W_end - W_start|| (l2)")
  a.set(ylabel="reproduction error ||W_replay - W_end|| (l2)", title="Update size against reproduction error")
  a.text(
    0.97,
    0.03,
    f"exact replay: error 0 (bit for bit)\nin all {exact_segments} segments",
    transform=a.transAxes,
    fontsize=9,
    ha="right",
  )
  a.legend(fontsize=8, loc="upper left")

  ks = [int(k) for k in result["per_k"]]
  summaries = [r["summary"] for r in result["per_k"].values()]
  b.plot(ks, [s["median_update_l2"] for s in summaries], "o-", label="median update (l2)")
  b.plot(ks, [s["median_vmapped_error_l2"] for s in summaries], "s-", label="median vmapped error (l2)")
  b.plot(ks, [s["max_vmapped_error_l2"] for s in summaries], "^:", label="largest vmapped error (l2)")
  b.set(yscale="log", xlabel="checkpoint interval k (steps)", title="Both against k")
  b.set_xticks(ks, [str(k) for k in ks])
  b.legend(fontsize=8)

  cost = result.get("cost")
  if cost:
    for integrity, marker in (("full", "o-"), ("sampled", "s-")):
      pts = [p for p in cost["points"] if p["integrity"] == integrity]
      cst.plot(
        [p["segments"] for p in pts], [p["seconds"] for p in pts], marker, label=f"verify, {integrity} integrity"
      )
    cst.axhline(cost["record_seconds"], color="k", ls="--", lw=0.8, label="recording the proof")
    ns = sorted({p["segments"] for p in cost["points"]})
    cst.set(xscale="log", xlabel="segments replayed (Fiat-Shamir n)", ylabel="seconds", ylim=(0, None))
    cst.set_xticks(ns, [str(n) for n in ns])
    cst.minorticks_off()
    cst.set(title=f"Verification cost (exact, k={result['config']['k']})")
    cst.legend(fontsize=8)
  c = result["config"]
  fig.suptitle(f"pol-jax reproduction analysis: {c['model']} on {c['dataset']}, T={c['steps']}", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  cli.set_deterministic_flags()  # before JAX starts a backend
  config = _CONFIG.value
  try:
    ks = _ints(_KS.value, "--ks") if _KS.value else None
    counts = _ints(_COUNTS.value, "--counts")
    cli.bind_owner(config, os.path.join(_WORKDIR.value, "owner.key"))
    build.plan(config)
    result = run(config, _WORKDIR.value, ks, counts, _CHUNK.value, _PROGRESS.value)
  except (build.ConfigError, cli.UsageError) as e:
    print(f"error: {cli.in_flags(str(e))}", file=sys.stderr)
    sys.exit(2)
  except (proof.ProofError, recorder.ProofExistsError) as e:
    print(f"error: {e} (choose an empty --workdir)", file=sys.stderr)
    sys.exit(2)
  result["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(os.path.join(_WORKDIR.value, "reproduce.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(_WORKDIR.value, "reproduce.png"))
  print(table(result))
  print(f"\nwritten: {_WORKDIR.value}/reproduce.json, {_WORKDIR.value}/reproduce.png")


if __name__ == "__main__":
  # Flags exist only when this module runs as a program, so the experiments modules can be
  # imported together as libraries (the notebook does).
  _CONFIG = cli.define_config(_DEFAULT, "Training config.")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/reproduce", "Where the proofs, the JSON and the PNG go.")
  _KS = flags.DEFINE_list("ks", None, "Checkpoint intervals k to record (default: k/2, k, 2k of the config).")
  _COUNTS = flags.DEFINE_list("counts", ["1", "2", "4", "8", "16"], "Segments replayed, for the cost curve.")
  _CHUNK = flags.DEFINE_integer("chunk", 16, "Segments per vmapped call.", lower_bound=1)
  _PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
  app.run(main, flags_parser=cli.parse_flags)
