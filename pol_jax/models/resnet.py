"""CIFAR ResNets (He et al., 2016), as the Proof-of-Learning paper's code uses them.

``resnet20/32/44/56/110``: a 3x3 stem of 16 channels, three stages of n basic
blocks (16, 32, 64 channels; depth 6n + 2), the option-A shortcut (identity,
subsampled and zero-padded in channels where the shape changes), global
average pooling. ``resnet18`` (basic blocks) and ``resnet50`` (bottleneck
blocks, expansion 4) for CIFAR-100: a 3x3 stride-1 stem and no max-pool,
projection (1x1 conv + BatchNorm) shortcuts. ``tiny_<name>`` keeps the block
type and shortcut with one block per stage and a quarter of the width, for
tests. No max-pool anywhere (its GPU backward is not deterministic); BatchNorm
(``_norm.BatchNorm``: nnx.BatchNorm's parameters and rule with a fused backward)
statistics are part of the recorded state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pol_jax.models._functional import functional
from pol_jax.models._norm import BatchNorm


@dataclasses.dataclass(frozen=True)
class Spec:
  block: str  # basic | bottleneck
  stages: tuple[int, ...]
  widths: tuple[int, ...]
  shortcut: str  # A (zero-padded identity) | B (projection)


VARIANTS = {
  **{f"resnet{6 * n + 2}": Spec("basic", (n, n, n), (16, 32, 64), "A") for n in (3, 5, 7, 9, 18)},
  "resnet18": Spec("basic", (2, 2, 2, 2), (64, 128, 256, 512), "B"),
  "resnet50": Spec("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), "B"),
}
VARIANTS.update(
  {
    f"tiny_{name}": Spec(s.block, tuple(1 for _ in s.stages), tuple(max(4, w // 4) for w in s.widths), s.shortcut)
    for name, s in list(VARIANTS.items())
  }
)


def _he(key, shape, dtype=jnp.float32):
  """kaiming_normal(mode="fan_out"), as PyTorch's: normal with variance 2 / fan_out.

  Written out rather than taken from ``nnx.initializers.variance_scaling``: jax
  0.12 computes its standard deviation with another rounding than 0.10 (half
  of a kernel's values move by an ulp), and the initial state is part of the
  proof. The deviation is rounded once, here, in float64.
  """
  fan_out = shape[-1] * math.prod(shape[:-2])
  return jax.random.normal(key, shape, dtype) * np.asarray(math.sqrt(2.0 / fan_out), dtype)


def _conv(cin, cout, kernel, stride, rngs):
  return nnx.Conv(
    cin, cout, (kernel, kernel), strides=stride, padding="SAME", use_bias=False, kernel_init=_he, rngs=rngs
  )


def _norm(c, rngs):
  return BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)


class _Shortcut(nnx.Module):
  def __init__(self, cin, cout, stride, kind, rngs):
    self.kind, self.stride, self.extra = kind, stride, cout - cin
    self.identity = stride == 1 and cin == cout
    if not self.identity and kind == "B":
      self.conv, self.norm = _conv(cin, cout, 1, stride, rngs), _norm(cout, rngs)

  def __call__(self, x):
    if self.identity:
      return x
    if self.kind == "B":
      return self.norm(self.conv(x))
    x = x[:, :: self.stride, :: self.stride, :]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (self.extra // 2, self.extra - self.extra // 2)))


class _Basic(nnx.Module):
  expansion = 1

  def __init__(self, cin, width, stride, shortcut, rngs):
    self.conv1, self.norm1 = _conv(cin, width, 3, stride, rngs), _norm(width, rngs)
    self.conv2, self.norm2 = _conv(width, width, 3, 1, rngs), _norm(width, rngs)
    self.shortcut = _Shortcut(cin, width, stride, shortcut, rngs)

  def __call__(self, x):
    y = nnx.relu(self.norm1(self.conv1(x)))
    return nnx.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class _Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, cin, width, stride, shortcut, rngs):
    cout = width * 4
    self.conv1, self.norm1 = _conv(cin, width, 1, 1, rngs), _norm(width, rngs)
    self.conv2, self.norm2 = _conv(width, width, 3, stride, rngs), _norm(width, rngs)
    self.conv3, self.norm3 = _conv(width, cout, 1, 1, rngs), _norm(cout, rngs)
    self.shortcut = _Shortcut(cin, cout, stride, shortcut, rngs)

  def __call__(self, x):
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = nnx.relu(self.norm2(self.conv2(y)))
    return nnx.relu(self.norm3(self.conv3(y)) + self.shortcut(x))


class ResNet(nnx.Module):
  def __init__(self, spec: Spec, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
    block = {"basic": _Basic, "bottleneck": _Bottleneck}[spec.block]
    self.stem, self.stem_norm = _conv(in_channels, spec.widths[0], 3, 1, rngs), _norm(spec.widths[0], rngs)
    blocks, cin = [], spec.widths[0]
    for i, (count, width) in enumerate(zip(spec.stages, spec.widths, strict=True)):
      for j in range(count):
        blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1, spec.shortcut, rngs))
        cin = width * block.expansion
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    del rngs  # no dropout
    x = nnx.relu(self.stem_norm(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


def build(name: str = "resnet20", *, in_channels: int = 3, num_classes: int = 10, input_scale: float = 1 / 255):
  """Returns ``(apply_fn, init_fn)`` for the ResNet ``name`` (see ``VARIANTS``)."""
  if name not in VARIANTS:
    raise ValueError(f"Expected a ResNet in {sorted(VARIANTS)}, got {name!r}.")
  spec = VARIANTS[name]
  return functional(lambda rngs: ResNet(spec, in_channels, num_classes, rngs=rngs), input_scale)
