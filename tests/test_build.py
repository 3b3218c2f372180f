"""pol_jax.build: the config -> program builder and its limits.

The verifier decides what it builds and reads: a proof's config cannot choose the data or the model size.
"""

from __future__ import annotations

import time

import pytest
from conftest import reseal, smoke_config

from pol_jax import build, proof


def test_a_proof_supplied_data_directory_is_refused(honest, copy_of):
  forged = copy_of(honest)
  reseal(forged, lambda m: m["config"].update(data_dir="/tmp/the-forgers-own-copy"))
  with pytest.raises(proof.ProofError, match=r"config.data_dir: unknown field"):
    build.rebuild(forged)


def test_the_builder_knows_exactly_the_fields_of_the_default_config_and_every_config_uses_only_those():
  import importlib
  import pkgutil

  from experiments import configs
  from experiments.configs import default

  assert set(default.get_config()) == build.FIELDS
  for m in pkgutil.iter_modules(configs.__path__):
    config = importlib.import_module(f"experiments.configs.{m.name}").get_config()
    assert set(config) <= build.FIELDS, m.name


def test_the_tests_smoke_config_is_the_default_configs_smoke_variant():
  from experiments.configs import default

  ours = smoke_config("cnn", owner="")  # conftest builds it with the library only
  assert ours.to_dict() == default.get_config("smoke").to_dict()
  assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in default.get_config("smoke").items()}


def test_the_data_come_from_the_verifiers_own_directory(monkeypatch, tmp_path):
  from experiments.configs import cifar10_resnet20

  c = cifar10_resnet20.get_config("smoke")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "verifiers"))
  with pytest.raises(build.ConfigError, match=str(tmp_path / "verifiers")):
    build.dataset(c)


@pytest.mark.parametrize(
  "edit, words",
  [
    (lambda c: c.update(features=[100_000_000]), "config.model: 6,400,000,000+"),
    (lambda c: c.update(features=[8] * 3000), "config.features: 3000 layers is over the 256-layer limit"),
    (lambda c: c.update(features=[20_000, 20_000]), "over this verifier's limit of 250,000,000"),
  ],
)
def test_a_huge_model_config_is_refused_before_it_is_built(honest, copy_of, edit, words):
  forged = copy_of(honest)
  reseal(forged, lambda m: edit(m["config"]))
  t0 = time.perf_counter()
  with pytest.raises(proof.ProofError) as e:
    build.rebuild(forged)
  assert time.perf_counter() - t0 < 30
  message = str(e.value)
  if words.endswith("+"):  # at least that many parameters
    assert "parameters is over this verifier's limit" in message and message.startswith("manifest.json: config.model")
  else:
    assert words in message, message
