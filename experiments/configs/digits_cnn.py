"""A small CNN with BatchNorm on digits, recorded with a loop of a jitted step.

  python -m experiments.train --config=experiments/configs/digits_cnn.py --workdir=runs/cnn
  python -m experiments.verify --proof=runs/cnn/proof

XLA:CPU runs convolutions far slower inside ``lax.scan``, so this config uses
the ``loop`` runner. Expect a held-out accuracy of about 0.95.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  c = default.get_config()
  c.model = "cnn"
  c.dropout = 0.0
  c.runner = "loop"
  return default.shrink(c) if arg == "smoke" else c
