"""DenseNet exactly as Keras Applications builds it (keras/src/applications/densenet.py).

Convs have no bias; each conv block is BN-ReLU-1x1(4k)-BN-ReLU-3x3(k) concatenated onto its input; transitions are
BN-ReLU-1x1(C/2)-2x2/2 average pool; the no-top output ends with BatchNorm `bn` and ReLU `relu`. Keras leaves the
two stem ZeroPadding2D layers unnamed, so they carry Keras's automatic names `zero_padding2d` and `zero_padding2d_1`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resdense_jax.models import keras_layers as kl
from resdense_jax.models.features import Names, capturing


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
  """Keras DenseNet of any depth and width (`blocks`: conv blocks per dense block, `growth_rate`, `stem_filters`,
  `reduction`); DenseNet121/169/201 are this with Keras's blocks. Other fields: see `KerasApplication`.

  Input: NHWC float (or uint8) images, at least 32x32, preprocessed in Keras's "torch" mode for the ImageNet
  weights: `models.preprocess_input(rgb_0_255, "torch")` (/255, then ImageNet mean and std).
  """
  blocks: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  stem_filters: int = 64
  reduction: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, *, features: Names = None) -> jax.Array | dict:
    """The Keras model's output on preprocessed NHWC images `x` ("torch" mode for ImageNet weights).

    Args:
      x: (N, H, W, 3) floating or uint8, H and W at least 32.
      train: BatchNorm uses (and updates, with `mutable=["batch_stats"]`) batch statistics, as Keras's
        `training=True`; the default is inference, as Keras's direct call.
      features: Keras layer names (any of `keras_layers()`, e.g. "pool3_relu", "conv5_block16_concat", "relu")
        to return instead of the output, as `keras.Model(base.input, base.get_layer(name).output)` would.

    Returns:
      include_top: (N, num_classes) float32 probabilities (logits if classifier_activation=None); pooling
      "avg"/"max": (N, num_features); else the final feature map after `bn` and `relu`, (N, h, w,
      num_features) with h = feature_size(H). With `features`: {layer name: its output}.
    """
    names = self.check_input(x, train, features)
    with capturing(names) as captured:
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
      x = self.output(x)
    return x if captured is None else captured.result(names, self.where)

  @property
  def num_features(self) -> int:
    channels = self.stem_filters
    for i, blocks in enumerate(self.blocks):
      channels += blocks * self.growth_rate
      if i < len(self.blocks) - 1:
        channels = int(channels * self.reduction)
    return channels

  @nn.nowrap
  def feature_size(self, size: int) -> int:
    # The stem conv and pool halve rounding up (padded, stride 2); each transition's 2x2 average pool
    # (unpadded) halves rounding down.
    size = -(-(-(-size // 2)) // 2)
    for _ in range(max(len(self.blocks) - 1, 0)):
      size //= 2
    return size


class DenseNet121(DenseNet):
  __doc__ = kl.application_doc("DenseNet121", "DenseNet with 121 layers (blocks 6, 12, 24, 16)", "torch", 1024,
                               "pool3_relu")
  blocks: Sequence[int] = (6, 12, 24, 16)


class DenseNet169(DenseNet):
  __doc__ = kl.application_doc("DenseNet169", "DenseNet with 169 layers (blocks 6, 12, 32, 32)", "torch", 1664,
                               "pool3_relu")
  blocks: Sequence[int] = (6, 12, 32, 32)


class DenseNet201(DenseNet):
  __doc__ = kl.application_doc("DenseNet201", "DenseNet with 201 layers (blocks 6, 12, 48, 32)", "torch", 1920,
                               "pool3_relu")
  blocks: Sequence[int] = (6, 12, 48, 32)
