"""Reading files that a stranger wrote: no links, no FIFOs, bounded sizes, strict JSON.

Internal to pol-jax (no stability promise); the public API is in ``pol_jax/__init__.py``.

A proof, a commitment and a model file are hostile input. Everything here
refuses what could hang the reader (a FIFO, a device), redirect it (a
symbolic link, anywhere in a walked tree) or exhaust it (a file longer than
its bound, JSON nested deeper than the stack, an integer of thousands of
digits), and says which file and why in one line, as a :class:`Refused`.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> _ = open(os.path.join(d, "a.json"), "w").write('{"n": 1}')
>>> walk(d)
{'a.json': 8}
>>> loads_json(read_bytes(os.path.join(d, "a.json"), 100, "a.json"), "a.json")
{'n': 1}
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
from typing import Any, BinaryIO

import numpy as np

MAX_ENTRIES = 1 << 20
MAX_DEPTH = 32
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 40

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CHUNK = 1 << 20


class Refused(Exception):
  """An untrusted file that was not read, or not accepted: ``file: field: reason``."""

  def __init__(self, file: str, field: str, reason: str):
    super().__init__(f"{file}: {field}: {reason}")
    self.file, self.field, self.reason = file, field, reason


def kind(mode: int) -> str:
  """What a ``st_mode`` is, in words (for refusals)."""
  for test, name in (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISREG, "a regular file"),
  ):
    if test(mode):
      return name
  return "not a regular file"


# ----------------------------------------------------------------------------
# Trees


def walk(root: str, *, max_entries: int = MAX_ENTRIES, max_depth: int = MAX_DEPTH) -> dict[str, int]:
  """``{relative POSIX path: size}`` of every regular file under ``root``, sorted.

  Nothing is followed: ``root`` itself and every entry below it must be a
  regular file or a directory (``lstat``), so a symbolic link, a FIFO, a
  device or a socket anywhere is refused, as are more than ``max_entries``
  entries, directories nested deeper than ``max_depth`` and names that are not
  clean UTF-8.

  Raises:
    Refused: naming the entry (relative to ``root``) and what it is.
  """
  try:
    mode = os.lstat(root).st_mode
  except OSError as e:
    raise Refused(root, "directory", f"unreadable ({e.strerror})") from None
  if not stat.S_ISDIR(mode):
    raise Refused(root, "directory", f"{kind(mode)}, not a directory, refused")
  files: dict[str, int] = {}
  pending, count = [("", 0)], 0
  while pending:
    rel, depth = pending.pop()
    for name, mode, size in _entries(root, rel):
      count += 1
      if count > max_entries:
        raise Refused(root, "directory", f"more than {max_entries} entries, refused")
      path = f"{rel}/{name}" if rel else name
      if stat.S_ISDIR(mode):
        if depth + 1 > max_depth:
          raise Refused(path, "directory", f"nested deeper than {max_depth} levels, refused")
        pending.append((path, depth + 1))
      elif stat.S_ISREG(mode):
        files[path] = size
      else:
        raise Refused(path, "file", f"{kind(mode)}, refused (only regular files and directories are read)")
  return dict(sorted(files.items()))


def _entries(root: str, rel: str) -> list[tuple[str, int, int]]:
  """``(name, st_mode, st_size)`` of every entry of one directory, not followed."""
  out = []
  try:
    with os.scandir(os.path.join(root, rel)) as it:
      for entry in it:
        _check_name(entry.name, rel)
        st = entry.stat(follow_symlinks=False)
        out.append((entry.name, st.st_mode, st.st_size))
  except OSError as e:
    raise Refused(rel or root, "directory", f"unreadable ({e.strerror})") from None
  return out


def _check_name(name: str, rel: str) -> None:
  try:
    name.encode("utf-8")
  except UnicodeEncodeError:
    raise Refused(rel or ".", "file", f"a name that is not UTF-8 ({name!r:.60}), refused") from None
  if any(ord(c) < 32 or c in "\\\x7f" for c in name):
    raise Refused(rel or ".", "file", f"a name with a control character or backslash ({name!r:.60}), refused")


# ----------------------------------------------------------------------------
# Files


def is_real_dir(path: str) -> bool:
  """Whether ``path`` is a directory itself: not a link to one, not missing or unreadable."""
  try:
    return stat.S_ISDIR(os.lstat(path).st_mode)
  except OSError:
    return False


def open_regular(path: str, label: str) -> BinaryIO:
  """A binary file object on ``path``: not followed, never blocking, a regular file.

  Raises:
    Refused: missing, a link, a FIFO, a device, a directory, unreadable.
  """
  try:
    mode = os.lstat(path).st_mode  # Refuse a device before opening it: opening one can act.
    if not stat.S_ISREG(mode):
      raise Refused(label, "file", f"{kind(mode)}, refused (only regular files are read)")
    fd = os.open(path, _OPEN_FLAGS)
  except FileNotFoundError:
    raise Refused(label, "file", "missing") from None
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise Refused(label, "file", "a symbolic link, refused") from None
    raise Refused(label, "file", f"unreadable ({e.strerror})") from None
  mode = os.fstat(fd).st_mode  # What was opened, not what lstat saw a moment before.
  if not stat.S_ISREG(mode):
    os.close(fd)
    raise Refused(label, "file", f"{kind(mode)}, refused (only regular files are read)")
  return os.fdopen(fd, "rb", buffering=0)


def read_bytes(path: str, limit: int, label: str) -> bytes:
  """The bytes of the regular file ``path``, refusing more than ``limit`` of them.

  The size is taken from the open descriptor and the read stops at
  ``limit + 1`` bytes, so a file that grows while it is read is refused too.

  Raises:
    Refused: see :func:`open_regular`; or over ``limit`` bytes.
  """
  with open_regular(path, label) as f:
    size = os.fstat(f.fileno()).st_size
    if size > limit:
      raise Refused(label, "size", f"{size} bytes is over the {limit}-byte limit")
    data = _read_at_most(f, limit + 1, label)
  if len(data) > limit:
    raise Refused(label, "size", f"over the {limit}-byte limit")
  return data


def _chunks(f: BinaryIO, n: int, label: str):
  """The bytes of ``f``, in chunks, until its end or ``n`` bytes."""
  got = 0
  while got < n:
    try:
      chunk = f.read(min(_CHUNK, n - got))
    except OSError as e:
      raise Refused(label, "file", f"unreadable ({e.strerror})") from None
    if not chunk:
      return
    got += len(chunk)
    yield chunk


def _read_at_most(f: BinaryIO, n: int, label: str) -> bytes:
  return b"".join(_chunks(f, n, label))


def file_digest(path: str, size: int, label: str | None = None) -> str:
  """SHA-256 (hex) of the regular file ``path``, which must hold exactly ``size`` bytes.

  Reads at most ``size + 1`` bytes through a no-follow, non-blocking
  descriptor.

  Raises:
    Refused: see :func:`open_regular`; or a file longer or shorter than ``size``.
  """
  label = label or path
  h, got = hashlib.sha256(), 0
  with open_regular(path, label) as f:
    for chunk in _chunks(f, size + 1, label):
      h.update(chunk)
      got += len(chunk)
  if got != size:
    raise Refused(label, "size", f"{'more than ' if got > size else ''}{got} bytes, expected {size}")
  return h.hexdigest()


# ----------------------------------------------------------------------------
# JSON


class _Bad(Exception):
  def __init__(self, field: str, reason: str):
    super().__init__(reason)
    self.field, self.reason = field, reason


def loads_json(data: bytes, label: str, *, max_depth: int = MAX_JSON_DEPTH, max_digits: int = MAX_INT_DIGITS) -> Any:
  """Strict JSON: UTF-8, nested at most ``max_depth`` deep, integers of at
  most ``max_digits`` digits, finite numbers only, no duplicate keys.

  The depth is measured by a linear scan before parsing, so no input reaches
  the parser's recursion limit.

  >>> loads_json(b'{"a": [1, 2.5]}', "x.json")
  {'a': [1, 2.5]}
  >>> loads_json(b'[1e400]', "x.json")
  Traceback (most recent call last):
  ...
  pol_jax.safeio.Refused: x.json: json: the number 1e400 is not finite

  Raises:
    Refused: ``label: json: reason`` (or ``label: json.depth: ...``).
  """
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise Refused(label, "json", f"not UTF-8 (byte {e.start})") from None
  depth = json_depth(data)
  if depth > max_depth:
    raise Refused(label, "json", f"nested {depth} levels deep, over the {max_depth}-level limit")
  try:
    return json.loads(
      text,
      parse_int=lambda s: _parse_int(s, max_digits),
      parse_float=_parse_float,
      parse_constant=_parse_constant,
      object_pairs_hook=_unique_keys,
    )
  except _Bad as e:
    raise Refused(label, e.field, e.reason) from None
  except json.JSONDecodeError as e:
    raise Refused(label, "json", f"does not parse ({e})") from None
  except RecursionError:  # Not reached after the depth scan; kept so no input gives a traceback.
    raise Refused(label, "json", "nested too deeply") from None


def json_depth(data: bytes) -> int:
  """The deepest nesting of ``[`` and ``{`` outside strings: linear, no recursion.

  Escapes are dropped first (pairs of backslashes, then a backslash and its
  quote), so the remaining quotes delimit strings exactly as a JSON parser
  sees them up to its first error.

  >>> json_depth(b'{"a": [[1], "]]]["]}')
  3
  """
  plain = data.replace(b"\\\\", b"").replace(b'\\"', b"")
  deepest, level, quotes = 0, 0, 0
  for start in range(0, len(plain), _CHUNK):
    chunk = np.frombuffer(plain, np.uint8, min(_CHUNK, len(plain) - start), start)
    in_string = (quotes + np.cumsum(chunk == ord('"'), dtype=np.int64)) & 1
    opens = (chunk == ord("[")) | (chunk == ord("{"))
    closes = (chunk == ord("]")) | (chunk == ord("}"))
    levels = level + np.cumsum(np.where(in_string, 0, opens.astype(np.int8) - closes), dtype=np.int64)
    deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    quotes += int(np.count_nonzero(chunk == ord('"')))
  return deepest


def _parse_int(text: str, max_digits: int) -> int:
  digits = len(text.lstrip("-"))
  if digits > max_digits:
    raise _Bad("json", f"an integer of {digits} digits, over the {max_digits}-digit limit")
  return int(text)


def _parse_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise _Bad("json", f"the number {text:.40} is not finite")
  return value


def _parse_constant(name: str):
  raise _Bad("json", f"the non-standard constant {name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
  out = {}
  for key, value in pairs:
    if key in out:
      raise _Bad("json", f"duplicate key {key!r:.60}")
    out[key] = value
  return out
