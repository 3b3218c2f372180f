"""A cached virtual environment with exactly the versions a proof was recorded with.

Internal to pol-jax (no stability promise); the public API is in ``pol_jax/__init__.py``.

Exact replay needs the prover's jax and jaxlib (see :mod:`pol_jax.fingerprint`).
A verifier with other versions calls :func:`ensure`: it builds, once, a virtual
environment under ``<cache>/envs/`` with the recorded versions of :data:`PINNED`
and this project installed (editable), and returns its python, which then runs
the verification. Later calls with the same recorded versions reuse it.

The recorded environment is the prover's word, so it is hostile input: only
the distributions named in :data:`PINNED` are installed, each pinned to a plain
PEP 440 release string (no URL, extra, marker or option can reach pip), and
nothing from it is ever passed to a shell. Everything that cannot be reproduced
here (an interpreter, a machine, a version missing from the index) is a
:class:`MatchError` whose one line says what to do instead.

The module uses only the standard library: the environment's python, not this
one, imports the recorded jax.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata

# (environment field, PyPI distribution) for every version a built environment pins.
PINNED = (
  ("jax", "jax"),
  ("jaxlib", "jaxlib"),
  ("flax", "flax"),
  ("optax", "optax"),
  ("orbax_checkpoint", "orbax-checkpoint"),
  ("numpy", "numpy"),
)
MARKER = "pol-jax-env.json"
MAX_VERSION_CHARS = 40
PROBE_TIMEOUT_S = 20.0

# A plain release: no local version (+...), epoch, URL, extra, marker, space or option.
_RELEASE = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9}){0,3}((a|b|rc)[0-9]{1,9})?(\.post[0-9]{1,9})?(\.dev[0-9]{1,12})?")
# platform.python_version(): '3.12.1', '3.13.0rc2', '3.12.1+' for a build from source.
_PYTHON = re.compile(r"([0-9]{1,2})\.([0-9]{1,3})(\.[0-9]{1,3})?((a|b|rc)[0-9]{1,3})?\+?")
_MAJOR_MINOR = re.compile(r"[0-9]{1,2}\.[0-9]{1,3}")
# Variables that would let the host's packages into the environment's interpreter.
_LEAKY_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
# Confirms an interpreter: its major.minor and where it really is (a pyenv shim resolves here).
_PROBE = "import sys; print('%d.%d' % sys.version_info[:2]); print(sys.executable)"
# Confirms a built environment: the installed versions and where pol_jax is imported from.
_CHECK = (
  "import importlib.metadata as m, importlib.util as u, json, sys, jax\n"
  "dists = json.loads(sys.argv[1])\n"
  "spec = u.find_spec('pol_jax')\n"
  "print(json.dumps({'jax.__version__': jax.__version__, 'pol_jax': spec and spec.origin,"
  " **{d: m.version(d) for d in dists}}))\n"
)


class MatchError(Exception):
  """The recorded environment cannot be reproduced here.

  The message is one line: what is missing and what would make it work.
  """


def _show(value: object) -> str:
  """A hostile value, quoted on one line and cut to a readable length."""
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def clean_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """``environ`` (default ``os.environ``) without the variables that leak the host's packages.

  Run the interpreter that :func:`ensure` returns with this environment: a
  ``PYTHONPATH`` would put the host's jax ahead of the pinned one.

  >>> clean_environ({"PATH": "/bin", "PYTHONPATH": "/host/site-packages"})
  {'PATH': '/bin'}
  """
  environ = os.environ if environ is None else environ
  return {k: v for k, v in environ.items() if k not in _LEAKY_VARIABLES}


def requirements(recorded: dict) -> list[str]:
  """``dist==version`` pins for every :data:`PINNED` field of a recorded environment.

  Args:
    recorded: a proof's ``environment`` (hostile input).

  Returns:
    One pin per :data:`PINNED` entry, in that order.

  Raises:
    MatchError: naming the field, when one is missing or is not a plain PEP 440
      release string (so that a proof cannot make pip install anything else).

  >>> requirements({"jax": "0.4.30", "jaxlib": "0.4.30", "flax": "0.8.5", "optax": "0.2.3",
  ...               "orbax_checkpoint": "0.5.20", "numpy": "1.26.4"})[:2]
  ['jax==0.4.30', 'jaxlib==0.4.30']
  """
  if not isinstance(recorded, dict):
    raise MatchError(f"recorded environment: expected a JSON object, got {type(recorded).__name__}")
  pins = []
  for field, dist in PINNED:
    if field not in recorded:
      raise MatchError(f"recorded environment: field {field!r} is missing, so the {dist} version cannot be pinned")
    version = recorded[field]
    if not (type(version) is str and len(version) <= MAX_VERSION_CHARS and _RELEASE.fullmatch(version) is not None):
      raise MatchError(
        f"recorded environment: field {field!r} is {_show(version)}, not a plain release version such as '0.4.30'"
      )
    pins.append(f"{dist}=={version}")
  return pins


def python_version(recorded: dict) -> str:
  """The recorded interpreter's ``major.minor``.

  >>> python_version({"python": "3.12.1"})
  '3.12'

  Raises:
    MatchError: naming the ``python`` field, when it is missing or malformed.
  """
  version = recorded.get("python") if isinstance(recorded, dict) else None
  match = _PYTHON.fullmatch(version) if type(version) is str else None
  if match is None:
    raise MatchError(f"recorded environment: field 'python' is {_show(version)}, not a Python version such as '3.12.1'")
  return f"{int(match.group(1))}.{int(match.group(2))}"


def _this_python() -> str:
  return f"{sys.version_info.major}.{sys.version_info.minor}"


def _pyenv_root() -> str:
  return os.environ.get("PYENV_ROOT") or os.path.join(os.path.expanduser("~"), ".pyenv")


def _default_search(version: str) -> list[str]:
  """The absolute directories on PATH, then pyenv's ``versions/X.Y.*/bin``, newest patch first."""
  dirs = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if os.path.isabs(d)]
  versions = os.path.join(_pyenv_root(), "versions")
  try:
    names = os.listdir(versions)
  except OSError:
    names = []
  patch = re.compile(re.escape(version) + r"\.([0-9]{1,3})")
  found = sorted(((int(m.group(1)), n) for n in names if (m := patch.fullmatch(n))), reverse=True)
  return dirs + [os.path.join(versions, n, "bin") for _, n in found]


def _probe(candidate: str, version: str) -> str | None:
  """The real executable behind ``candidate`` if running it reports ``version``, else None."""
  try:
    out = subprocess.run(
      [candidate, "-I", "-c", _PROBE],
      capture_output=True,
      text=True,
      timeout=PROBE_TIMEOUT_S,
      env=clean_environ(),
      stdin=subprocess.DEVNULL,
    )
  except (OSError, subprocess.SubprocessError):
    return None
  lines = out.stdout.splitlines()
  if out.returncode != 0 or len(lines) != 2 or lines[0] != version:
    return None
  return lines[1] if os.path.isabs(lines[1]) and os.path.exists(lines[1]) else candidate


def find_python(version: str, search: Sequence[str] | None = None) -> str:
  """An interpreter of ``major.minor`` ``version``.

  This interpreter if it is one; else the first ``pythonX.Y`` in ``search``
  (default: the directories on PATH, then pyenv's ``versions/X.Y.*/bin``,
  newest patch first, under ``$PYENV_ROOT`` or ``~/.pyenv``) that, when run,
  reports that version. A pyenv shim that cannot run the version is skipped.

  Args:
    version: ``major.minor``, e.g. ``'3.12'``.
    search: directories to look in instead of the default ones.

  Returns:
    The interpreter's executable (where a shim or link leads).

  Raises:
    ValueError: ``version`` is not ``major.minor``.
    MatchError: no such interpreter was found.

  >>> import sys
  >>> find_python(f"{sys.version_info.major}.{sys.version_info.minor}") == sys.executable
  True
  """
  if type(version) is not str or _MAJOR_MINOR.fullmatch(version) is None:
    raise ValueError(f"version={_show(version)}: expected major.minor such as '3.12'")
  if _this_python() == version and sys.executable:
    return sys.executable
  name = f"python{version}"
  dirs = _default_search(version) if search is None else list(search)
  for d in dirs:
    candidate = os.path.join(d, name)
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
      found = _probe(candidate, version)
      if found is not None:
        return found
  where = (
    f"{sys.executable}, {name} on PATH and {os.path.join(_pyenv_root(), 'versions', version + '.*')}"
    if search is None
    else f"{name} in {', '.join(dirs) or 'no directory'}"
  )
  raise MatchError(
    f"Python {version} is needed to reproduce this proof's environment and none was found (looked in {where});"
    f" install it (e.g. pyenv install {version}) or verify on a machine that has it"
  )


def cache_dir() -> str:
  """Where built environments are kept: ``$POL_JAX_CACHE``, else ``$XDG_CACHE_HOME/pol-jax`` or ``~/.cache/pol-jax``.

  Environments live under ``<cache>/envs/``.
  """
  if os.environ.get("POL_JAX_CACHE"):
    return os.environ["POL_JAX_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "pol-jax")


def matches(recorded: dict) -> list[tuple[str, object, object]]:
  """``(field, recorded, installed)`` for each version here that differs from the recorded one.

  Every :data:`PINNED` field is compared with this interpreter's installed
  distribution (``None`` when it is absent), and the ``python`` field by
  ``major.minor`` (its raw value when malformed). An empty list means this
  interpreter can verify the proof as it is.

  >>> import jax, platform
  >>> matches({"jax": jax.__version__, "python": platform.python_version()})[0][0]
  'jaxlib'
  """
  recorded = recorded if isinstance(recorded, dict) else {}
  out: list[tuple[str, object, object]] = []
  for field, dist in PINNED:
    try:
      installed = metadata.version(dist)
    except metadata.PackageNotFoundError:
      installed = None
    if recorded.get(field) != installed:
      out.append((field, recorded.get(field), installed))
  here = _this_python()
  try:
    wanted: object = python_version(recorded)
  except MatchError:
    wanted = recorded.get("python")
  if wanted != here:
    out.append(("python", wanted, here))
  return out


def _run(cmd: list[str], deadline: float, what: str, cwd: str) -> subprocess.CompletedProcess:
  """Runs ``cmd`` without a shell in ``cwd`` until ``deadline``; on timeout kills its whole process group."""
  left = deadline - time.monotonic()
  if left <= 0:
    raise MatchError(f"{what}: ran out of time before it started; pass a larger timeout")
  proc = subprocess.Popen(
    cmd,
    stdin=subprocess.DEVNULL,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=clean_environ(),
    cwd=cwd,
    start_new_session=True,
  )
  try:
    out, _ = proc.communicate(timeout=left)
  except subprocess.TimeoutExpired:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended meanwhile
      pass
    proc.communicate()
    raise MatchError(
      f"{what} did not finish within the timeout; pass a larger timeout, or check the network connection to the index"
    ) from None
  return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _last_line(output: str) -> str:
  lines = [line.strip() for line in output.splitlines() if line.strip()]
  return lines[-1][:300] if lines else "(no output)"


def _pip_reason(output: str) -> str:
  """pip's most telling line: its last ``ERROR:`` other than the ``ResolutionImpossible`` pointer to its docs."""
  errors = [line for line in output.splitlines() if line.startswith("ERROR:") and "ResolutionImpossible" not in line]
  return errors[-1].strip()[:300] if errors else _last_line(output)


def _pip_error(pins: list[str], python: str, output: str) -> MatchError:
  """A pip failure as one line that names the pins pip complained about and says how to proceed."""
  reason = _pip_reason(output)

  def named(text: str) -> list[str]:
    return [p for p in pins if re.search(r"(?<![\w.-])" + re.escape(p) + r"(?![\w.])", text, re.IGNORECASE)]

  which = ", ".join(named(reason) or named(output) or pins)
  if "conflicting dependencies" in reason:
    hint = (
      "the recorded versions cannot be installed together (or with this pol-jax's requirements in pyproject.toml);"
      " verify on a machine that has the recorded environment"
    )
  else:
    hint = (
      "check that the version exists on the package index with a wheel for this Python and platform and that the"
      " index is reachable, or verify on a machine that has the recorded environment"
    )
  return MatchError(f"cannot install {which} for Python {python} on {platform.machine()}: pip: {reason}; {hint}")


def _check_built(python: str, pins: list[str], project_root: str, deadline: float, cwd: str) -> None:
  """Runs the built environment's python: the pinned versions are installed and pol_jax is this project."""
  dists = [p.split("==")[0] for p in pins]
  out = _run([python, "-I", "-c", _CHECK, json.dumps(dists)], deadline, "checking the built environment", cwd)
  if out.returncode != 0:
    raise MatchError(
      f"the built environment cannot import jax: {_last_line(out.stdout)}; the recorded versions install but do not"
      " work together here, so verify on a machine that has the recorded environment"
    )
  try:
    found = json.loads(out.stdout.strip().splitlines()[-1])
  except (ValueError, IndexError):
    raise MatchError(f"the built environment printed no versions: {_last_line(out.stdout)}") from None
  wanted = dict(p.split("==") for p in pins)
  wrong = [f"{d} {found.get(d)} (wanted {v})" for d, v in wanted.items() if found.get(d) != v]
  if found.get("jax.__version__") != wanted["jax"]:
    wrong.append(f"jax.__version__ {found.get('jax.__version__')} (wanted {wanted['jax']})")
  if wrong:
    raise MatchError(
      f"the built environment has the wrong versions: {', '.join(wrong)}; the recorded version strings are not the"
      " ones the packages report, so verify on a machine that has the recorded environment"
    )
  origin = found.get("pol_jax")
  if not (isinstance(origin, str) and os.path.realpath(origin).startswith(project_root + os.sep)):
    raise MatchError(f"the built environment imports pol_jax from {origin}, not from {project_root}")


def _key(python: str, pins: list[str], project_root: str) -> str:
  """The cache key: 16 hex digits of the SHA-256 of the Python version, the sorted pins and the project."""
  return hashlib.sha256(json.dumps([python, sorted(pins), project_root]).encode()).hexdigest()[:16]


def _marker(path: str) -> object:
  try:
    with open(os.path.join(path, MARKER)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _usable(path: str, expected: dict) -> bool:
  """The cheap re-check of a cached environment: its marker matches and its python still exists."""
  return _marker(path) == expected and os.path.exists(os.path.join(path, "bin", "python"))


def _lock(path: str, deadline: float) -> int:
  """An exclusive fcntl lock on ``path``, waited for until ``deadline``; returns the descriptor."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
  while True:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return fd
    except BlockingIOError:
      if time.monotonic() >= deadline:
        os.close(fd)
        raise MatchError(
          f"another process held {path} (building the same environment) past the timeout; wait for it or pass a"
          " larger timeout"
        ) from None
      time.sleep(0.2)


def _build(final: str, python: str, interpreter: str, pins: list[str], project_root: str, deadline: float) -> None:
  """Builds the environment in a temporary sibling of ``final``, checks it and renames it into place."""
  envs = os.path.dirname(final)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=envs)
  try:
    out = _run([interpreter, "-m", "venv", tmp], deadline, f"creating a Python {python} virtual environment", envs)
    if out.returncode != 0:
      raise MatchError(
        f"cannot create a virtual environment with {interpreter}: {_last_line(out.stdout)};"
        f" install its venv module (e.g. apt install python{python}-venv) or another Python {python}"
      )
    venv_python = os.path.join(tmp, "bin", "python")
    wheels = "--only-binary=" + ",".join(p.split("==")[0] for p in pins)  # a proof's version never runs a build
    pip = [venv_python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheels, *pins, "-e", project_root]
    out = _run(pip, deadline, f"pip installing {', '.join(pins)}", envs)
    if out.returncode != 0:
      raise _pip_error(pins, python, out.stdout)
    _check_built(venv_python, pins, project_root, deadline, envs)
    with open(os.path.join(tmp, MARKER), "w") as f:
      json.dump({"python": python, "pins": sorted(pins), "project_root": project_root}, f, indent=2)
    os.rename(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def ensure(
  recorded: dict,
  project_root: str,
  *,
  cache: str | None = None,
  log: Callable[[str], None] = print,
  timeout: float = 1800,
) -> str:
  """The python of a cached virtual environment with exactly the recorded versions, built if needed.

  The environment has the recorded Python ``major.minor``, the :data:`PINNED`
  distributions at their recorded versions and ``project_root`` installed
  editable, all in one pip command so that the resolver honours the pins. It
  lives in ``<cache>/envs/<key>``, ``key`` the first 16 hex digits of the
  SHA-256 of (Python version, sorted pins, real path of ``project_root``). A
  build happens in a temporary sibling directory, is checked by running its
  python (the installed versions and ``jax.__version__`` equal the pins,
  ``pol_jax`` is imported from ``project_root``), gets a marker file
  :data:`MARKER` and is renamed into place, so a directory under its final name
  is complete; builds of the same key are serialised by an fcntl lock
  ``<key>.lock`` beside it, and a leftover of a killed build is removed. A
  cached environment is reused after a cheap check (marker equal, python
  present). Run the returned python with :func:`clean_environ`'s environment;
  console scripts in its ``bin/`` still name the temporary directory, so use
  ``python -m``.

  Args:
    recorded: a proof's ``environment`` (hostile input).
    project_root: this project's source tree (holds ``pyproject.toml``).
    cache: the cache directory; default :func:`cache_dir`.
    log: gets one line when a build starts, nothing on reuse.
    timeout: seconds for everything (waiting for another builder, venv, pip, check).

  Returns:
    The path of the environment's ``bin/python``.

  Raises:
    MatchError: the recorded environment cannot be reproduced here: a malformed
      version, another machine architecture, no interpreter of the recorded
      Python, or pip cannot install the pins (the message names them and
      carries pip's reason).
    ValueError: ``project_root`` has no ``pyproject.toml``.

  Example (it builds an environment, so it is not a doctest)::

    python = ensure(verify.read_manifest(proof_dir)["environment"], ".")
    argv = [python, "-m", "experiments.verify", f"--proof={proof_dir}"]
    subprocess.run(argv, env=clean_environ())
  """
  deadline = time.monotonic() + timeout
  pins = requirements(recorded)
  python = python_version(recorded)
  machine = recorded.get("machine")
  if machine != platform.machine():
    raise MatchError(
      f"recorded environment: field 'machine' is {_show(machine)} and this machine is {platform.machine()!r}:"
      " no package version changes that; verify on a machine of the recorded architecture"
    )
  project_root = os.path.realpath(project_root)
  if not os.path.isfile(os.path.join(project_root, "pyproject.toml")):
    raise ValueError(f"project_root={project_root!r}: no pyproject.toml there")
  key = _key(python, pins, project_root)
  envs = os.path.join(cache or cache_dir(), "envs")
  final = os.path.join(envs, key)
  expected = {"python": python, "pins": sorted(pins), "project_root": project_root}
  if _usable(final, expected):
    return os.path.join(final, "bin", "python")

  interpreter = find_python(python)
  os.makedirs(envs, exist_ok=True)
  fd = _lock(os.path.join(envs, key + ".lock"), deadline)
  try:
    if _usable(final, expected):  # another process built it while this one waited
      return os.path.join(final, "bin", "python")
    # Holding the lock, anything else under this key is a killed build's leftover.
    for name in os.listdir(envs):
      if name == key or name.startswith(key + ".tmp-"):
        shutil.rmtree(os.path.join(envs, name), ignore_errors=True)
    log(f"building a Python {python} environment with {', '.join(pins)} and pol-jax in {final} (once; cached)")
    _build(final, python, interpreter, pins, project_root, deadline)
  finally:
    os.close(fd)
  return os.path.join(final, "bin", "python")
