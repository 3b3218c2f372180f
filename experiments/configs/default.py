"""Default: a small CNN with BatchNorm and dropout on scikit-learn's digits.

  python -m experiments.train --workdir=runs/default
  python -m experiments.verify --proof=runs/default/proof

Real data, offline (1437 training and 360 held-out 8x8 images). Expect a
held-out accuracy of about 0.95 after 660 steps (30 epochs of 22 steps), in
about 10 s on 2 CPU cores, and a proof of 31 checkpoints (about 2 MB). The
``loop`` runner is used because XLA:CPU runs convolutions far slower inside
``lax.scan``. ``--config=experiments/configs/default.py:smoke`` shrinks any
setting to a few short segments for tests.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "digits"  # digits (offline) | cifar10 | cifar100 | mnist | fashion_mnist (TFDS)
  c.model = "cnn"  # cnn | mlp | resnet20/32/44/56/110 | resnet18 | resnet50 | tiny_<resnet>
  c.augment = "none"  # none | crop_flip (random 4-pixel crop and horizontal flip, in the step)
  c.widths = (16, 32)  # cnn: channels per block (stride 2 from the second)
  c.features = (128,)  # mlp: hidden layer sizes
  c.dropout = 0.1
  c.optimizer = "sgd"  # sgd | adam
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.schedule = "cosine"  # constant | cosine | step (x0.1 at 50% and 75% of steps)
  c.batch_size = 64
  c.steps = 660
  c.k = 22
  c.seed = 0  # the nonce: with the owner's key it derives the run's seed (proof.bound_seed)
  c.owner = ""  # the Ed25519 public key (hex) the proof is bound to; experiments.train sets it from --key
  c.runner = "loop"  # loop | scan
  c.numerics = "float32"  # float32 | portable (float64 rounded after every op: the same bits on any machine)
  return shrink(c) if arg == "smoke" else c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ':smoke' version of any config: three segments of four steps."""
  c.steps = 12
  c.k = 4
  c.batch_size = min(c.batch_size, 32)
  return c
