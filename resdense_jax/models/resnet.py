"""ResNet v1 exactly as Keras Applications builds it (keras/src/applications/resnet.py).

Keras's v1 differs from torchvision's "v1.5": the stride sits on the block's first 1x1 conv (and on the 1x1
shortcut), every conv has a bias, and BatchNorm epsilon is 1.001e-5. Module names are Keras layer names, so
`params["conv4_block7_2_conv"]["kernel"]` is Keras's `conv4_block7_2_conv` kernel (both HWIO).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resdense_jax.models import keras_layers as kl


def residual_block(module: nn.Module, x: jax.Array, filters: int, name: str, train: bool, *, stride: int = 1,
                   conv_shortcut: bool = True) -> jax.Array:
  """Keras `residual_block_v1`; ops applied in Keras's layer order (the shortcut conv after the 3x3)."""
  y = kl.conv(module, x, filters, 1, f"{name}_1_conv", strides=stride)
  y = kl.batch_norm(module, y, f"{name}_1_bn", train)
  y = kl.relu(y, f"{name}_1_relu")
  y = kl.conv(module, y, filters, 3, f"{name}_2_conv", padding="SAME")
  y = kl.batch_norm(module, y, f"{name}_2_bn", train)
  y = kl.relu(y, f"{name}_2_relu")
  if conv_shortcut:
    shortcut = kl.conv(module, x, 4 * filters, 1, f"{name}_0_conv", strides=stride)
    y = kl.conv(module, y, 4 * filters, 1, f"{name}_3_conv")
    shortcut = kl.batch_norm(module, shortcut, f"{name}_0_bn", train)
  else:
    shortcut = x
    y = kl.conv(module, y, 4 * filters, 1, f"{name}_3_conv")
  y = kl.batch_norm(module, y, f"{name}_3_bn", train)
  y = kl.add([shortcut, y], f"{name}_add")
  return kl.block_output(kl.relu(y, f"{name}_out"))


def residual_stack(module: nn.Module, x: jax.Array, filters: int, blocks: int, name: str, train: bool, *,
                   stride: int = 2) -> jax.Array:
  """Keras `stack_residual_blocks_v1`: a projection block, then identity blocks."""
  x = residual_block(module, x, filters, f"{name}_block1", train, stride=stride)
  for i in range(2, blocks + 1):
    x = residual_block(module, x, filters, f"{name}_block{i}", train, conv_shortcut=False)
  return x


class ResNet(kl.KerasApplication):
  """Keras ResNet v1. `stage_sizes`/`filters` give depth and width, so small variants share this code.

  `__call__(x, train)` takes preprocessed NHWC input ("caffe" mode for ImageNet weights) and returns the
  final feature map, its global pooling, or (include_top) class probabilities, as Keras does.
  """
  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  filters: Sequence[int] = (64, 128, 256, 512)
  stem_filters: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if len(self.stage_sizes) != len(self.filters):
      raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and filters {tuple(self.filters)} differ in length")
    x = kl.input_layer(jnp.asarray(x, self.dtype))
    x = kl.zero_padding(x, 3, "conv1_pad")
    x = kl.conv(self, x, self.stem_filters, 7, "conv1_conv", strides=2)
    x = kl.batch_norm(self, x, "conv1_bn", train)
    x = kl.relu(x, "conv1_relu")
    x = kl.zero_padding(x, 1, "pool1_pad")
    x = kl.max_pool(x, 3, 2, "pool1_pool")
    for i, (blocks, filters) in enumerate(zip(self.stage_sizes, self.filters)):
      x = residual_stack(self, x, filters, blocks, f"conv{i + 2}", train, stride=1 if i == 0 else 2)
    return self.output(x)

  @property
  def num_features(self) -> int:
    return 4 * self.filters[-1]


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3))
