"""What every command-line entry point shares: its config flag, flag parsing, owner key and XLA flags.

The config-to-program builder itself is the library's (:mod:`pol_jax.build`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import sys

import jax
from absl import flags
from absl import logging as absl_logging
from cryptography.hazmat.primitives.asymmetric import ed25519
from ml_collections import config_flags

from pol_jax import fingerprint, ownership, proof


class UsageError(Exception):
  """A request this machine cannot serve (CLI exit status 2)."""


def bind_owner(config, key_path: str | None) -> str:
  """Sets ``config.owner`` unless it is set, and says from where.

  From the Ed25519 private key at ``key_path``, created (mode 0600, with
  ``key_path.pub``) when missing and never overwritten; with ``key_path`` None,
  from a fresh key that is not kept (benchmarks: nobody can claim the proofs).
  """
  if config.owner:
    return f"owner:  {config.owner} (--config.owner)"
  if key_path is None:
    config.owner = _throwaway_owner()
    return f"owner:  {config.owner} (a throwaway key: nobody can claim these proofs)"
  config.owner, created = ownership.ensure_key(key_path)
  if created:
    return f"owner:  {config.owner} (new key {key_path}; keep it: only it can claim this proof)"
  return f"owner:  {config.owner} ({key_path})"


@functools.cache
def _throwaway_owner() -> str:
  return ownership.public_key_of(ed25519.Ed25519PrivateKey.generate())


CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_cuda12_pjrt", "jax_cuda13_pjrt")


def deterministic_xla_flags(flags: str, has_cuda: bool, isa: str | None = None, speed: tuple[str, ...] = ()) -> str:
  """``flags`` plus XLA's deterministic GPU flags when CUDA is present, the
  CPU ISA pin ``isa`` (``--xla_cpu_max_isa=...``) and the ``speed`` flags,
  each unless already set."""
  add = list(fingerprint.DETERMINISTIC_GPU_FLAGS) if has_cuda else []
  if isa:
    add.append(isa)
  add.extend(speed)
  add = [f for f in add if f.split("=")[0] not in flags]
  return " ".join([flags, *add]).strip()


def set_deterministic_flags() -> None:
  """Sets XLA_FLAGS for deterministic replay; call before JAX starts a backend.

  Deterministic GPU flags where CUDA is present, and the portable CPU vector
  ISA (``fingerprint.CPU_ISA``: AVX2 on x86, NEON on ARM), so a proof made on
  an AVX-512 machine replays on an AVX2 one, and the XLA:CPU flags that
  measure faster (``fingerprint.CPU_SPEED_FLAGS``; ``POL_JAX_NO_SPEED_FLAGS=1``
  leaves them out). Recorded in the proof's environment fingerprint; the
  verifier sets the proof's own flags instead (:func:`set_flags_of_proof`).
  """
  has_cuda = any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)
  speed = () if os.environ.get("POL_JAX_NO_SPEED_FLAGS") else fingerprint.CPU_SPEED_FLAGS
  os.environ["XLA_FLAGS"] = deterministic_xla_flags(
    os.environ.get("XLA_FLAGS", ""), has_cuda, fingerprint.cpu_isa_flag(), speed
  )


def set_flags_of_proof(proof_dir: str) -> None:
  """Starts this process with the XLA flags and x64 setting a proof recorded.

  Call before JAX starts a backend. Keeps the caller's flags that cannot
  change numerics (and a forced host device count given by the caller);
  replaces the rest by the proof's, if every recorded flag is one a verifier
  sets (``fingerprint.REPRODUCIBLE_FLAGS``). Otherwise changes nothing: the
  environment check then reports what differs. An unreadable proof is left
  to the verifier to report.
  """
  try:
    manifest = proof.read_json(os.path.join(proof_dir, proof.MANIFEST), proof.MANIFEST)
    settings = fingerprint.process_settings(manifest["environment"])
  except (proof.ProofError, ValueError, KeyError, TypeError, AttributeError):  # a manifest of the wrong shape
    return
  mine = os.environ.get("XLA_FLAGS", "")
  kept = [f for f in shlex.split(mine) if f not in fingerprint.numeric_xla_flags(mine).split()]
  theirs = shlex.split(settings["XLA_FLAGS"])
  if fingerprint.host_devices(mine) is not None:
    theirs = [f for f in theirs if not f.startswith(fingerprint.HOST_DEVICES_FLAG)]
  else:
    kept = [f for f in kept if not f.startswith(fingerprint.HOST_DEVICES_FLAG)]
  os.environ["XLA_FLAGS"] = " ".join(kept + theirs)
  os.environ["JAX_ENABLE_X64"] = settings["JAX_ENABLE_X64"]
  jax.config.update("jax_enable_x64", settings["JAX_ENABLE_X64"] == "1")  # JAX read the variable at import


def define_config(default: str, help_text: str):
  """``config_flags.DEFINE_config_file("config", default, help_text)``, with a one-line error and exit 2.

  ml_collections applies ``--config.FIELD=VALUE`` overrides to the default
  config as soon as the flag is defined, so an override of a field the config
  lacks fails there, before :func:`parse_flags`, when ``--config=`` is not given.
  """
  try:
    return config_flags.DEFINE_config_file("config", default, help_text)
  except (AttributeError, KeyError) as e:
    _config_error(sys.argv, e)


def _config_error(argv: list[str], e: Exception):
  bad = [a for a in argv[1:] if a.startswith("--config.")]
  field = str(e).strip("\"'")
  culprit = next((a.split("=")[0] for a in bad if a.split("=")[0].endswith("." + field)), f"--config.{field}")
  print(f"error: {culprit}: the config has no field {field!r}", file=sys.stderr)
  sys.exit(2)


class _ReaderMayLeave:
  """A text stream that goes quiet once its reader has left (``experiments.verify ... | head``).

  Writing to a pipe whose reader has gone raises ``BrokenPipeError``; left
  alone it ends the program with a traceback and exit status 1, which for the
  verifier says "rejected" of an accepted proof. Here the stream's descriptor
  is pointed at ``os.devnull`` instead, and the program finishes with the
  exit status it decides: nobody is reading what it would have printed.
  """

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> int:
    try:
      return self._stream.write(text)
    except BrokenPipeError:
      self._reader_left()
      return len(text)

  def flush(self) -> None:
    try:
      self._stream.flush()
    except BrokenPipeError:
      self._reader_left()

  def _reader_left(self) -> None:
    try:
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, self._stream.fileno())
      os.close(devnull)
    except (OSError, ValueError):  # no descriptor to point elsewhere: drop what is written from now on
      self._stream = open(os.devnull, "w")  # lives as long as the process

  def __getattr__(self, name: str):
    return getattr(self._stream, name)


def quiet_when_readers_leave() -> None:
  """Makes ``sys.stdout`` and ``sys.stderr`` :class:`_ReaderMayLeave` streams (once).

  absl's log handler, which holds the ``sys.stderr`` of its making, writes
  through the new one too (it compares the two to decide whether to write a
  record twice).
  """
  for name in ("stdout", "stderr"):
    stream = getattr(sys, name)
    if stream is not None and not isinstance(stream, _ReaderMayLeave):
      setattr(sys, name, _ReaderMayLeave(stream))
      handler = absl_logging.get_absl_handler().python_handler
      if handler.stream is stream:
        handler.stream = getattr(sys, name)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error and exit status 2 for a mistyped flag.

  Used as ``app.run(main, flags_parser=cli.parse_flags)``: a bad value
  (``--config.learning_rate=abc``) or an unknown config field
  (``--config.lr=0.1``) fails before anything runs, naming the flag. Also
  makes the program's output streams :func:`quiet_when_readers_leave`, so a
  reader that leaves early (``| head``) never changes the exit status.
  """
  quiet_when_readers_leave()
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {in_flags(str(e))}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks
    _config_error(argv, e)


# The library's errors name its arguments (``Tolerance(chunk=8)``); a command line names its flags.
_FLAG_WORDS = (
  (re.compile(r"Exact\(devices=N\) or Tolerance\(devices=N\)"), "--devices=N"),
  (re.compile(r"(?:replay=)?(?:Exact|Tolerance)\((\w+)=([^()]*)\)"), r"--\1=\2"),
  (re.compile(r"challenge=All\(\)"), "--strategy=all"),
  (re.compile(r"the max_params argument raises it"), "--max_params raises it"),
  (
    re.compile(r"set config\.owner to an ownership\.new_key's"),
    "experiments.train --key=PATH makes one, or pass --config.owner=HEX",
  ),
  (re.compile(r"\bprogram='([^']*)'"), r"--program=\1"),
  (re.compile(r"pass its path as data_dir"), "pass --data_dir"),
  (re.compile(r"use a new workdir"), "use a new --workdir"),
  (
    re.compile(
      r"settle again with a fresh challenge=TEXT that each claimant signs with ownership\.commit\(\.\.\., challenge=TEXT\)"
    ),
    "rerun with --challenge=TEXT; each claimant signs it with experiments.commit --challenge=TEXT",
  ),
)


def in_flags(message: str, arguments: dict[str, str] | None = None) -> str:
  """A library message in the words of the command line.

  ``Tolerance(chunk=8)`` becomes ``--chunk=8``, ``challenge=All()``
  ``--strategy=all``, and each argument name of ``arguments`` (where it is
  compared or set: ``n >= 1``, ``n=0``) its flag.

  >>> in_flags("Tolerance(chunk=9) does not divide over 2 devices")
  '--chunk=9 does not divide over 2 devices'
  >>> in_flags("Expected n >= 1 for Uniform, got n=0.", {"n": "--segments"})
  'Expected --segments >= 1 for Uniform, got --segments=0.'
  """
  for pattern, words in _FLAG_WORDS:
    message = pattern.sub(words, message)
  for name, flag in (arguments or {}).items():
    message = re.sub(rf"(?<![\w-]){re.escape(name)}(?=\s*(?:[<>]=?|=))", flag, message)
  return message
