"""The Flax NNX MNIST tutorial's training loop, on digits, recorded and verified.

  python examples/nnx_tutorial.py [WORKDIR]                 # plain loop, then the same loop recorded
  PYTHONPATH=examples python -m experiments.train --program=nnx_tutorial:build \
      --config=examples/nnx_tutorial.py --workdir=runs/tutorial
  PYTHONPATH=examples python -m experiments.verify --proof=runs/tutorial/proof --program=nnx_tutorial:build

The model, ``loss_fn`` and ``train_step`` are the tutorial's: the model keeps
its own ``nnx.Rngs`` for dropout, the step takes ``(model, optimizer,
metrics, batch)``, updates all three in place and returns nothing, and the
batches are dicts. The lines marked ``# pol-jax`` are what recording adds.
"""

import sys
import time

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from pol_jax import challenge, data, integrations, ownership, proof, recorder, sampling, training, verifier  # pol-jax


class CNN(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    self.avg_pool = lambda x: nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(32 * 2 * 2, 64, rngs=rngs)
    self.dropout = nnx.Dropout(rate=0.1, rngs=rngs)
    self.linear2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.conv1(x)))
    x = self.avg_pool(nnx.relu(self.conv2(x)))
    x = x.reshape(x.shape[0], -1)
    return self.linear2(self.dropout(nnx.relu(self.linear1(x))))


def create(key):  # pol-jax: the tutorial's objects, built from the committed seed's key
  model = CNN(rngs=nnx.Rngs(key))
  optimizer = nnx.Optimizer(model, optax.adamw(0.005, 0.9), wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  return model, optimizer, metrics


def loss_fn(model: CNN, batch):
  logits = model(batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits=logits, labels=batch["label"]).mean()
  return loss, logits


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch):
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])
  optimizer.update(model, grads)


def digits(split: str) -> data.Examples:
  d = data.load_digits(split)
  return data.Examples(f"digits-float:{split}", {"image": d.inputs.astype(np.float32) / 16.0, "label": d.labels})


def get_config():  # the CLI's --config (and the plan)
  c = ml_collections.ConfigDict()
  c.owner, c.seed, c.k, c.steps, c.batch_size, c.runner = "", 0, 20, 200, 32, "loop"
  return c


def build(config: dict):  # pol-jax: what experiments.train/verify --program=nnx_tutorial:build calls
  return integrations.nnx_program(create, train_step), digits("train")


def plain(steps: int, batch_size: int, order: np.ndarray, train: data.Examples) -> float:
  """The tutorial's loop as it is, over the same batches: its seconds."""
  model, optimizer, metrics = create(jax.random.key(0))
  t0 = time.perf_counter()
  for step in range(steps):
    train_step(model, optimizer, metrics, train.batch(order[step]))
  jax.block_until_ready(nnx.state(model))
  return time.perf_counter() - t0


def main(workdir: str = "runs/tutorial") -> verifier.Verdict:
  config = get_config()
  program, train = build(config.to_dict())
  owner, _ = ownership.ensure_key(f"{workdir}/owner.key")  # pol-jax
  plan = proof.Plan(owner, 0, config.k, config.steps, config.batch_size, config.runner)  # pol-jax
  order = sampling.index_log(training.derive_keys(plan.seed).order, len(train), plan.batch_size, plan.steps)
  plain(plan.steps, plan.batch_size, order, train)  # warm-up: compilation is nobody's cost
  seconds = plain(plan.steps, plan.batch_size, order, train)
  recorder.record(f"{workdir}/warm-up/proof", program, train, plan, config=config.to_dict())  # compiles
  t0 = time.perf_counter()
  manifest = recorder.record(f"{workdir}/proof", program, train, plan, config=config.to_dict())  # pol-jax
  recorded = time.perf_counter() - t0
  _, _, metrics = program.objects(recorder.final_state(f"{workdir}/proof", program, manifest))
  print(f"plain loop {seconds:.2f} s, recorded {recorded:.2f} s: {recorded / seconds:.2f}x (both compiled before)")
  print(f"training metrics: { ({k: round(float(v), 4) for k, v in metrics.compute().items()}) }")
  return verifier.verify(f"{workdir}/proof", program, train, challenge=challenge.All())  # pol-jax


if __name__ == "__main__":
  verdict = main(*sys.argv[1:])
  print(verdict.table())
  sys.exit(0 if verdict.accepted else 1)
