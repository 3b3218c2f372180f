"""Environment and step-program fingerprints.

Exact replay reproduces the prover's bits only on an environment that compiles
and runs the step the same way. :func:`environment` records every field known
to change bits (``EXACT_FIELDS``) and, for the report, some that do not
(``INFO_FIELDS``). The number of devices is informational: a proof made on one
device verifies exactly on a machine with eight of the same kind.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
from importlib import metadata

import jax

EXACT_FIELDS = (
  "jax",
  "jaxlib",
  "backend",
  "device_kind",
  "cpu_threads",
  "machine",
  "xla_flags",
  "x64",
  "matmul_precision",
)
INFO_FIELDS = ("python", "flax", "optax", "orbax_checkpoint", "numpy", "device_count", "process_count")

# XLA flags that cannot change the numbers a program computes.
_NEUTRAL_FLAG_PREFIXES = (
  "--xla_force_host_platform_device_count",
  "--xla_dump",
  "--xla_gpu_cuda_data_dir",
  "--xla_hlo_profile",
)

# Flags that make GPU replay deterministic; the CLI sets them before JAX starts.
DETERMINISTIC_GPU_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_autotune_level=0")


def _version(dist: str) -> str:
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return "absent"


def numeric_xla_flags(flags: str | None = None) -> str:
  """The XLA flags that may change numerics, sorted, as one string."""
  flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
  kept = [f for f in shlex.split(flags) if not f.startswith(_NEUTRAL_FLAG_PREFIXES)]
  return " ".join(sorted(kept))


def cpu_threads() -> int:
  """Cores this process may run on: XLA:CPU sizes its thread pool from it."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def environment() -> dict:
  """The fingerprint of this process's JAX environment.

  >>> sorted(environment())[:3]
  ['backend', 'cpu_threads', 'device_count']
  """
  device = jax.devices()[0]
  return {
    "jax": jax.__version__,
    "jaxlib": _version("jaxlib"),
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "cpu_threads": cpu_threads() if jax.default_backend() == "cpu" else None,
    "machine": platform.machine(),
    "xla_flags": numeric_xla_flags(),
    "x64": bool(jax.config.jax_enable_x64),
    "matmul_precision": str(jax.config.jax_default_matmul_precision),
    "python": platform.python_version(),
    "flax": _version("flax"),
    "optax": _version("optax"),
    "orbax_checkpoint": _version("orbax-checkpoint"),
    "numpy": _version("numpy"),
    "device_count": jax.device_count(),
    "process_count": jax.process_count(),
  }


def mismatches(recorded: dict, current: dict) -> list[tuple[str, object, object]]:
  """``(field, recorded, current)`` for every exact field that differs."""
  return [(f, recorded.get(f), current.get(f)) for f in EXACT_FIELDS if recorded.get(f) != current.get(f)]


def program_digest(program_text: str) -> str:
  """SHA-256 of a lowered program's text, as hex."""
  return hashlib.sha256(program_text.encode()).hexdigest()
