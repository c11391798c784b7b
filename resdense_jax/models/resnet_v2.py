"""ResNet v2 (pre-activation) exactly as Keras Applications builds it (keras/src/applications/resnet.py, v2 parts).

Differences from Keras's v1 (resnet.py here): each block starts with BatchNorm + ReLU (`_preact_bn`,
`_preact_relu`) and ends with a bare Add (`_out`, no ReLU); the stem is a conv without BatchNorm; the network ends
with `post_bn` + `post_relu`. The 1x1 and 3x3 convs of a block have no bias (the shortcut `_0_conv` and `_3_conv`
do), the 3x3 is padded by its own ZeroPadding2D (`_2_pad`), and a stage's stride sits on the 3x3 of its LAST
block, whose identity shortcut is then an unnamed MaxPooling2D(1, strides=2): Keras gives those its automatic names
`max_pooling2d`, `max_pooling2d_1`, ... (what a fresh Keras session gives them). The last stage has stride 1.
ImageNet weights expect "tf" preprocessing (x / 127.5 - 1).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resdense_jax.models import keras_layers as kl
from resdense_jax.models.features import Names, capturing


def residual_block(module: nn.Module, x: jax.Array, filters: int, name: str, train: bool, *, stride: int = 1,
                   conv_shortcut: bool = False, pool_name: str | None = None) -> jax.Array:
  """Keras `residual_block_v2`; ops applied in Keras's `model.layers` order.

  Keras lists the shortcut (the `_0_conv` projection or the strided MaxPooling2D) after `_2_relu`, right before
  `_3_conv`, so it is applied there. `pool_name` names the MaxPooling2D of a strided identity shortcut.
  """
  preact = kl.batch_norm(module, x, f"{name}_preact_bn", train)
  preact = kl.relu(preact, f"{name}_preact_relu")
  y = kl.conv(module, preact, filters, 1, f"{name}_1_conv", use_bias=False)
  y = kl.batch_norm(module, y, f"{name}_1_bn", train)
  y = kl.relu(y, f"{name}_1_relu")
  y = kl.zero_padding(y, 1, f"{name}_2_pad")
  y = kl.conv(module, y, filters, 3, f"{name}_2_conv", strides=stride, use_bias=False)
  y = kl.batch_norm(module, y, f"{name}_2_bn", train)
  y = kl.relu(y, f"{name}_2_relu")
  if conv_shortcut:
    shortcut = kl.conv(module, preact, 4 * filters, 1, f"{name}_0_conv", strides=stride)
  elif stride > 1:
    if pool_name is None:
      raise ValueError(f"{name}: a strided identity shortcut needs the MaxPooling2D's Keras name (pool_name)")
    shortcut = kl.max_pool(x, 1, stride, pool_name)
  else:
    shortcut = x
  y = kl.conv(module, y, 4 * filters, 1, f"{name}_3_conv")
  return kl.block_output(kl.add([shortcut, y], f"{name}_out"))


def residual_stack(module: nn.Module, x: jax.Array, filters: int, blocks: int, name: str, train: bool, *,
                   stride: int = 2, pool_name: str | None = None) -> jax.Array:
  """Keras `stack_residual_blocks_v2`: a projection block, identity blocks, then the (strided) last block."""
  x = residual_block(module, x, filters, f"{name}_block1", train, conv_shortcut=True)
  for i in range(2, blocks):
    x = residual_block(module, x, filters, f"{name}_block{i}", train)
  return residual_block(module, x, filters, f"{name}_block{blocks}", train, stride=stride, pool_name=pool_name)


def _auto_name(base: str, index: int) -> str:
  """Keras's automatic layer name: base, base_1, base_2, ..."""
  return base if index == 0 else f"{base}_{index}"


class ResNetV2(kl.KerasApplication):
  """Keras ResNet v2 of any depth and width (`stage_sizes`, `filters`, `stem_filters`); ResNet50V2/101V2/152V2
  are this with Keras's stage sizes. Every stage needs at least 2 blocks (Keras names a 1-block stage's two
  blocks alike). Other fields: see `KerasApplication`.

  Input: NHWC float (or uint8) images, at least 32x32, preprocessed in Keras's "tf" mode for the ImageNet
  weights: `models.preprocess_input(rgb_0_255, "tf")` (to [-1, 1]).
  """
  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  filters: Sequence[int] = (64, 128, 256, 512)
  stem_filters: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, *, features: Names = None) -> jax.Array | dict:
    """The Keras model's output on preprocessed NHWC images `x` ("tf" mode for ImageNet weights).

    Args:
      x: (N, H, W, 3) floating or uint8, H and W at least 32.
      train: BatchNorm uses (and updates, with `mutable=["batch_stats"]`) batch statistics, as Keras's
        `training=True`; the default is inference, as Keras's direct call.
      features: Keras layer names (any of `keras_layers()`, e.g. "conv4_block6_out", "post_relu") to return
        instead of the output, as `keras.Model(base.input, base.get_layer(name).output)` would.

    Returns:
      include_top: (N, num_classes) float32 probabilities (logits if classifier_activation=None); pooling
      "avg"/"max": (N, 4 * filters[-1]); else the final feature map after `post_bn` and `post_relu`, (N,
      ceil(H/32), ceil(W/32), 4 * filters[-1]) for 4 stages. With `features`: {layer name: its output}.
    """
    if len(self.stage_sizes) != len(self.filters):
      raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and filters {tuple(self.filters)} differ in length")
    if min(self.stage_sizes, default=0) < 2:
      raise ValueError(f"stage_sizes {tuple(self.stage_sizes)}: every ResNet v2 stage needs at least 2 blocks "
                       "(its first block projects, its last one strides)")
    names = self.check_input(x, train, features)
    with capturing(names) as captured:
      x = kl.input_layer(jnp.asarray(x, self.dtype))
      x = kl.zero_padding(x, 3, "conv1_pad")
      x = kl.conv(self, x, self.stem_filters, 7, "conv1_conv", strides=2)
      x = kl.zero_padding(x, 1, "pool1_pad")
      x = kl.max_pool(x, 3, 2, "pool1_pool")
      last = len(self.stage_sizes) - 1
      for i, (blocks, filters) in enumerate(zip(self.stage_sizes, self.filters)):
        # Every stage but the last ends with a stride-2 block whose shortcut is the i-th unnamed MaxPooling2D.
        stride = 1 if i == last else 2
        x = residual_stack(self, x, filters, blocks, f"conv{i + 2}", train, stride=stride,
                           pool_name=_auto_name("max_pooling2d", i) if stride > 1 else None)
      x = kl.batch_norm(self, x, "post_bn", train)
      x = kl.relu(x, "post_relu")
      x = self.output(x)
    return x if captured is None else captured.result(names, self.where)

  @property
  def num_features(self) -> int:
    return 4 * self.filters[-1]

  @nn.nowrap
  def feature_size(self, size: int) -> int:
    # The stem conv and pool halve rounding up (padded, stride 2); so does the padded strided 3x3 ending every
    # stage but the last.
    for _ in range(2 + max(len(self.stage_sizes) - 1, 0)):
      size = -(-size // 2)
    return size


class ResNet50V2(ResNetV2):
  __doc__ = kl.application_doc("ResNet50V2", "ResNet v2 (pre-activation) with 50 layers (stage sizes 3, 4, 6, 3)",
                               "tf", 2048, "conv4_block6_out")
  stage_sizes: Sequence[int] = (3, 4, 6, 3)


class ResNet101V2(ResNetV2):
  __doc__ = kl.application_doc("ResNet101V2", "ResNet v2 (pre-activation) with 101 layers (stage sizes 3, 4, 23, "
                               "3)", "tf", 2048, "conv4_block23_out")
  stage_sizes: Sequence[int] = (3, 4, 23, 3)


class ResNet152V2(ResNetV2):
  __doc__ = kl.application_doc("ResNet152V2", "ResNet v2 (pre-activation) with 152 layers (stage sizes 3, 8, 36, "
                               "3)", "tf", 2048, "conv4_block36_out")
  stage_sizes: Sequence[int] = (3, 8, 36, 3)
