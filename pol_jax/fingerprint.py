"""Environment and step-program fingerprints.

Exact replay reproduces the prover's bits only on an environment that compiles
and runs the step the same way. :func:`environment` records every field known
to change bits (``EXACT_FIELDS``) and, for the report, some that do not
(``INFO_FIELDS``). Each exact field has a kind (``KINDS``) that says how a
verifier can reproduce it:

- ``threads``: the CPU thread count XLA sizes its pool from (the process's CPU
  affinity). Reproduced by replaying in worker processes pinned to that many
  cores (:mod:`pol_jax.workers`).
- ``flags``: the XLA flags that change numerics (the CPU ISA pin among them),
  the forced host device count and x64. Reproduced by starting those workers
  with the prover's settings; only flags in ``REPRODUCIBLE_FLAGS`` are set.
- ``versions``: jax and jaxlib. Reproduced by a virtual environment with the
  recorded versions (:mod:`pol_jax.venv`).
- ``hardware``: backend, device kind, machine. Not reproducible here.

Measured on a 2-core x86 CPU, jax 0.10.2 and 0.12.0.1 (DESIGN.md): the thread
count and ``--xla_force_host_platform_device_count`` change float32 bits of
convolutional models, and the two versions disagree with each other; no value
of ``jax_default_matmul_precision`` changed a bit on CPU, so on CPU it is
reported, not matched. The number of devices is informational: a proof made on
one GPU verifies exactly on a machine with eight of the same kind.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
from importlib import metadata

import jax
import numpy as np

KINDS = {
  "jax": "versions",
  "jaxlib": "versions",
  "backend": "hardware",
  "device_kind": "hardware",
  "machine": "hardware",
  "cpu_threads": "threads",
  "xla_flags": "flags",
  "host_devices": "flags",
  "x64": "flags",
  "matmul_precision": "flags",
}
EXACT_FIELDS = tuple(KINDS)
INFO_FIELDS = ("python", "flax", "optax", "orbax_checkpoint", "numpy", "device_count", "process_count")
CPU_NEUTRAL_FIELDS = ("matmul_precision",)
"""Exact elsewhere, measured to change no bit on CPU: reported, not matched."""

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"

# XLA flags that cannot change the numbers a program computes. The forced host
# device count does (measured), and is recorded as its own field.
_NEUTRAL_FLAG_PREFIXES = (
  HOST_DEVICES_FLAG,
  "--xla_dump",
  "--xla_gpu_cuda_data_dir",
  "--xla_hlo_profile",
)

# Flags that make GPU replay deterministic; the CLI sets them before JAX starts.
DETERMINISTIC_GPU_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_autotune_level=0")

# The portable vector ISA every CLI pins XLA:CPU to, by machine: a proof made
# on an AVX-512 machine then replays on any AVX2 one.
CPU_ISA = {"x86_64": "AVX2", "amd64": "AVX2", "aarch64": "NEON", "arm64": "NEON"}
ISA_FLAG = "--xla_cpu_max_isa"

# XLA:CPU flags every CLI sets because they measure faster (recorded like any
# numeric flag: they change bits, deterministically). YNNPACK elementwise
# fusion: the ResNet-20 step 0.82-0.93x wall, 12-16% less CPU (jax 0.10.2).
CPU_SPEED_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=+eltwise",)

REPRODUCIBLE_FLAGS = (
  ISA_FLAG,
  "--xla_gpu_deterministic_ops",
  "--xla_gpu_autotune_level",
  "--xla_cpu_experimental_ynn_fusion_type",
  "--xla_cpu_enable_fast_math",
  "--xla_cpu_use_thunk_runtime",
)
"""The numeric XLA flags a verifier sets to reproduce a proof's: a proof may
name only these (with plain values), so it cannot make a verifier start XLA
with flags of its choosing (a dump directory, say)."""

_BOOL = r"(?i:true|false)|[01]"
_YNN_TYPE = r"[+-]?(?:dot|eltwise|reduce|individual_dot|individual_convolution)"
_FLAG_VALUES = {
  "--xla_gpu_deterministic_ops": re.compile(rf"^(?:{_BOOL})$"),
  "--xla_gpu_autotune_level": re.compile(r"^[0-4]$"),
  "--xla_cpu_experimental_ynn_fusion_type": re.compile(rf"^{_YNN_TYPE}(?:,{_YNN_TYPE}){{0,9}}$"),
  "--xla_cpu_enable_fast_math": re.compile(rf"^(?:{_BOOL})$"),
  "--xla_cpu_use_thunk_runtime": re.compile(rf"^(?:{_BOOL})$"),
}
"""What XLA parses for each flag besides the ISA pin: a value it cannot parse kills the process that
sets it (a fatal flag-parsing error), so a verifier never sets one."""

# What /proc/cpuinfo calls each ISA XLA:CPU can be pinned to.
_ISA_FEATURES = {
  "SSE4_2": "sse4_2",
  "AVX": "avx",
  "AVX2": "avx2",
  "AVX512": "avx512f",
  "AVX512_VNNI": "avx512_vnni",
  "AVX512_BF16": "avx512_bf16",
  "AMX": "amx_tile",
  "AMX_FP16": "amx_fp16",
  "NEON": "asimd",
  "SVE": "sve",
  "SVE2": "sve2",
}


_STARTED_FLAGS: list[str] = []


def started_flags() -> str:
  """``XLA_FLAGS`` as this process's XLA backend read them.

  XLA reads ``XLA_FLAGS`` once, when the backend starts; a later change of
  the variable changes nothing but would change a fingerprint that re-read
  it. So the value is read once, after the backend has started (at the first
  call), and kept.
  """
  if not _STARTED_FLAGS:
    jax.devices()  # start the backend, if nothing has yet
    _STARTED_FLAGS.append(os.environ.get("XLA_FLAGS", ""))
  return _STARTED_FLAGS[0]


def _version(dist: str) -> str:
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return "absent"


def numeric_xla_flags(flags: str | None = None) -> str:
  """The XLA flags that may change numerics (of this process by default), sorted, as one string."""
  flags = started_flags() if flags is None else flags
  kept = [f for f in shlex.split(flags) if not f.startswith(_NEUTRAL_FLAG_PREFIXES)]
  return " ".join(sorted(kept))


def host_devices(flags: str | None = None) -> int | None:
  """The forced host device count in ``flags`` (``XLA_FLAGS``), or None.

  >>> host_devices("--xla_force_host_platform_device_count=4 --xla_foo=1")
  4
  """
  flags = started_flags() if flags is None else flags
  count = None
  for f in shlex.split(flags):
    name, _, value = f.partition("=")
    if name == HOST_DEVICES_FLAG and value.isdigit():
      count = int(value)
  return count


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
  cpu = jax.default_backend() == "cpu"
  return {
    "jax": jax.__version__,
    "jaxlib": _version("jaxlib"),
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "cpu_threads": cpu_threads() if cpu else None,
    "machine": platform.machine(),
    "xla_flags": numeric_xla_flags(),
    "host_devices": host_devices() if cpu else None,
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


PORTABLE_FIELDS = ("x64",)
"""What a portable proof (``pol_jax.numerics``) needs matched: x64 on. Measured: its digests were
identical under jax 0.10.2 and 0.12, at 1 and 2 CPU threads, with and without the ISA pin."""


def matched_fields(recorded: dict, portable: bool = False) -> tuple[str, ...]:
  """The exact fields a verifier must match for a proof with this environment."""
  if portable:
    return PORTABLE_FIELDS
  if recorded.get("backend") == "cpu":
    return tuple(f for f in EXACT_FIELDS if f not in CPU_NEUTRAL_FIELDS)
  return EXACT_FIELDS


def mismatches(recorded: dict, current: dict, portable: bool = False) -> list[tuple[str, object, object]]:
  """``(field, recorded, current)`` for every field that must match and differs."""
  fields = matched_fields(recorded, portable)
  return [(f, recorded.get(f), current.get(f)) for f in fields if recorded.get(f) != current.get(f)]


def unmatched_info(recorded: dict, current: dict, portable: bool = False) -> list[tuple[str, object, object]]:
  """``(field, recorded, current)`` for reported fields that differ and need not match."""
  fields = [f for f in EXACT_FIELDS if f not in matched_fields(recorded, portable)] + list(INFO_FIELDS)
  return [(f, recorded.get(f), current.get(f)) for f in fields if recorded.get(f) != current.get(f)]


def reproducible_flags(recorded: dict) -> str:
  """The recorded numeric XLA flags, if every one may be set by a verifier.

  Raises:
    ValueError: a flag outside ``REPRODUCIBLE_FLAGS`` or an odd value, named.
  """
  flags = recorded.get("xla_flags")
  if not isinstance(flags, str) or len(flags) > 4096:
    raise ValueError(f"environment.xla_flags: expected a string of flags, got {flags!r:.60}")
  out, names = [], set()
  for f in flags.split():
    name, eq, value = f.partition("=")
    if name == ISA_FLAG and value not in _ISA_FEATURES:
      raise ValueError(f"environment.xla_flags: {f[:80]!r} names an ISA XLA does not know ({', '.join(_ISA_FEATURES)})")
    if name not in REPRODUCIBLE_FLAGS or not eq:
      raise ValueError(
        f"environment.xla_flags: {f[:80]!r} is not a flag a verifier sets (it sets {', '.join(REPRODUCIBLE_FLAGS)})"
      )
    if name in _FLAG_VALUES and not _FLAG_VALUES[name].match(value):
      raise ValueError(f"environment.xla_flags: {f[:80]!r}: not a value XLA parses for {name}")
    if name in names:
      raise ValueError(f"environment.xla_flags: {name} is set twice")
    names.add(name)
    out.append(f)
  return " ".join(out)


def process_settings(recorded: dict) -> dict[str, str]:
  """Environment variables that start a JAX process with the recorded flags.

  ``XLA_FLAGS`` holds the recorded numeric flags and host device count;
  ``JAX_ENABLE_X64`` the x64 setting.

  Raises:
    ValueError: the recorded flags are not ones a verifier sets.
  """
  flags = reproducible_flags(recorded)
  count = recorded.get("host_devices")
  if count is not None:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 4096:
      raise ValueError(f"environment.host_devices: expected an integer in [1, 4096], got {count!r:.40}")
    flags = f"{flags} {HOST_DEVICES_FLAG}={count}".strip()
  x64 = recorded.get("x64")
  if not isinstance(x64, bool):
    raise ValueError(f"environment.x64: expected true or false, got {x64!r:.40}")
  return {"XLA_FLAGS": flags, "JAX_ENABLE_X64": "1" if x64 else "0"}


def lacking_isa(flags: str, cpuinfo: str = "/proc/cpuinfo") -> str | None:
  """The ISA a ``--xla_cpu_max_isa`` in ``flags`` pins that this CPU lacks, or None.

  XLA compiles for the lesser of the pin and the host, so a host without the
  pinned ISA computes other bits. None also when the host cannot be read.
  """
  isa = next((f.partition("=")[2] for f in flags.split() if f.startswith(ISA_FLAG + "=")), None)
  if isa is None or isa not in _ISA_FEATURES:
    return None
  try:
    with open(cpuinfo) as f:
      text = f.read(1 << 20)
  except OSError:
    return None
  features = set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      features.update(value.split())
  return isa if features and _ISA_FEATURES[isa] not in features else None


def cpu_isa_flag(machine: str | None = None) -> str | None:
  """``--xla_cpu_max_isa=...`` for this machine's portable ISA, or None if unknown."""
  isa = CPU_ISA.get((machine or platform.machine()).lower())
  return f"{ISA_FLAG}={isa}" if isa else None


def program_digest(program_text: str) -> str:
  """SHA-256 of a lowered program's text, as hex."""
  return hashlib.sha256(program_text.encode()).hexdigest()


def program_texts(segment, state, dataset, plan, step_root) -> dict:
  """The lowered StableHLO text of every program a run executes, at their input shapes."""
  out = {}
  lengths = {"segment": plan.k}
  if plan.runner == "scan" and plan.steps % plan.k:
    lengths["tail"] = plan.steps % plan.k
  for name, length in lengths.items():
    batches = dataset.batch(np.zeros((length, plan.batch_size), np.int32))
    out[name] = segment.program_text(state, batches, step_root)
  return out


def program_digests(segment, state, dataset, plan, step_root) -> dict:
  """Digests of the lowered programs a run executes, at their input shapes."""
  texts = program_texts(segment, state, dataset, plan, step_root)
  return {name: program_digest(text) for name, text in texts.items()}
