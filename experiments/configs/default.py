"""Default: an MLP on scikit-learn's digits (offline), recorded with k = 22.

  python -m experiments.train --workdir=runs/default
  python -m experiments.verify --proof=runs/default/proof

Expect a held-out accuracy of about 0.95 after 660 steps (30 epochs of 22
steps), in well under a minute on 2 CPU cores, and a proof of 31 checkpoints.
``--config=experiments/configs/default.py:smoke`` shrinks the run for tests.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "digits"
  c.model = "mlp"
  c.features = (128,)  # mlp: hidden layer sizes
  c.widths = (16, 32)  # cnn: channels per block
  c.dropout = 0.1
  c.optimizer = "sgd"
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.schedule = "cosine"  # constant | cosine | step (x0.1 at 50% and 75% of steps)
  c.batch_size = 64
  c.steps = 660
  c.k = 22
  c.seed = 0
  c.runner = "scan"  # scan | loop
  return shrink(c) if arg == "smoke" else c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ':smoke' version of any config: a few short segments."""
  c.steps = 12
  c.k = 4
  c.batch_size = min(c.batch_size, 32)
  return c
