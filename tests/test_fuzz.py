"""Fuzzing: mutated proofs are rejected with a one-line reason, never accepted, never crash.

``POL_FUZZ_EXAMPLES`` sets the number of mutations (default 40, for CI; use
thousands for a long run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
from conftest import smoke_config
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pol_jax import build, challenge, fingerprint, proof, verifier

EXAMPLES = int(os.environ.get("POL_FUZZ_EXAMPLES", "40"))
VALUES = st.one_of(
  st.none(),
  st.booleans(),
  st.integers(min_value=-(2**70), max_value=2**70),
  st.floats(allow_nan=True),
  st.text(max_size=20),
  st.lists(st.integers(), max_size=3),
  st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _files(root: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _mutate(p: str, kind: str, draw) -> str:
  files = _files(p)
  name = os.path.join(p, files[draw(st.integers(0, len(files) - 1))])
  if kind == "flip":
    data = bytearray(open(name, "rb").read())
    if data:
      data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
      open(name, "wb").write(bytes(data))
  elif kind == "truncate":
    data = open(name, "rb").read()
    open(name, "wb").write(data[: draw(st.integers(0, max(0, len(data) - 1)))])
  elif kind == "delete":
    os.remove(name)
  elif kind == "duplicate":
    source = os.path.join(p, files[draw(st.integers(0, len(files) - 1))])
    if source != name:
      shutil.copyfile(source, name)
  elif kind in ("json", "json-resealed"):
    path = os.path.join(p, proof.MANIFEST)
    manifest = json.load(open(path))
    body = {k: v for k, v in manifest.items() if k != "root"}
    target = body
    key = draw(st.sampled_from(sorted(body)))
    keys = [key]
    while isinstance(target[key], dict) and target[key] and draw(st.booleans()):
      target = target[key]
      key = draw(st.sampled_from(sorted(target)))
      keys.append(key)
    value = draw(VALUES)
    if type(value) is type(target[key]) and value == target[key]:
      return ".".join(keys)  # the same value: no mutation (the file stays as it was)
    target[key] = value
    out = proof.seal(body) if kind == "json-resealed" else {**body, "root": manifest["root"]}
    open(path, "w").write(json.dumps(out))
    return ".".join(keys)
  elif kind == "swap-checkpoints":  # two recorded states trade places: two batches, or two metas in a batch
    batches = [str(b) for b in proof.batches(p)]
    if len(batches) >= 2 and draw(st.booleans()):
      a, b = draw(st.lists(st.sampled_from(batches), min_size=2, max_size=2, unique=True))
      ca, cb = (os.path.join(p, proof.CHECKPOINTS, s) for s in (a, b))
      os.rename(ca, ca + ".tmp")
      os.rename(cb, ca)
      os.rename(ca + ".tmp", cb)
    else:
      path = os.path.join(p, proof.CHECKPOINTS, draw(st.sampled_from(batches)), "meta", "metadata")
      meta = json.load(open(path))
      states = meta["states"]
      if len(states) >= 2:
        a, b = draw(st.lists(st.sampled_from(sorted(states, key=int)), min_size=2, max_size=2, unique=True))
        states[a], states[b] = states[b], states[a]
        open(path, "w").write(json.dumps(meta))
  elif kind == "absurd-shape":
    path = os.path.join(p, proof.INDICES)
    shape = draw(st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)))
    with open(path, "wb") as f:
      np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False, "shape": shape})
  return os.path.basename(name)


# Manifest fields that are reported, not checked: they change no bit of a CPU replay (measured), so a
# resealed proof that edits one claims nothing false about its states.
REPORTED = {f"environment.{f}" for f in (*fingerprint.INFO_FIELDS, *fingerprint.CPU_NEUTRAL_FIELDS)}


@settings(
  max_examples=EXAMPLES,
  deadline=None,
  derandomize=True,
  phases=[Phase.explicit, Phase.generate],  # Shrinking replays minutes of verifications; the example is printed.
  suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
  kind=st.sampled_from(
    ["flip", "truncate", "delete", "duplicate", "json", "json-resealed", "swap-checkpoints", "absurd-shape"]
  ),
  data=st.data(),
)
def test_mutated_proofs_are_rejected_cleanly(honest, kind, data):
  config = smoke_config()
  train = build.dataset(config, "train")
  program = build.program(config, train)
  with tempfile.TemporaryDirectory() as tmp:
    p = os.path.join(tmp, "proof")
    shutil.copytree(honest, p)
    before = _files(p)
    touched = _mutate(p, kind, data.draw)
    changed = _files(p) != before or any(
      open(os.path.join(p, f), "rb").read() != open(os.path.join(honest, f), "rb").read() for f in before
    )
    try:
      verdict = verifier.verify(p, program, train, challenge=challenge.All())
    except proof.ProofError as e:  # Unusable input: one line naming the file and the field.
      assert "\n" not in str(e) and e.file and e.field, repr(e)
      return
    if not changed:
      return
    if not verdict.accepted:
      if verdict.status == "undecided":  # A resealed environment this verifier cannot reproduce.
        assert kind == "json-resealed" and not verdict.failed, verdict.table()
        assert "\n" not in verdict.checks[1].detail
        return
      assert verdict.failed and all("\n" not in c.detail for c in verdict.failed)
      return
    # Accepted: the root covers every byte of the proof (its ``files`` listing), so only a resealed
    # reported-only field may have changed; every proven array must be exactly the honest one.
    assert kind == "json-resealed" and touched in REPORTED, (kind, touched)
    template = jax.eval_shape(program.init, jax.random.key(0))
    manifest = json.load(open(os.path.join(honest, proof.MANIFEST)))
    for step, digest in manifest["checkpoints"].items():
      ours, _ = proof.restore(p, int(step), template, digest)
      theirs, _ = proof.restore(honest, int(step), template, digest)
      for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
