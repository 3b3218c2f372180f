"""The paper's CIFAR-10 setting: ResNet-20, batch 128, SGD momentum 0.9, weight decay 1e-4.

  python -m experiments.train --config=experiments/configs/cifar10_resnet20.py --workdir=runs/cifar10_resnet20
  python -m experiments.verify --proof=runs/cifar10_resnet20/proof

200 epochs of 390 steps (78000 steps), learning rate 0.1 divided by 10 at
epochs 100 and 150, k = 100 (780 checkpoints), random 4-pixel crop and
horizontal flip inside the step. Expect about 91-92% test accuracy (ResNet-20
on CIFAR-10, He et al. 2016). Time: on a 2-core CPU a step takes about 0.7 s
(loop runner), so the full run is about 15 hours; on a GPU use
``--config.runner=scan``. Needs CIFAR-10 prepared for TFDS (ArrayRecord); the
error message says how. ``:smoke`` shrinks it (tiny ResNet, 12 steps).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  c = default.get_config()
  c.dataset = "cifar10"
  c.model = "resnet20"
  c.augment = "crop_flip"
  c.dropout = 0.0
  c.batch_size = 128
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.schedule = "step"
  c.steps = 200 * (50000 // 128)
  c.k = 100
  c.runner = "loop"
  if arg == "smoke":
    c.model = "tiny_resnet20"
    c = default.shrink(c)
  return c
