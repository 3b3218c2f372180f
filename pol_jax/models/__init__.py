"""Flax NNX models, exposed as pure functions for the training step.

Each model module has ``build(...) -> (apply_fn, init_fn)``: ``init_fn(key)``
returns ``(params, model_state)`` and ``apply_fn(params, model_state, x, *,
train, key)`` returns ``(outputs, new_model_state)``. No model uses max-pool:
its GPU backward has no deterministic kernel.
"""

from pol_jax.models import cnn, mlp, resnet
from pol_jax.models._functional import functional

__all__ = ["cnn", "functional", "mlp", "resnet"]
