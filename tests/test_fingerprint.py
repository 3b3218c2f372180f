"""pol_jax.fingerprint: the environment a proof records, which fields must match, and the XLA flags."""

from __future__ import annotations

import pytest

from pol_jax import fingerprint


def test_environment_fingerprint_ignores_the_forced_device_count():
  flags = "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=true"
  assert fingerprint.numeric_xla_flags(flags) == "--xla_cpu_enable_fast_math=true"
  env = fingerprint.environment()
  assert set(env) == set(fingerprint.EXACT_FIELDS) | set(fingerprint.INFO_FIELDS)
  assert "device_count" in fingerprint.INFO_FIELDS and "device_count" not in fingerprint.EXACT_FIELDS
  assert fingerprint.mismatches(env, {**env, "device_count": 8}) == []
  assert fingerprint.mismatches(env, {**env, "cpu_threads": 64}) == [("cpu_threads", env["cpu_threads"], 64)]


def test_environment_fields_record_the_forced_device_count_and_what_cpu_ignores():
  flags = "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=true"
  assert fingerprint.numeric_xla_flags(flags) == "--xla_cpu_enable_fast_math=true"
  assert fingerprint.host_devices(flags) == 8 and fingerprint.host_devices("") is None
  env = fingerprint.environment()
  assert set(env) == set(fingerprint.EXACT_FIELDS) | set(fingerprint.INFO_FIELDS)
  assert fingerprint.mismatches(env, {**env, "device_count": 8}) == []
  assert fingerprint.mismatches(env, {**env, "host_devices": 8}) == [("host_devices", env["host_devices"], 8)]
  assert fingerprint.mismatches(env, {**env, "cpu_threads": 64}) == [("cpu_threads", env["cpu_threads"], 64)]
  # Measured: no matmul precision changed a bit on CPU, so a CPU proof reports it and does not match it.
  assert fingerprint.mismatches(env, {**env, "matmul_precision": "highest"}) == []
  gpu = {**env, "backend": "gpu"}
  assert fingerprint.mismatches(gpu, {**gpu, "matmul_precision": "highest"}) != []


def test_a_pinned_isa_the_cpu_lacks_is_named(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor : 0\nflags : fpu sse4_2 avx avx2\n")
  assert fingerprint.lacking_isa("--xla_cpu_max_isa=AVX512", str(cpuinfo)) == "AVX512"
  assert fingerprint.lacking_isa("--xla_cpu_max_isa=AVX2", str(cpuinfo)) is None
  assert fingerprint.lacking_isa("", str(cpuinfo)) is None
  with pytest.raises(ValueError, match="names an ISA XLA does not know"):
    fingerprint.reproducible_flags({"xla_flags": "--xla_cpu_max_isa=BOGUS"})


@pytest.mark.parametrize(
  "flags, words",
  [
    ("--xla_cpu_enable_fast_math=banana", "not a value XLA parses for --xla_cpu_enable_fast_math"),
    ("--xla_gpu_autotune_level=99999999999999999999", "not a value XLA parses for --xla_gpu_autotune_level"),
    ("--xla_cpu_experimental_ynn_fusion_type=zzz", "not a value XLA parses"),
    ("--xla_cpu_max_isa=AVX2 --xla_cpu_max_isa=AVX512", "--xla_cpu_max_isa is set twice"),
  ],
)
def test_a_recorded_flag_value_xla_cannot_parse_is_never_set(flags, words):
  """XLA's flag parser kills the process on such a value: a proof naming one crashed the verifier (exit 1)."""
  with pytest.raises(ValueError, match=words):
    fingerprint.reproducible_flags({"xla_flags": flags})
  honest = "--xla_cpu_experimental_ynn_fusion_type=+eltwise --xla_cpu_max_isa=AVX2 --xla_gpu_autotune_level=0"
  assert fingerprint.reproducible_flags({"xla_flags": honest}) == honest
