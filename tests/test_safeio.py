"""pol_jax.safeio: a stranger's files are read without following, blocking or exhausting anything."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from conftest import within
from hypothesis import given, settings
from hypothesis import strategies as st

from pol_jax import safeio


def _tree(root) -> None:
  (root / "a").mkdir()
  (root / "a" / "x.bin").write_bytes(b"12345")
  (root / "b.json").write_text("{}")


def test_walk_lists_regular_files_with_their_sizes_sorted(tmp_path):
  _tree(tmp_path)
  assert safeio.walk(str(tmp_path)) == {"a/x.bin": 5, "b.json": 2}


@pytest.mark.parametrize("where", ["top", "nested"])
@pytest.mark.parametrize("what", ["file link", "directory link", "fifo"])
def test_walk_refuses_a_link_or_a_fifo_anywhere_without_following_or_blocking(tmp_path, what, where):
  _tree(tmp_path)
  parent = tmp_path if where == "top" else tmp_path / "a"
  bad = parent / "bad"
  if what == "file link":
    bad.symlink_to(tmp_path / "b.json")
  elif what == "directory link":
    bad.symlink_to(tmp_path.parent)  # a walk that followed it would list another tree
  else:
    os.mkfifo(bad)
  error = within(lambda: safeio.walk(str(tmp_path)), fifo=str(bad))
  rel = "bad" if where == "top" else "a/bad"
  assert isinstance(error, safeio.Refused), repr(error)
  assert error.file == rel and ("symbolic link" in error.reason or "FIFO" in error.reason), error


def test_walk_refuses_a_root_that_is_a_link_and_bounds_entries_and_depth(tmp_path):
  _tree(tmp_path)
  link = tmp_path.parent / f"{tmp_path.name}-link"
  link.symlink_to(tmp_path)
  with pytest.raises(safeio.Refused, match="a symbolic link, not a directory"):
    safeio.walk(str(link))
  with pytest.raises(safeio.Refused, match="more than 2 entries"):
    safeio.walk(str(tmp_path), max_entries=2)
  deep = tmp_path / "d1" / "d2" / "d3"
  deep.mkdir(parents=True)
  with pytest.raises(safeio.Refused, match="nested deeper than 2 levels") as e:
    safeio.walk(str(tmp_path), max_depth=2)
  assert e.value.file == "d1/d2/d3"


@pytest.mark.parametrize("name", ["tab\there", "back\\slash", "bell\x07"])
def test_walk_refuses_names_with_control_characters_or_backslashes(tmp_path, name):
  (tmp_path / name).write_text("x")
  with pytest.raises(safeio.Refused, match="control character or backslash"):
    safeio.walk(str(tmp_path))


def test_open_regular_refuses_links_fifos_directories_and_missing_files_in_one_line(tmp_path):
  target = tmp_path / "t"
  target.write_bytes(b"data")
  (tmp_path / "link").symlink_to(target)
  os.mkfifo(tmp_path / "fifo")  # opening it for reading would block until a writer came
  (tmp_path / "dir").mkdir()
  cases = {"link": "a symbolic link", "fifo": "a FIFO", "dir": "a directory", "missing": "missing"}
  for name, words in cases.items():
    error = within(lambda n=name: safeio.open_regular(str(tmp_path / n), n), fifo=str(tmp_path / "fifo"))
    assert isinstance(error, safeio.Refused), repr(error)
    assert error.file == name and words in error.reason and "\n" not in str(error), error
  with safeio.open_regular(str(target), "t") as f:
    assert f.read() == b"data"


def test_read_bytes_and_file_digest_hold_a_file_to_its_bound(tmp_path):
  path = tmp_path / "f"
  path.write_bytes(b"x" * 100)
  assert safeio.read_bytes(str(path), 100, "f") == b"x" * 100
  with pytest.raises(safeio.Refused, match="100 bytes is over the 99-byte limit"):
    safeio.read_bytes(str(path), 99, "f")
  assert safeio.file_digest(str(path), 100) == hashlib.sha256(b"x" * 100).hexdigest()
  with pytest.raises(safeio.Refused, match="more than 51 bytes, expected 50"):
    safeio.file_digest(str(path), 50, "f")
  with pytest.raises(safeio.Refused, match="100 bytes, expected 101"):
    safeio.file_digest(str(path), 101, "f")


@pytest.mark.parametrize(
  "data, words",
  [
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b"[" + b"1" * 41 + b"]", "an integer of 41 digits"),
    (b"[NaN]", "non-standard constant NaN"),
    (b"[-Infinity]", "non-standard constant -Infinity"),
    (b"[1e999]", "not finite"),
    (b'"\xff"', "not UTF-8"),
    (b"[" * 65 + b"]" * 65, "nested 65 levels deep"),
    (b"[" * 1_000_000, "nested 1000000 levels deep"),  # refused by the linear scan, no recursion
    (b'{"a": ', "does not parse"),
    (b"", "does not parse"),
  ],
)
def test_loads_json_refuses_what_strict_json_is_not_in_one_line(data, words):
  with pytest.raises(safeio.Refused) as e:
    safeio.loads_json(data, "x.json")
  assert e.value.file == "x.json" and words in e.value.reason and "\n" not in str(e.value), e.value


TEXT = st.text(alphabet=st.sampled_from('ab[]{}"\\\n/u'), max_size=8)
JSON = st.recursive(
  st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
  lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
  max_leaves=20,
)


def _depth(value) -> int:
  if isinstance(value, list):
    return 1 + max((_depth(v) for v in value), default=0)
  if isinstance(value, dict):
    return 1 + max((_depth(v) for v in value.values()), default=0)
  return 0


@settings(max_examples=300, deadline=None)
@given(value=JSON, ascii_only=st.booleans())
def test_json_depth_counts_nesting_as_the_parser_sees_it_whatever_the_strings_hold(value, ascii_only):
  data = json.dumps(value, ensure_ascii=ascii_only).encode()
  assert safeio.json_depth(data) == _depth(value)
  assert safeio.loads_json(data, "x.json", max_depth=_depth(value)) == json.loads(data)
