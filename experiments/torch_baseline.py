"""The PyTorch baseline: the official PoL code's CIFAR-10 ResNet-20 step, timed on this machine.

``python -m experiments.torch_baseline --steps=10 --out=FILE.json`` times the
step the Proof-of-Learning paper's code trains with (He et al.'s ResNet-20 with
the option-A shortcut, batch 128, random crop with 4 pixels of padding and a
horizontal flip, cross-entropy, SGD with learning rate 0.1, momentum 0.9 and
weight decay 1e-4), on random uint8 images of CIFAR's shape: a step's time does
not depend on the pixel values. It is what ``experiments.benchmark --torch``
compares pol-jax's step with, in a child process of its own.

PyTorch uses every core this process may run on, with ``OMP_WAIT_POLICY=PASSIVE``
(set before it starts) so idle threads do not spin against the other process of
a side-by-side run. Needs PyTorch (``pip install 'pol-jax[bench]'``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags


def _resnet20(torch):
  nn, F = torch.nn, torch.nn.functional

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.stride, self.pad = stride, cout - cin

    def shortcut(self, x):  # option A: subsample, zero-pad the new channels
      if self.stride == 1 and not self.pad:
        return x
      x = x[:, :, :: self.stride, :: self.stride]
      return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

  class ResNet20(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn = nn.BatchNorm2d(16)
      blocks, cin = [], 16
      for width, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
          blocks.append(Block(cin, width, stride if i == 0 else 1))
          cin = width
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Linear(64, 10)
      for m in self.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
          nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
      x = self.blocks(F.relu(self.bn(self.conv(x))))
      return self.fc(x.mean(dim=(2, 3)))

  return ResNet20()


def crop_and_flip(torch, x, generator):
  """Random 32x32 crops of the 4-pixel zero-padded images, each flipped with probability 1/2."""
  n, _, h, w = x.shape
  padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
  dy = torch.randint(0, 9, (n,), generator=generator)
  dx = torch.randint(0, 9, (n,), generator=generator)
  flip = torch.rand(n, generator=generator) < 0.5
  rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 8)
  out = padded.gather(2, rows)
  cols = dx[:, None] + torch.arange(w)[None, :]
  cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :].expand(n, x.shape[1], h, w)
  return out.gather(3, cols)


def step_time(steps: int, batch_size: int = 128, seed: int = 0) -> dict:
  import torch  # deferred: optional (pol-jax[bench]), and it must start after __main__ sets OMP_WAIT_POLICY

  torch.manual_seed(seed)
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(threads)
  model = _resnet20(torch).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  rng = np.random.default_rng(seed)
  images = torch.from_numpy(rng.integers(0, 256, (512, 32, 32, 3), np.uint8))
  labels = torch.from_numpy(rng.integers(0, 10, 512).astype(np.int64))
  generator = torch.Generator().manual_seed(seed)
  times = []
  for _ in range(steps + 2):
    idx = torch.from_numpy(rng.choice(512, batch_size, replace=False))
    t0 = time.perf_counter()
    x = images[idx].permute(0, 3, 1, 2).float() / 255.0
    x = crop_and_flip(torch, x, generator)
    loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
  times = times[2:]
  return {
    "framework": f"torch {torch.__version__}",
    "threads": threads,
    "batch_size": batch_size,
    "steps_timed": steps,
    "median_step_seconds": statistics.median(times),
    "step_seconds": times,
  }


def main(argv) -> None:
  del argv
  result = step_time(_STEPS.value)
  print(f"PyTorch ResNet-20, batch 128, crop+flip: {result['median_step_seconds']:.3f} s per step")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
  try:
    import torch  # noqa: F401
  except ImportError:
    print(
      "error: the PyTorch baseline needs PyTorch: pip install 'pol-jax[bench]' "
      "(the CPU wheel: pip install torch --index-url https://download.pytorch.org/whl/cpu)",
      file=sys.stderr,
    )
    sys.exit(2)
  _STEPS = flags.DEFINE_integer("steps", 10, "Steps to time (after two warm-up steps).", lower_bound=1)
  _OUT = flags.DEFINE_string("out", None, "Write the result as JSON to this file.")
  app.run(main)
