"""Record and verify a proof for an existing Flax Linen training loop.

  python examples/linen_train_state.py [WORKDIR]

A Linen model with ``flax.training.train_state.TrainState`` and a usual
``train_step``; the lines marked ``# pol-jax`` are all it takes: the step takes
the per-step key (for dropout) and returns metrics, and ``init`` builds the
state from a key.
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from pol_jax import challenge, data, ownership, proof, recorder, training, verifier  # pol-jax


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = x.astype(jnp.float32) / 16.0
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.Dropout(0.1, deterministic=not train)(x.mean(axis=(1, 2)))
    return nn.Dense(10)(x)


tx = optax.sgd(0.05, momentum=0.9)


def init(key):  # pol-jax: the initial state from the committed seed's init key
  params = CNN().init(key, jnp.zeros((1, 8, 8, 1)), train=False)["params"]
  return train_state.TrainState.create(apply_fn=CNN().apply, params=params, tx=tx)


def train_step(state, batch, key):  # pol-jax: takes the step key, returns (state, metrics)
  x, y = batch

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, x, train=True, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss}


def main(workdir: str = "runs/linen") -> verifier.Verdict:
  program = training.Program(init, train_step)  # pol-jax
  train = data.load_digits("train")
  owner, _ = ownership.ensure_key(f"{workdir}/owner.key")  # pol-jax: the key the proof is bound to
  plan = proof.Plan(owner=owner, nonce=0, k=10, steps=60, batch_size=32, runner="loop")  # pol-jax
  recorder.record(f"{workdir}/proof", program, train, plan, config={"example": "linen"})  # pol-jax
  return verifier.verify(f"{workdir}/proof", program, train, challenge=challenge.All())  # pol-jax


if __name__ == "__main__":
  verdict = main(*sys.argv[1:])
  print(verdict.table())
  sys.exit(0 if verdict.accepted else 1)
