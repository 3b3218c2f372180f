"""A user's own project, as a third party installs it: ``build(config) -> (program, dataset)``.

The tests record a proof of it with ``experiments.train --program=user_project:build`` and verify it
with ``experiments.verify --program=user_project:build`` in a fresh process (``tests/`` on the path).
"""

import jax
import numpy as np
import optax

from pol_jax import data, models, training


def build(config: dict):
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(64, config["width"], rngs=rngs)
      self.out = nnx.Linear(config["width"], 10, rngs=rngs)

    def __call__(self, x, *, rngs=None):
      return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))

  apply_fn, init_fn = models.functional(MLP, input_scale=1 / 16)
  tx = optax.adam(config["learning_rate"])

  def init(key):
    params, model_state = init_fn(key)
    return training.init_state(params, tx, model_state)

  def step(state, batch, key):  # dict batches, a per-example weight
    def loss_fn(params):
      logits, model_state = apply_fn(params, state.model_state, batch["image"], train=True, key=key)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      return (losses * batch["weight"]).mean(), model_state

    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state), {
      "loss": loss
    }

  digits = data.load_digits("train")
  weight = np.where(digits.labels < 5, 1.0, 0.5).astype(np.float32)
  examples = data.Examples("digits+weight", {"image": digits.inputs, "label": digits.labels, "weight": weight})
  return training.Program(init, step), examples
