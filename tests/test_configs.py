"""experiments/configs: the paper's settings."""

from __future__ import annotations

from experiments.configs import cifar10_resnet20, cifar100_resnet50


def test_paper_configs_have_the_papers_settings():
  c10, c100 = cifar10_resnet20.get_config(), cifar100_resnet50.get_config()
  for c in (c10, c100):
    assert (c.batch_size, c.momentum, c.k, c.steps, c.schedule) == (128, 0.9, 100, 200 * 390, "step")
    assert c.augment == "crop_flip"
  assert (c10.model, c10.dataset, c10.weight_decay) == ("resnet20", "cifar10", 1e-4)
  assert (c100.model, c100.dataset, c100.weight_decay) == ("resnet50", "cifar100", 5e-4)
