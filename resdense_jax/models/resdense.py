"""Res-Dense Net (the paper's Figure 4): two ImageNet backbones side by side, fused by addition.

    raw RGB slice [0, 255]
      |-- preprocess (caffe) -- ResNet101 ------ Conv2D(1024, 3x3, same) "resnet101_fusion_conv" --.
      |-- preprocess (torch) -- DenseNet121 ---- Conv2D(1024, 3x3, same) "densenet121_fusion_conv" -+- "add"
                                                                                                     |
               global average pooling (or GeM with learnable p, eq. 3, "gem_pool") -- Dropout(0.2) --
               Dense "predictions" -> logits (1 for sigmoid, or num_classes for softmax)

Each backbone is any entry of `BACKBONES`, built headless (include_top=False, pooling=None) under its
own name, so Keras ImageNet weights load into `params[<backbone>]` with `weights.load_keras`. One backbone
gives the single-backbone baseline with the same head.

The model also runs in two halves on the same variables (resdense_jax/feature_cache.py trains the head on
cached backbone features): `backbone_features` (preprocessing and backbones only) and `head` (fusion convs to
logits) compose to `__call__`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resdense_jax.models.backbones import BACKBONES, PREPROCESSING_MODE
from resdense_jax.models.preprocessing import preprocess_input

PREPROCESSING = ("keras", "authors")
POOLING = ("avg", "gem")
# The "predictions" Dense's initialisers (kernel, bias): "flax" is Flax's default and this project's from the
# start (lecun-normal kernel); "keras" is Keras's Dense (glorot-uniform kernel); "zeros" (big_vision's
# zero-initialised head) starts neutral: logits 0, P = 0.5, binary cross-entropy ln 2 at step 0.
HEAD_INITS = {
    "flax": (nn.initializers.lecun_normal(), nn.initializers.zeros_init()),
    "keras": (nn.initializers.glorot_uniform(), nn.initializers.zeros_init()),
    "zeros": (nn.initializers.zeros_init(), nn.initializers.zeros_init()),
}
PARTS = ("all", "backbones", "head")


class GeMPool(nn.Module):
  """Generalized-mean pooling (eq. 3): (mean_hw x^p)^(1/p), p learnable (init 3); p=1 is average pooling."""

  p_init: float = 3.0
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.param("p", nn.initializers.constant(self.p_init), (1,), self.param_dtype)
    p = p.astype(jnp.float32)
    # Fused features are not ReLU'd; clamp so the power is defined. The mean runs in float32.
    x = jnp.maximum(x.astype(jnp.float32), self.epsilon)
    return jnp.mean(x ** p, axis=(1, 2)) ** (1.0 / p)


class ResDenseNet(nn.Module):
  """Res-Dense Net. `__call__(x, train)` takes raw RGB [0, 255] NHWC and returns float32 logits.

  The two halves, with the same variables and parameter paths as `__call__`:
    model.apply(variables, x, train, method="backbone_features") -> {backbone name: final feature map}
    model.apply(variables, features, train, method="head", rngs=...) -> logits
  so that `head(backbone_features(x))` is `__call__(x)` (the same dropout key reaches the same "dropout"
  module). `backbone_features` needs `mutable=["batch_stats"]` when a backbone BatchNorm trains.

  Attributes:
    backbones: names in BACKBONES; one name gives the single-backbone baseline.
    fusion_filters / fusion_kernel: the Conv2D each branch's final feature map goes through (same width).
    fusion_activation: None (linear, default) or "relu" after each fusion conv.
    pooling: "avg" (global average) or "gem" (generalized mean, learnable p).
    dropout: rate before the head.
    num_outputs: 1 (sigmoid form) or the number of classes (softmax form).
    head_init: initialisers of the "predictions" Dense, a key of HEAD_INITS ("flax", "keras" or "zeros").
    preprocessing: "keras" (each backbone its own Keras mode: caffe for ResNet, tf for ResNet V2, torch for
      DenseNet) or
      "authors" (caffe mode then rescaling to [-1, 1], fed to both, as the authors' code does).
    backbone_kwargs: {backbone name: constructor overrides}, e.g. small stage sizes for the demo.
    frozen_bn: ((backbone name, (BatchNorm layer names, ...)), ...) that run in inference mode.
    backbone_bn_inference: every backbone BatchNorm in inference mode (the authors' Keras code).
  """

  backbones: Sequence[str] = ("resnet101", "densenet121")
  fusion_filters: int = 1024
  fusion_kernel: int = 3
  fusion_activation: str | None = None
  pooling: str = "avg"
  dropout: float = 0.2
  num_outputs: int = 1
  head_init: str = "flax"
  preprocessing: str = "keras"
  backbone_kwargs: Mapping[str, Mapping[str, Any]] | None = None
  frozen_bn: Sequence[tuple[str, Sequence[str]]] = ()
  backbone_bn_inference: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def backbone_config(self, name: str) -> dict:
    """Constructor arguments of backbone `name` (headless, this model's dtypes and frozen BatchNorms)."""
    if name not in BACKBONES:
      raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    kwargs = dict((self.backbone_kwargs or {}).get(name, {}))
    kwargs.update(include_top=False, pooling=None, dtype=self.dtype, param_dtype=self.param_dtype,
                  frozen_bn=tuple(dict(self.frozen_bn).get(name, ())))
    return kwargs

  def backbone_modules(self) -> dict[str, nn.Module]:
    """Unbound copies of the backbones (for keras_layers() and weight loading), by sub-tree name."""
    return {name: BACKBONES[name](**self.backbone_config(name), parent=None) for name in self.backbones}

  def keras_layers(self) -> dict[str, list]:
    """Each backbone's Keras layer list (Keras `model.layers` order), by sub-tree name."""
    return {name: module.keras_layers() for name, module in self.backbone_modules().items()}

  def preprocess(self, x, backbone: str):
    """Raw RGB [0, 255] -> the input this backbone's ImageNet weights expect."""
    x = x.astype(jnp.float32)
    if self.preprocessing == "keras":
      return preprocess_input(x, PREPROCESSING_MODE[backbone])
    if self.preprocessing == "authors":
      return preprocess_input(x, "caffe") / 127.5 - 1.0
    raise ValueError(f"unknown preprocessing {self.preprocessing!r}; choose one of {PREPROCESSING}")

  def backbone_features(self, x, train: bool = False) -> dict[str, jax.Array]:
    """{backbone name: its final feature map} of raw RGB `x`, exactly what `__call__` feeds the fusion convs."""
    return self(x, train, part="backbones")

  def head(self, features: Mapping[str, jax.Array], train: bool = False) -> jax.Array:
    """Logits from `backbone_features`' output: fusion convs, optional relu, add, pooling, dropout, Dense."""
    return self(features, train, part="head")

  @nn.compact
  def __call__(self, x, train: bool = False, *, part: str = "all"):
    """`part`: "all" (raw RGB to logits), "backbones" (see backbone_features) or "head" (see head).

    One compact method builds every submodule under its one name whatever the part, so the halves share the
    variables tree; "all" traces the same ops in the same order as before the split (a test holds the jaxpr).
    """
    if len(set(self.backbones)) != len(self.backbones) or not self.backbones:
      raise ValueError(f"backbones must be one or more distinct names, got {tuple(self.backbones)}")
    if part not in PARTS:
      raise ValueError(f"unknown part {part!r}; choose one of {PARTS}")
    if part == "head" and set(x) != set(self.backbones):
      raise ValueError(f"head: the features must have one entry per backbone {tuple(self.backbones)}, "
                       f"got {tuple(x)}")
    backbone_train = train and not self.backbone_bn_inference
    branches, feature_maps = [], {}
    for name in self.backbones:
      if part == "head":
        features = x[name]
      else:
        features = BACKBONES[name](**self.backbone_config(name), name=name)(self.preprocess(x, name),
                                                                            train=backbone_train)
        if part == "backbones":
          feature_maps[name] = features
          continue
      features = nn.Conv(self.fusion_filters, (self.fusion_kernel, self.fusion_kernel), padding="SAME",
                         dtype=self.dtype, param_dtype=self.param_dtype, name=f"{name}_fusion_conv")(features)
      if self.fusion_activation == "relu":
        features = nn.relu(features)
      elif self.fusion_activation is not None:
        raise ValueError(f"unknown fusion_activation {self.fusion_activation!r}; choose None or 'relu'")
      branches.append(features)
    if part == "backbones":
      return feature_maps
    if len({b.shape for b in branches}) != 1:
      raise ValueError(f"the backbones' feature maps must have the same size to be added, got "
                       f"{[b.shape for b in branches]} for {tuple(self.backbones)}")
    x = sum(branches[1:], branches[0])  # "add"
    if self.pooling == "avg":
      x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    elif self.pooling == "gem":
      x = GeMPool(dtype=self.dtype, param_dtype=self.param_dtype, name="gem_pool")(x)
    else:
      raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {POOLING}")
    x = nn.Dropout(self.dropout, name="dropout")(x, deterministic=not train)
    if self.head_init not in HEAD_INITS:
      raise ValueError(f"unknown head_init {self.head_init!r}; choose one of {tuple(HEAD_INITS)}")
    kernel_init, bias_init = HEAD_INITS[self.head_init]
    x = nn.Dense(self.num_outputs, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=kernel_init,
                 bias_init=bias_init, name="predictions")(x)
    return x.astype(jnp.float32)
