"""Training across untrusted workers, with three coordinators on the same run.

  python -m experiments.distributed --workers=4 --byzantine=1 --behaviour=sign-flip [--rounds=10]
  python -m experiments.distributed ... --address=HOST:PORT      # join a Ray cluster

Workers are Ray actors (``ray.init()`` starts a local cluster unless
``--address`` names one). Every round each worker trains ``--steps`` steps
from the coordinator's state, on the examples its round seed assigns, and
returns a proof of them; the first ``--byzantine`` workers play
``--behaviour`` instead. The same run is coordinated three ways:

* ``none``: plain averaging of every returned update;
* ``pol``: each proof verified (``--strategy``, ``--segments``; the draw from
  a verifier seed the workers never see) and only the accepted averaged;
* ``median``: the coordinate-wise median of every returned update.

Every submission is judged in a child process under ``--judge_seconds`` and
``--judge_memory_gib`` (``--judges`` children, started once for the three
coordinators), so a hostile upload (a FIFO, a bomb, a hang) gets its worker
rejected and its child replaced, not the run stopped. Every worker proof is
bound to the run's owner key: ``--key`` (created if missing; keep it off the shared
``--workdir``: a worker that reads it could claim the run's proofs), else
``--config.owner``, else the owner a resumed run recorded, else a throwaway
key nobody can claim the proofs with.

Prints the per-round table of the PoL coordinator (worker, accepted or
rejected, the check, verification and training time) and the held-out
accuracy of the three; writes the rounds as JSON (``--out``) and accuracy
against round as a PNG (``--plot``). Proofs and coordinator records go to
``--workdir`` (which every Ray node must be able to read).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import ConfigDict
from tqdm import tqdm

from experiments import byzantine, cli
from pol_jax import build, distributed, fingerprint, ownership, proof

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "digits_mlp.py")


def build_worker(config: dict, xla_flags: str | None = None):
  """What every worker process builds once: the program and the training data (runs in Ray actors).

  ``xla_flags``: the coordinator's own (``fingerprint.started_flags()``), set
  before a fresh actor starts JAX, so the workers' proofs are recorded in the
  environment the coordinator verifies in.
  """
  if xla_flags is not None:
    os.environ["XLA_FLAGS"] = xla_flags
  logging.set_verbosity(logging.ERROR)
  config = ConfigDict(config)
  build.set_numerics(config)
  train = build.dataset(config, "train")
  return build.program(config, train), train


def bind_owner(config, workdir: str, key: str | None) -> str:
  """Sets ``config.owner`` for a run in ``workdir``; says from where.

  ``--config.owner``, else the public key of ``key`` (created if missing),
  else a throwaway key. ``key`` must not be under ``workdir``: that is the
  storage every worker reads, and writes. For the same reason a run resumed
  in ``workdir`` needs its owner from the caller: the one its ``setup.json``
  records could be any worker's key by now.
  """
  if key is not None:
    inside = os.path.commonpath([os.path.realpath(key), os.path.realpath(workdir)]) == os.path.realpath(workdir)
    if inside:
      raise cli.UsageError(f"--key={key} is under --workdir={workdir}, which every worker reads: keep it elsewhere")
  if not config.owner and key is None:
    for defence in ("pol", "none", "median"):
      path = os.path.join(workdir, defence, distributed.COORDINATOR, distributed.SETUP)
      if os.path.lexists(path):
        raise cli.UsageError(
          f"{path}: a run to resume; pass its owner (--key=FILE, or --config.owner=HEX as it printed): "
          "the owner recorded on the workers' storage is not trusted"
        )
  return cli.bind_owner(config, key)


def _check_behaviour(behaviour: str) -> None:
  if behaviour not in byzantine.BEHAVIOURS + byzantine.FAULTS:
    raise cli.UsageError(f"--behaviour: unknown {behaviour!r} (known: {', '.join(byzantine.BEHAVIOURS)})")


def make_engine(behaviours, make, config: dict, *, local: bool = False, address=None, timeout: float = 300.0):
  """Workers that play ``behaviours`` (:class:`experiments.byzantine.Worker`), each built by ``make()``.

  ``local``: one after another in this process; else Ray actors (``address``,
  ``timeout``: :class:`pol_jax.distributed.RayEngine`).
  """
  if local:
    return distributed.LocalEngine(behaviours, make, config, worker=byzantine.Worker)
  return distributed.RayEngine(behaviours, make, config, worker=byzantine.Worker, address=address, timeout=timeout)


def setup_for(
  config,
  workers: int,
  rounds: int,
  steps: int,
  k: int,
  defence: str,
  strategy: str,
  segments: int,
  exclude: bool = False,
  judge_seconds: float = 600.0,
  judge_memory: int = 8 << 30,
):
  try:
    return distributed.Setup(
      seed=int(config.seed),
      owner=str(config.owner),
      workers=workers,
      rounds=rounds,
      steps=steps,
      k=k,
      batch_size=int(config.batch_size),
      runner=str(config.runner),
      defence=defence,
      strategy=strategy,
      segments=segments,
      exclude=exclude,
      judge_seconds=judge_seconds,
      judge_memory=judge_memory,
    )
  except ValueError as e:
    raise cli.UsageError(str(e)) from None


def run(
  config,
  workdir: str,
  *,
  workers: int = 4,
  byzantine: int = 1,
  behaviour: str = "sign-flip",
  rounds: int = 10,
  steps: int = 20,
  k: int = 5,
  strategy: str = "uniform",
  segments: int = 8,
  defences=("none", "pol", "median"),
  exclude: bool = False,
  address: str | None = None,
  timeout: float = 300.0,
  local: bool = False,
  engine=None,
  progress: bool = False,
  on_round=None,
  key: str | None = None,
  judge_seconds: float = 600.0,
  judge_memory: int = 8 << 30,
  judges: int = 1,
) -> dict:
  """Runs the same training under each coordinator in ``defences``; returns every round's record.

  The proofs are bound to the owner :func:`bind_owner` picks (``key``, a
  private key file kept off ``workdir``). Each judgement runs in a child
  process (``judges`` of them, started once for every coordinator) with
  ``judge_seconds`` and ``judge_memory`` bytes.
  """
  if not 0 <= byzantine <= workers:
    raise cli.UsageError(f"--byzantine={byzantine} must be between 0 and --workers={workers}")
  _check_behaviour(behaviour)
  config = config.copy_and_resolve_references()
  config.steps = rounds * steps  # the learning-rate schedule spans the whole run
  owner = bind_owner(config, workdir, key)
  flags = fingerprint.started_flags()
  program, train = build_worker(config.to_dict(), flags)
  test = build.dataset(config, "test")
  behaviours = [behaviour] * byzantine + ["honest"] * (workers - byzantine)
  own_engine = engine is None
  if own_engine:
    make = functools.partial(build_worker, config.to_dict(), flags)
    engine = make_engine(behaviours, make, config.to_dict(), local=local, address=address, timeout=timeout)
  out = {"config": config.to_dict(), "owner": owner, "behaviours": behaviours, "coordinators": {}}
  private = tempfile.mkdtemp(prefix="pol-jax-judges-")  # the judging children's files and compilation cache
  shared = []  # the judging children, started once for every coordinator
  try:
    for defence in defences:
      setup = setup_for(
        config, workers, rounds, steps, k, defence, strategy, segments, exclude and defence == "pol",
        judge_seconds, judge_memory,
      )  # fmt: skip
      shared = shared or [
        distributed.Judge(
          builder=build.BUILDER,
          config=config.to_dict(),
          limits=setup.limits,
          scratch=private,
          compilation_cache=os.path.join(private, "xla-cache"),
        )  # fmt: skip
        for _ in range(judges)
      ]
      engine.reset()
      directory = os.path.join(workdir, defence)
      with tqdm(total=rounds, desc=f"coordinator {defence}", disable=not progress, leave=False) as bar:

        def after(record, defence=defence, bar=bar):
          bar.update(1)
          if on_round:
            on_round(defence, record)

        result = distributed.coordinate(
          directory,
          setup,
          program,
          engine,
          builder=build.BUILDER,
          config=config.to_dict(),
          evaluate=lambda s: build.evaluate(config, s, test),
          on_round=after,
          judges=shared,
          key=None if key is None else ownership.load_key(key),
        )
      out["coordinators"][defence] = {"rounds": result["rounds"]}
  finally:
    for j in shared:
      j.close()
    shutil.rmtree(private, ignore_errors=True)
    if own_engine:
      engine.shutdown()
  return out


def cost(result: dict) -> dict:
  """Medians over the PoL coordinator's rounds: verification and worker training seconds per proof."""
  rows = [j for r in result["coordinators"].get("pol", {}).get("rounds", []) for j in r["judgements"]]
  rows = [j for j in rows if j["status"] != "dropped"]
  if not rows:
    return {}
  verify = statistics.median(j["verify_seconds"] for j in rows)
  isolate = statistics.median(j.get("isolation_seconds", 0.0) for j in rows)
  train = statistics.median(j["train_seconds"] for j in rows)
  per_round = [
    sum(j["verify_seconds"] + j.get("isolation_seconds", 0.0) for j in r["judgements"])
    for r in result["coordinators"]["pol"]["rounds"]
  ]
  return {
    "verify_seconds_per_proof": verify,
    "isolation_seconds_per_proof": isolate,
    "train_seconds_per_proof": train,
    "verify_over_train": verify / train if train else None,
    "coordinator_verify_seconds_per_round": statistics.median(per_round),
  }


def round_table(result: dict, defence: str = "pol") -> str:
  behaviours = result["behaviours"]
  lines = [f"{'round':>5} {'worker':>6} {'behaviour':<11} {'verdict':<9} {'check':<11} {'verify s':>8} {'train s':>8}"]
  for r in result["coordinators"][defence]["rounds"]:
    for j in r["judgements"]:
      lines.append(
        f"{r['round']:>5} {j['worker']:>6} {behaviours[j['worker']]:<11} {j['status']:<9} {j['check'] or '-':<11} "
        f"{j['verify_seconds']:>8.2f} {j['train_seconds']:>8.2f}"
      )
  return "\n".join(lines)


def summary(result: dict) -> str:
  lines = [f"{'coordinator':<12} {'final accuracy':>14} {'rejected':>8} {'dropped':>7}"]
  for defence, c in result["coordinators"].items():
    judgements = [j for r in c["rounds"] for j in r["judgements"]]
    rejected = sum(j["status"] == "rejected" for j in judgements)
    dropped = sum(j["status"] == "dropped" for j in judgements)
    lines.append(f"{defence:<12} {c['rounds'][-1]['accuracy']:>14.4f} {rejected:>8} {dropped:>7}")
  c = cost(result)
  if c:
    lines.append(
      f"cost: verifying a proof {c['verify_seconds_per_proof']:.2f} s (median) against training it "
      f"{c['train_seconds_per_proof']:.2f} s: {c['verify_over_train']:.2f}x, plus "
      f"{c['isolation_seconds_per_proof']:.2f} s to judge it in a child process; "
      f"coordinator judging per round {c['coordinator_verify_seconds_per_round']:.2f} s"
    )
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  import matplotlib  # deferred: only --plot needs it, and the Agg backend must be chosen before pyplot loads

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.6))
  names = {"none": "no defence (mean)", "pol": "PoL verification", "median": "coordinate-wise median"}
  for defence, c in result["coordinators"].items():
    rounds = [r["round"] + 1 for r in c["rounds"]]
    ax.plot(rounds, [r["accuracy"] for r in c["rounds"]], marker="o", label=names.get(defence, defence))
  b = result["behaviours"]
  byz = sum(x != "honest" for x in b)
  ax.set(
    xlabel="round",
    ylabel="held-out accuracy",
    ylim=(0, 1),
    title=f"{len(b)} workers, {byz} {b[0] if byz else 'honest'}",
  )
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)
  cli.set_deterministic_flags()
  defences = [d.strip() for d in _DEFENCES.value.split(",") if d.strip()]
  if not defences or any(d not in ("none", "pol", "median") for d in defences):
    print(f"error: --defences: expected some of none,pol,median, got {_DEFENCES.value!r}", file=sys.stderr)
    sys.exit(2)
  if _FRESH.value:
    shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  if _LOCAL.value and _ADDRESS.value:
    print("error: --local runs no Ray, so --address does not apply", file=sys.stderr)
    sys.exit(2)
  progress = sys.stderr.isatty()
  try:
    result = run(
      _CONFIG.value,
      _WORKDIR.value,
      workers=_WORKERS.value,
      byzantine=_BYZANTINE.value,
      behaviour=_BEHAVIOUR.value,
      rounds=_ROUNDS.value,
      steps=_STEPS.value,
      k=_K.value,
      strategy=_STRATEGY.value,
      segments=_SEGMENTS.value,
      defences=defences,
      exclude=_EXCLUDE.value,
      address=_ADDRESS.value,
      timeout=_TIMEOUT.value,
      local=_LOCAL.value,
      progress=progress,
      key=_KEY.value,
      judge_seconds=_JUDGE_SECONDS.value,
      judge_memory=int(_JUDGE_MEMORY_GIB.value * (1 << 30)),
      judges=_JUDGES.value,
    )
  except (build.ConfigError, cli.UsageError, proof.ProofError, distributed.CoordinatorError, ImportError) as e:
    print(f"error: {cli.in_flags(str(e))}", file=sys.stderr)
    sys.exit(2)
  print(result["owner"])
  if "pol" in result["coordinators"]:
    print(round_table(result))
    print()
  print(summary(result))
  result["cost"] = cost(result)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
  if _PLOT.value:
    plot(result, _PLOT.value)


if __name__ == "__main__":
  # Flags exist only when this module runs as a program, so it imports as a library (Ray actors do).
  _CONFIG = cli.define_config(_DEFAULT, "Training config (model, data, optimizer, batch).")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/distributed", "Proofs and coordinator records (shared storage).")
  _FRESH = flags.DEFINE_bool("fresh", True, "Start from nothing; --nofresh resumes a killed run in --workdir.")
  _WORKERS = flags.DEFINE_integer("workers", 4, "Workers (Ray actors).", lower_bound=1)
  _BYZANTINE = flags.DEFINE_integer("byzantine", 1, "How many workers (the first) play --behaviour.", lower_bound=0)
  _BEHAVIOUR = flags.DEFINE_enum(
    "behaviour", "sign-flip", list(byzantine.BEHAVIOURS + byzantine.FAULTS), "The Byzantine behaviour."
  )
  _ROUNDS = flags.DEFINE_integer("rounds", 10, "Rounds.", lower_bound=1)
  _STEPS = flags.DEFINE_integer("steps", 20, "Local steps per worker and round.", lower_bound=1)
  _K = flags.DEFINE_integer("k", 5, "Steps between a worker's recorded states.", lower_bound=1)
  _STRATEGY = flags.DEFINE_enum("strategy", "uniform", ["uniform", "fiat-shamir", "all"], "Which segments to replay.")
  _SEGMENTS = flags.DEFINE_integer("segments", 8, "Segments replayed per proof (uniform, fiat-shamir).", lower_bound=1)
  _DEFENCES = flags.DEFINE_string("defences", "none,pol,median", "Coordinators to run, comma-separated.")
  _EXCLUDE = flags.DEFINE_bool("exclude", False, "PoL coordinator: exclude a worker from later rounds once rejected.")
  _ADDRESS = flags.DEFINE_string("address", None, "HOST:PORT of a Ray cluster to join (default: start a local one).")
  _LOCAL = flags.DEFINE_bool("local", False, "Run the workers one after another in this process instead of Ray.")
  _TIMEOUT = flags.DEFINE_float("timeout", 300.0, "Seconds a round waits for a worker before dropping it.")
  _KEY = flags.DEFINE_string(
    "key", None, "The run's Ed25519 private key (PEM), created if missing; not under --workdir (workers read it)."
  )
  _JUDGE_SECONDS = flags.DEFINE_float(
    "judge_seconds",
    600.0,
    "Wall-clock limit of one judgement, and of a judging child's start-up (~3 s).",
    lower_bound=1.0,
  )
  _JUDGE_MEMORY_GIB = flags.DEFINE_float(
    "judge_memory_gib", 8.0, "Address-space limit of one judgement's child process, GiB (0: none; 0 on GPU).",
    lower_bound=0.0,
  )  # fmt: skip
  _JUDGES = flags.DEFINE_integer("judges", 1, "Judgements run at once (judging child processes).", lower_bound=1)
  _OUT = flags.DEFINE_string("out", None, "Write every round as JSON to this file.")
  _PLOT = flags.DEFINE_string("plot", None, "Write accuracy against round for the coordinators as a PNG.")
  app.run(main, flags_parser=cli.parse_flags)
