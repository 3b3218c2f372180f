"""An MLP with dropout on digits, recorded with one ``lax.scan`` per segment.

  python -m experiments.train --config=experiments/configs/digits_mlp.py --workdir=runs/mlp
  python -m experiments.verify --proof=runs/mlp/proof

Expect a held-out accuracy of about 0.92 in about 5 s on 2 CPU cores.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  c = default.get_config()
  c.model = "mlp"
  c.runner = "scan"
  return default.shrink(c) if arg == "smoke" else c
