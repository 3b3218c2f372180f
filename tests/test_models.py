"""pol_jax.models: the CIFAR ResNets at the paper's sizes, and the fused BatchNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import record, smoke_config

from pol_jax import build, challenge, store, verifier
from pol_jax.models import resnet


@pytest.mark.parametrize(
  "name, count",
  [("resnet20", 269722), ("resnet32", 464154), ("resnet44", 658586), ("resnet56", 853018), ("resnet110", 1727962)],
)
def test_cifar_resnets_have_the_papers_sizes(name, count):
  _, init_fn = resnet.build(name)
  params, _ = jax.eval_shape(init_fn, jax.random.key(0))
  # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M parameters.
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == count


@pytest.mark.parametrize("model", ["tiny_resnet20", "tiny_resnet18", "tiny_resnet50"])
def test_every_resnet_records_and_verifies_exactly_with_batchnorm_statistics(tmp_path, model):
  config = smoke_config(model, augment="crop_flip", steps=8, k=4)
  path = str(tmp_path / "proof")
  record(path, config)
  program, train = build.rebuild(path)
  verdict = verifier.verify(path, program, train, challenge=challenge.All())
  assert verdict.accepted, verdict.table()
  stats = [p for p in store.read_meta(path, 8, None)["leaves"] if p.startswith("model_state/")]
  assert any(p.endswith("/mean") for p in stats) and any(p.endswith("/var") for p in stats), stats


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50"])
def test_no_max_pool_in_the_training_step(name):
  import optax

  from pol_jax import training

  apply_fn, init_fn = resnet.build(name)
  tx = optax.sgd(0.1)
  params, model_state = init_fn(jax.random.key(0))
  state = training.init_state(params, tx, model_state)
  step = training.make_step(apply_fn, training.cross_entropy, tx)
  batch = (np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int32))
  text = jax.jit(step).lower(state, batch, jax.random.key(0)).as_text()
  # Max-pool lowers to reduce_window and its gradient to select_and_scatter (no deterministic GPU kernel).
  assert "reduce_window" not in text and "select_and_scatter" not in text


def test_the_fused_batchnorm_computes_nnx_batchnorms_values_gradients_and_statistics():
  from flax import nnx

  from pol_jax.models._norm import BatchNorm

  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 12)) * 3 + 1
  w = jax.random.normal(jax.random.key(1), x.shape)
  ours, ref = BatchNorm(12, momentum=0.9, rngs=nnx.Rngs(0)), nnx.BatchNorm(12, momentum=0.9, rngs=nnx.Rngs(0))
  assert [p for p, _ in nnx.state(ours).flat_state()] == [p for p, _ in nnx.state(ref).flat_state()]  # same leaves

  def loss(module, x):
    y = module(x)
    return (y * w).sum() + (y**2).sum()

  grads = {}
  for name, module in (("ours", ours), ("ref", ref)):
    module.train()
    grads[name] = nnx.grad(loss, argnums=(0, 1))(module, x)
  (gm, gx), (rm, rx) = grads["ours"], grads["ref"]
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5 * float(jnp.abs(rx).max()))
  np.testing.assert_allclose(gm.scale[...], rm.scale[...], rtol=1e-5)
  np.testing.assert_allclose(gm.bias[...], rm.bias[...], rtol=1e-5)
  np.testing.assert_allclose(ours.mean[...], ref.mean[...], rtol=1e-6)
  np.testing.assert_allclose(ours.var[...], ref.var[...], rtol=1e-6)
  ours.eval(), ref.eval()
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6, atol=1e-6)
