"""DenseNet exactly as Keras Applications builds it (keras/src/applications/densenet.py).

Convs have no bias; each conv block is BN-ReLU-1x1(4k)-BN-ReLU-3x3(k) concatenated onto its input; transitions are
BN-ReLU-1x1(C/2)-2x2/2 average pool; the no-top output ends with BatchNorm `bn` and ReLU `relu`. Keras leaves the
two stem ZeroPadding2D layers unnamed, so they carry Keras's automatic names `zero_padding2d` and `zero_padding2d_1`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resdense_jax.models import keras_layers as kl


def conv_block(module: nn.Module, x: jax.Array, growth_rate: int, name: str, train: bool) -> jax.Array:
  """Keras `conv_block`: a bottleneck whose `growth_rate` new channels are concatenated onto `x`."""
  y = kl.batch_norm(module, x, f"{name}_0_bn", train)
  y = kl.relu(y, f"{name}_0_relu")
  y = kl.conv(module, y, 4 * growth_rate, 1, f"{name}_1_conv", use_bias=False)
  y = kl.batch_norm(module, y, f"{name}_1_bn", train)
  y = kl.relu(y, f"{name}_1_relu")
  y = kl.block_output(kl.conv(module, y, growth_rate, 3, f"{name}_2_conv", padding="SAME", use_bias=False))
  return kl.concatenate([x, y], f"{name}_concat")


def dense_block(module: nn.Module, x: jax.Array, blocks: int, growth_rate: int, name: str,
                train: bool) -> jax.Array:
  for i in range(1, blocks + 1):
    x = conv_block(module, x, growth_rate, f"{name}_block{i}", train)
  return x


def transition_block(module: nn.Module, x: jax.Array, reduction: float, name: str, train: bool) -> jax.Array:
  x = kl.batch_norm(module, x, f"{name}_bn", train)
  x = kl.relu(x, f"{name}_relu")
  x = kl.conv(module, x, int(x.shape[-1] * reduction), 1, f"{name}_conv", use_bias=False)
  return kl.block_output(kl.avg_pool(x, 2, 2, f"{name}_pool"))


class DenseNet(kl.KerasApplication):
  """Keras DenseNet. `blocks` (conv blocks per dense block) and `growth_rate` give depth and width.

  `__call__(x, train)` takes preprocessed NHWC input ("torch" mode for ImageNet weights).
  """
  blocks: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  stem_filters: int = 64
  reduction: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = kl.input_layer(jnp.asarray(x, self.dtype))
    x = kl.zero_padding(x, 3, "zero_padding2d")
    x = kl.conv(self, x, self.stem_filters, 7, "conv1_conv", strides=2, use_bias=False)
    x = kl.batch_norm(self, x, "conv1_bn", train)
    x = kl.relu(x, "conv1_relu")
    x = kl.zero_padding(x, 1, "zero_padding2d_1")
    x = kl.max_pool(x, 3, 2, "pool1")
    for i, blocks in enumerate(self.blocks):
      x = dense_block(self, x, blocks, self.growth_rate, f"conv{i + 2}", train)
      if i < len(self.blocks) - 1:
        x = transition_block(self, x, self.reduction, f"pool{i + 2}", train)
    x = kl.batch_norm(self, x, "bn", train)
    x = kl.relu(x, "relu")
    return self.output(x)

  @property
  def num_features(self) -> int:
    channels = self.stem_filters
    for i, blocks in enumerate(self.blocks):
      channels += blocks * self.growth_rate
      if i < len(self.blocks) - 1:
        channels = int(channels * self.reduction)
    return channels


DenseNet121 = functools.partial(DenseNet, blocks=(6, 12, 24, 16))
DenseNet169 = functools.partial(DenseNet, blocks=(6, 12, 32, 32))
DenseNet201 = functools.partial(DenseNet, blocks=(6, 12, 48, 32))
