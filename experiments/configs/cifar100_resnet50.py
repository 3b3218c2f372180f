"""The paper's CIFAR-100 setting: ResNet-50, batch 128, SGD momentum 0.9, weight decay 5e-4.

  python -m experiments.train --config=experiments/configs/cifar100_resnet50.py --workdir=runs/cifar100_resnet50
  python -m experiments.verify --proof=runs/cifar100_resnet50/proof

200 epochs of 390 steps (78000 steps), learning rate 0.1 divided by 10 at
epochs 100 and 150, k = 100, random crop and flip in the step. Expect about
77-79% test accuracy. A GPU is needed in practice (``--config.runner=scan``);
on a 2-core CPU a step takes several seconds. ``:smoke`` shrinks it.
"""

from experiments.configs import cifar10_resnet20, default


def get_config(arg: str | None = None):
  c = cifar10_resnet20.get_config()
  c.dataset = "cifar100"
  c.model = "resnet50"
  c.weight_decay = 5e-4
  if arg == "smoke":
    c.model = "tiny_resnet50"
    c = default.shrink(c)
  return c
