"""ResNet v1 exactly as Keras Applications builds it (keras/src/applications/resnet.py).

Keras's v1 differs from torchvision's "v1.5": the stride sits on the block's first 1x1 conv (and on the 1x1
shortcut), every conv has a bias, and BatchNorm epsilon is 1.001e-5. Module names are Keras layer names, so
`params["conv4_block7_2_conv"]["kernel"]` is Keras's `conv4_block7_2_conv` kernel (both HWIO).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resdense_jax.models import keras_layers as kl
from resdense_jax.models.features import Names, capturing


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
  """Keras ResNet v1 of any depth and width (`stage_sizes`, `filters`, `stem_filters`); the named models
  ResNet50/101/152 are this with Keras's stage sizes. Other fields: see `KerasApplication` (include_top, pooling,
  num_classes, classifier_activation, frozen_bn, dtype).

  Input: NHWC float (or uint8) images, at least 32x32, preprocessed in Keras's "caffe" mode for the ImageNet
  weights: `models.preprocess_input(rgb_0_255, "caffe")` (RGB to BGR, minus the ImageNet mean).
  """
  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  filters: Sequence[int] = (64, 128, 256, 512)
  stem_filters: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, *, features: Names = None) -> jax.Array | dict:
    """The Keras model's output on preprocessed NHWC images `x` (caffe mode for ImageNet weights).

    Args:
      x: (N, H, W, 3) floating or uint8, H and W at least 32.
      train: BatchNorm uses (and updates, with `mutable=["batch_stats"]`) batch statistics, as Keras's
        `training=True`; the default is inference, as Keras's direct call.
      features: Keras layer names (any of `keras_layers()`, e.g. "conv4_block6_out", "conv5_block3_out",
        "conv1_relu", "pool1_pool") to return instead of the output, as
        `keras.Model(base.input, base.get_layer(name).output)` would.

    Returns:
      include_top: (N, num_classes) float32 probabilities (logits if classifier_activation=None); pooling
      "avg"/"max": (N, 4 * filters[-1]); else the final feature map (N, ceil(H/32), ceil(W/32), 4 * filters[-1])
      for 4 stages. With `features`: {layer name: its output}.
    """
    if len(self.stage_sizes) != len(self.filters):
      raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and filters {tuple(self.filters)} differ in length")
    names = self.check_input(x, train, features)
    with capturing(names) as captured:
      x = kl.input_layer(jnp.asarray(x, self.dtype))
      x = kl.zero_padding(x, 3, "conv1_pad")
      x = kl.conv(self, x, self.stem_filters, 7, "conv1_conv", strides=2)
      x = kl.batch_norm(self, x, "conv1_bn", train)
      x = kl.relu(x, "conv1_relu")
      x = kl.zero_padding(x, 1, "pool1_pad")
      x = kl.max_pool(x, 3, 2, "pool1_pool")
      for i, (blocks, filters) in enumerate(zip(self.stage_sizes, self.filters)):
        x = residual_stack(self, x, filters, blocks, f"conv{i + 2}", train, stride=1 if i == 0 else 2)
      x = self.output(x)
    return x if captured is None else captured.result(names, self.where)

  @property
  def num_features(self) -> int:
    return 4 * self.filters[-1]

  @nn.nowrap
  def feature_size(self, size: int) -> int:
    # The stem conv and pool halve rounding up (padded, stride 2); so does each later stage's strided 1x1 conv.
    for _ in range(2 + max(len(self.stage_sizes) - 1, 0)):
      size = -(-size // 2)
    return size


class ResNet50(ResNet):
  __doc__ = kl.application_doc("ResNet50", "ResNet v1 with 50 layers (stage sizes 3, 4, 6, 3)", "caffe", 2048,
                               "conv4_block6_out")
  stage_sizes: Sequence[int] = (3, 4, 6, 3)


class ResNet101(ResNet):
  __doc__ = kl.application_doc("ResNet101", "ResNet v1 with 101 layers (stage sizes 3, 4, 23, 3)", "caffe", 2048,
                               "conv4_block23_out")
  stage_sizes: Sequence[int] = (3, 4, 23, 3)


class ResNet152(ResNet):
  __doc__ = kl.application_doc("ResNet152", "ResNet v1 with 152 layers (stage sizes 3, 8, 36, 3)", "caffe", 2048,
                               "conv4_block36_out")
  stage_sizes: Sequence[int] = (3, 8, 36, 3)
