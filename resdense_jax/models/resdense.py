"""Res-Dense Net (the paper's Figure 4): two ImageNet backbones side by side, fused by addition.

    raw RGB slice [0, 255]
      |-- preprocess (caffe) -- ResNet101 ------ Conv2D(1024, 3x3, same) "resnet101_fusion_conv" --.
      |-- preprocess (torch) -- DenseNet121 ---- Conv2D(1024, 3x3, same) "densenet121_fusion_conv" -+- "add"
                                                                                                     |
               global average pooling (or GeM with learnable p, eq. 3, "gem_pool") -- Dropout(0.2) --
               Dense "predictions" -> logits (1 for sigmoid, or num_classes for softmax)

Each backbone is any entry of `BACKBONES`, built headless (include_top=False, pooling=None) under its
own name, so Keras ImageNet weights load into `params[<backbone>]`: `model.pretrained("imagenet", rng=...)`
fills every backbone and initialises the rest. One backbone gives the single-backbone baseline with the same head.
`model.apply(variables, x, features=("resnet101/conv4_block23_out", "add"))` returns intermediate outputs.

The model also runs in two halves on the same variables (resdense_jax/feature_cache.py trains the head on
cached backbone features): `backbone_features` (preprocessing and backbones only) and `head` (fusion convs to
logits) compose to `__call__`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resdense_jax.models import checks, loading
from resdense_jax.models.backbones import BACKBONES, PREPROCESSING_MODE
from resdense_jax.models.features import Names, capturing, requested, unknown_name_message
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
# Backbone fields the fused model sets itself (headless, its dtypes and frozen BatchNorms).
_SET_BY_RESDENSE = ("include_top", "pooling", "num_classes", "classifier_activation", "frozen_bn", "dtype",
                    "param_dtype")


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
  """Res-Dense Net. `__call__(x, train=False)` takes raw RGB [0, 255] NHWC and returns float32 logits.

      model = models.ResDenseNet(backbones=("resnet101", "densenet121"))
      variables = model.pretrained("imagenet", rng=jax.random.key(0))  # backbones from Keras, head from rng
      logits = model.apply(variables, images)  # images: (N, H, W, 3) uint8 or float in [0, 255]

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
    backbone_kwargs: {backbone name: constructor overrides}, e.g. small stage sizes for the demo; only for
      backbones in `backbones`, and not the fields the fused model sets (include_top, pooling, dtype, ...).
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

  def __post_init__(self):
    # Misspelt or misplaced names fail where the model is built, before any look-up can raise a bare KeyError.
    self.check_fields()
    super().__post_init__()

  @nn.nowrap
  def check_fields(self) -> None:
    """ValueError for an unknown backbone name (with the close match), repeated or no backbones, and
    backbone_kwargs for a backbone not in `backbones` or naming a field it lacks."""
    names = tuple(self.backbones) if not isinstance(self.backbones, str) else (self.backbones,)
    if isinstance(self.backbones, str) or not names or len(set(names)) != len(names):
      raise ValueError(f"ResDenseNet: backbones must be one or more distinct names, got {self.backbones!r}")
    for name in names:
      checks.check_choice(name, sorted(BACKBONES), "ResDenseNet", "backbone")
    for name, kwargs in (self.backbone_kwargs or {}).items():
      if name not in names:
        raise ValueError(f"ResDenseNet: backbone_kwargs has an entry for {name!r}, which is not one of backbones "
                         f"{names}: it would be ignored; remove it, or add {name!r} to backbones")
      fields = [f.name for f in dataclasses.fields(BACKBONES[name]) if f.name not in ("parent", "name")]
      for key in dict(kwargs):
        if key in _SET_BY_RESDENSE:
          raise ValueError(f"ResDenseNet: backbone_kwargs[{name!r}][{key!r}]: set by the fused model itself (the "
                           "backbones are headless and take its dtype and frozen_bn)")
        checks.check_choice(key, [f for f in fields if f not in _SET_BY_RESDENSE],
                            f"ResDenseNet: backbone_kwargs[{name!r}]", f"field of {BACKBONES[name].__name__}")

  def backbone_config(self, name: str) -> dict:
    """Constructor arguments of backbone `name` (headless, this model's dtypes and frozen BatchNorms)."""
    checks.check_choice(name, tuple(self.backbones), "ResDenseNet", "backbone (not one of backbones)")
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

  @nn.nowrap
  def feature_names(self) -> tuple[str, ...]:
    """The fused model's own `features` names; each backbone's layers are "<backbone>/<Keras layer name>"."""
    pooled = "gem_pool" if self.pooling == "gem" else "avg_pool"
    return (*(f"{name}_fusion_conv" for name in self.backbones), "add", pooled, "predictions")

  @property
  def min_input_size(self) -> int:
    """The smallest square input side at which every backbone takes the input and their feature maps agree."""
    fns = {name: module.feature_size for name, module in self.backbone_modules().items()}
    return checks.agreeing_sizes(fns, checks.MIN_SIZE)[1]

  @nn.nowrap
  def check_input(self, x: Any, train: bool, part: str = "all") -> None:
    """The image checks of the backbones, then (for the whole model) that every backbone's feature map has the
    same size (Python arithmetic on the shape, no trace); the error names the nearest sizes that work."""
    checks.check_images(x, "ResDenseNet", train=train, batch_norm_trains=not self.backbone_bn_inference)
    if part != "all":
      return  # backbone_features alone adds nothing, so its maps may differ
    _, height, width, _ = jnp.shape(x)
    fns = {name: (module.feature_size, module.feature_size) for name, module in self.backbone_modules().items()}
    if len({(fh(height), fw(width)) for fh, fw in fns.values()}) != 1:
      raise ValueError(checks.size_mismatch_message("ResDenseNet", height, width, fns))

  @nn.nowrap
  def split_features(self, features: Names) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]] | None:
    """({backbone: its Keras layer names asked for}, every name asked) from "<backbone>/<layer>" and the fused
    model's own names, or None when nothing is asked; ValueError for a name that is neither (close matches)."""
    names = requested(features)
    if names is None:
      return None
    per_backbone: dict[str, list[str]] = {name: [] for name in self.backbones}
    own = self.feature_names()
    for name in names:
      backbone, sep, layer = name.partition("/")
      if sep:
        checks.check_choice(backbone, tuple(self.backbones), f"ResDenseNet: features {name!r}",
                            "backbone (not one of backbones)")
        per_backbone[backbone].append(layer)
      elif name not in own:
        # An error path only: the backbones' layer lists (a cached abstract trace) give the prefixed names.
        layers = [f"{b}/{layer.name}" for b, ls in self.keras_layers().items() for layer in ls]
        raise ValueError(unknown_name_message("ResDenseNet", name, [*own, *layers], what="feature") +
                         "; a backbone's layers are '<backbone>/<Keras layer name>'")
    return {b: tuple(ls) for b, ls in per_backbone.items()}, names

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

  @loading.class_or_instance_method
  def pretrained(self, weights: Any = "imagenet", *, rng: Any = 0, cache_dir: Any = None,
                 download: bool = True) -> dict[str, Any]:
    """{"params", "batch_stats"} with every backbone from Keras weights and the fusion convs and head from `rng`.

    On the class it builds the model from the constructor arguments and returns (model, variables):

        model, variables = models.ResDenseNet.pretrained("imagenet", rng=0, backbones=("resnet50", "densenet121"))
        variables = model.pretrained({"resnet101": "/w/radimagenet.h5", "densenet121": "imagenet"}, rng=key)

    weights: one source for every backbone or {backbone: source}; a source is "imagenet" (Keras's published
      file for that backbone, found in `cache_dir` or `~/.keras/models`, else downloaded and MD5-checked), a
      published file name, the path of a Keras file (a full model holding the backbones as nested models works
      for each; `path#name` picks one), or "none" (that backbone's initial weights). The same forms as
      config.model.pretrained (`train.load_pretrained` runs the same code).
    rng: a PRNG key or an int seed (`jax.random.key(seed, impl="rbg")`, as the training engine's); the
      non-backbone variables equal those of `model.init(rng, x)`.
    cache_dir / download: where published files are looked up first, and whether a missing one may be fetched.
    """
    return loading.fused_variables(self, weights, rng=rng, cache_dir=cache_dir, download=download)

  @nn.compact
  def __call__(self, x, train: bool = False, *, part: str = "all", features: Names = None):
    """Logits of raw RGB images, or one half of the model, or intermediate outputs by name.

    One compact method builds every submodule under its one name whatever the part, so the halves share the
    variables tree; "all" traces the same ops in the same order as before the split (a test holds the jaxpr).

    Args:
      x: (N, H, W, 3) raw RGB in [0, 255], uint8 or float, each side at least 32 and such that every
        backbone's final feature map has the same size (e.g. multiples of 32 for ResNet101 + DenseNet121; the
        error for another size names the nearest that work); for part="head", `backbone_features`' output.
      train: dropout on and BatchNorm on batch statistics (`mutable=["batch_stats"]`, `rngs={"dropout": key}`);
        the default is inference.
      part: "all" (raw RGB to logits), "backbones" (see backbone_features) or "head" (see head).
      features: names to return instead of the logits ({name: output}): a backbone's
        Keras layers as "<backbone>/<layer>" (e.g. "resnet101/conv4_block23_out", "densenet121/pool3_relu",
        any of `keras_layers()[backbone]`), and the fused model's own `feature_names()`: "<backbone>_fusion_conv"
        (after fusion_activation), "add" (the fused map), "avg_pool" / "gem_pool" (pooled) and "predictions"
        (logits). Only with part="all".

    Returns:
      (N, num_outputs) float32 logits; a dict for part="backbones" or with `features`.
    """
    if part not in PARTS:
      raise ValueError(f"unknown part {part!r}; choose one of {PARTS}")
    if part == "head" and set(x) != set(self.backbones):
      raise ValueError(f"head: the features must have one entry per backbone {tuple(self.backbones)}, "
                       f"got {tuple(x)}")
    if features is not None and part != "all":
      raise ValueError(f"ResDenseNet: features=... needs part='all', got part={part!r}")
    if part != "head":
      self.check_input(x, train, part)
    wanted = self.split_features(features)
    found: dict[str, Any] = {}
    backbone_train = train and not self.backbone_bn_inference
    branches, feature_maps = [], {}
    for name in self.backbones:
      if part == "head":
        fmap = x[name]
      else:
        layers = wanted[0][name] if wanted and wanted[0][name] else None
        with capturing(layers) as captured:
          fmap = BACKBONES[name](**self.backbone_config(name), name=name)(self.preprocess(x, name),
                                                                          train=backbone_train)
        if captured is not None:
          found.update(captured.result(layers, f"ResDenseNet backbone {name!r}", prefix=f"{name}/"))
        if part == "backbones":
          feature_maps[name] = fmap
          continue
      fmap = nn.Conv(self.fusion_filters, (self.fusion_kernel, self.fusion_kernel), padding="SAME",
                     dtype=self.dtype, param_dtype=self.param_dtype, name=f"{name}_fusion_conv")(fmap)
      if self.fusion_activation == "relu":
        fmap = nn.relu(fmap)
      elif self.fusion_activation is not None:
        raise ValueError(f"unknown fusion_activation {self.fusion_activation!r}; choose None or 'relu'")
      found[f"{name}_fusion_conv"] = fmap
      branches.append(fmap)
    if part == "backbones":
      return feature_maps
    if len({b.shape for b in branches}) != 1:
      raise ValueError(f"the backbones' feature maps must have the same size to be added, got "
                       f"{[b.shape for b in branches]} for {tuple(self.backbones)}")
    x = sum(branches[1:], branches[0])  # "add"
    found["add"] = x
    if self.pooling == "avg":
      x = found["avg_pool"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    elif self.pooling == "gem":
      x = found["gem_pool"] = GeMPool(dtype=self.dtype, param_dtype=self.param_dtype, name="gem_pool")(x)
    else:
      raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {POOLING}")
    x = nn.Dropout(self.dropout, name="dropout")(x, deterministic=not train)
    if self.head_init not in HEAD_INITS:
      raise ValueError(f"unknown head_init {self.head_init!r}; choose one of {tuple(HEAD_INITS)}")
    kernel_init, bias_init = HEAD_INITS[self.head_init]
    x = nn.Dense(self.num_outputs, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=kernel_init,
                 bias_init=bias_init, name="predictions")(x)
    x = found["predictions"] = x.astype(jnp.float32)
    return x if wanted is None else {name: found[name] for name in wanted[1]}
