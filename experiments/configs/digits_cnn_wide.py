"""A wider CNN on digits: the benchmark's larger model (about 30x the default's parameters).

  python -m experiments.train --config=experiments/configs/digits_cnn_wide.py --workdir=runs/wide
  python -m experiments.benchmark --config=experiments/configs/digits_cnn_wide.py

Three blocks of 64, 128 and 256 channels with BatchNorm, the ``loop`` runner.
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  c = default.get_config()
  c.widths = (64, 128, 256)
  return default.shrink(c) if arg == "smoke" else c
