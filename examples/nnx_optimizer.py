"""Record and verify a proof for an existing Flax NNX training loop.

  python examples/nnx_optimizer.py [WORKDIR]

An NNX model (BatchNorm and dropout) with ``nnx.Optimizer`` and a usual
``nnx.jit`` train step that updates the model in place; the lines marked
``# pol-jax`` are all it takes: ``create`` builds model and optimizer from a
key, the step takes the per-step key (for dropout) and returns metrics, and
``nnx_program`` turns the two into the pure program pol-jax records.
"""

import sys

import jax.numpy as jnp
import optax
from flax import nnx

from pol_jax import challenge, data, integrations, ownership, proof, recorder, verifier  # pol-jax


class CNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.dropout = nnx.Dropout(0.1)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x, rngs=None):
    x = x.astype(jnp.float32) / 16.0
    x = nnx.relu(self.bn(self.conv1(x)))
    x = nnx.relu(self.conv2(x)).mean(axis=(1, 2))
    return self.head(self.dropout(x, rngs=rngs))


def create(key):  # pol-jax: model and optimizer from the committed seed's init key
  model = CNN(nnx.Rngs(key))
  return model, nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=1e-4), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, batch, key):  # pol-jax: takes the step key, returns metrics
  x, y = batch

  def loss_fn(model):
    logits = model(x, rngs=nnx.Rngs(dropout=key))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return {"loss": loss}


def main(workdir: str = "runs/nnx") -> verifier.Verdict:
  program = integrations.nnx_program(create, train_step)  # pol-jax
  train = data.load_digits("train")
  owner, _ = ownership.ensure_key(f"{workdir}/owner.key")  # pol-jax: the key the proof is bound to
  plan = proof.Plan(owner=owner, nonce=0, k=20, steps=120, batch_size=32, runner="loop")  # pol-jax
  manifest = recorder.record(f"{workdir}/proof", program, train, plan, config={"example": "nnx"})  # pol-jax
  state = recorder.final_state(f"{workdir}/proof", program, manifest)
  model, _ = program.objects(state)  # the trained model, as an NNX module again
  model.eval()
  test = data.load_digits("test")
  accuracy = float(jnp.mean(jnp.argmax(model(jnp.asarray(test.inputs)), -1) == jnp.asarray(test.labels)))
  print(f"held-out accuracy {accuracy:.4f}")
  return verifier.verify(f"{workdir}/proof", program, train, challenge=challenge.All())  # pol-jax


if __name__ == "__main__":
  verdict = main(*sys.argv[1:])
  print(verdict.table())
  sys.exit(0 if verdict.accepted else 1)
