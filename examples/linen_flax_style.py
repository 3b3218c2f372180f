"""A Linen loop as the Flax examples write it, on digits, recorded and verified.

  python examples/linen_flax_style.py [WORKDIR]             # plain loop, then the same loop recorded
  PYTHONPATH=examples python -m experiments.train --program=linen_flax_style:build \
      --config=examples/linen_flax_style.py --workdir=runs/linen_flax
  PYTHONPATH=examples python -m experiments.verify --proof=runs/linen_flax/proof --program=linen_flax_style:build

A CNN with BatchNorm and Dropout, a ``TrainState`` subclass carrying
``batch_stats``, ``optax.chain(clip_by_global_norm, adamw(warmup_cosine_decay_schedule))``
and a jitted ``train_step(state, batch, rng)`` on dict batches. The lines
marked ``# pol-jax`` are what recording adds.
"""

import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from pol_jax import challenge, data, ownership, proof, recorder, sampling, training, verifier  # pol-jax


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(16, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.Conv(32, (3, 3), strides=2)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.Dropout(0.1, deterministic=not train)(x.mean(axis=(1, 2)))
    return nn.Dense(10)(x)


class TrainState(train_state.TrainState):
  batch_stats: Any


STEPS = 200
schedule = optax.warmup_cosine_decay_schedule(0.0, 0.01, warmup_steps=20, decay_steps=STEPS)
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def create_train_state(rng):
  variables = CNN().init(rng, jnp.ones((1, 8, 8, 1)), train=False)
  return TrainState.create(
    apply_fn=CNN().apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
  )


@jax.jit
def train_step(state, batch, rng):
  def loss_fn(params):
    logits, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
      rngs={"dropout": rng}, mutable=["batch_stats"],
    )  # fmt: skip
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, (updates, logits)

  (loss, (updates, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads).replace(batch_stats=updates["batch_stats"])
  return state, {"loss": loss, "accuracy": (logits.argmax(-1) == batch["label"]).mean()}


def digits(split: str) -> data.Examples:
  d = data.load_digits(split)
  return data.Examples(f"digits-float:{split}", {"image": d.inputs.astype(np.float32) / 16.0, "label": d.labels})


def get_config():  # the CLI's --config (and the plan)
  c = ml_collections.ConfigDict()
  c.owner, c.seed, c.k, c.steps, c.batch_size, c.runner = "", 0, 20, STEPS, 32, "loop"
  return c


def build(config: dict):  # pol-jax: what experiments.train/verify --program=linen_flax_style:build calls
  return training.Program(create_train_state, train_step), digits("train")


def plain(order: np.ndarray, train: data.Examples) -> float:
  """The loop as the Flax examples write it, over the same batches: its seconds."""
  state, rng = create_train_state(jax.random.key(0)), jax.random.key(1)
  t0 = time.perf_counter()
  for batch_indices in order:
    rng, step_rng = jax.random.split(rng)
    state, _ = train_step(state, train.batch(batch_indices), step_rng)
  jax.block_until_ready(state)
  return time.perf_counter() - t0


def main(workdir: str = "runs/linen_flax") -> verifier.Verdict:
  config = get_config()
  program, train = build(config.to_dict())
  owner, _ = ownership.ensure_key(f"{workdir}/owner.key")  # pol-jax
  plan = proof.Plan(owner, 0, config.k, config.steps, config.batch_size, config.runner)  # pol-jax
  order = sampling.index_log(training.derive_keys(plan.seed).order, len(train), plan.batch_size, plan.steps)
  plain(order, train)  # warm-up: compilation is nobody's cost
  seconds = plain(order, train)
  recorder.record(f"{workdir}/warm-up/proof", program, train, plan, config=config.to_dict())  # compiles
  t0 = time.perf_counter()
  recorder.record(f"{workdir}/proof", program, train, plan, config=config.to_dict())  # pol-jax
  recorded = time.perf_counter() - t0
  print(f"plain loop {seconds:.2f} s, recorded {recorded:.2f} s: {recorded / seconds:.2f}x (both compiled before)")
  return verifier.verify(f"{workdir}/proof", program, train, challenge=challenge.All())  # pol-jax


if __name__ == "__main__":
  verdict = main(*sys.argv[1:])
  print(verdict.table())
  sys.exit(0 if verdict.accepted else 1)
