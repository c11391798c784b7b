"""Keras-named layer helpers shared by the backbones, and the Keras layer list they record.

Every op a backbone applies goes through one of these helpers, which (1) builds the Flax module or applies the
parameter-free op, (2) records the Keras layer it stands for and (3) hands its output to `features.emit` (kept
only under `features.capturing`: `model.apply(v, x, features=(...))`). Tracing a backbone once therefore yields
Keras's `model.layers` list (parameter-free layers included) from the same code that computes the network: the
freezing rule "first N Keras layers" and the weight loader both read it, and there is no second hand-written copy
to drift.
The block functions apply ops in Keras's layer order, so the trace order is Keras's order.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from resdense_jax.models import checks, loading
from resdense_jax.models.features import emit, requested, suspended

# Keras applications use this epsilon for every BatchNormalization; momentum 0.99 is the Keras default.
BN_EPSILON = 1.001e-5
BN_MOMENTUM = 0.99
# What `config.train.remat="blocks"` keeps from the forward pass: each residual block's output and each dense
# block's new channels (not the growing concatenation); everything inside a block is recomputed.
REMAT_SAVED = "block_output"


def block_output(x: jax.Array) -> jax.Array:
  """Marks a block's output for the "blocks" rematerialisation policy (an identity otherwise)."""
  return checkpoint_name(x, REMAT_SAVED)

VariablePath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """One entry of a Keras model's `layers` list: its name, class and the Flax variables holding its weights.

  `weights` follows Keras's weight order for the layer (Conv2D: kernel, bias; BatchNormalization: gamma, beta,
  moving_mean, moving_variance; Dense: kernel, bias), each as a path into the Flax variables dict.
  """
  name: str
  class_name: str
  weights: tuple[VariablePath, ...] = ()


_RECORDING: contextvars.ContextVar[list[KerasLayer] | None] = contextvars.ContextVar(
    "keras_layer_recording", default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[KerasLayer]]:
  """Collects the KerasLayer of every helper call made inside the block."""
  layers: list[KerasLayer] = []
  token = _RECORDING.set(layers)
  try:
    yield layers
  finally:
    _RECORDING.reset(token)


def record(name: str, class_name: str, weights: Sequence[VariablePath] = ()) -> None:
  layers = _RECORDING.get()
  if layers is not None:
    layers.append(KerasLayer(name, class_name, tuple(weights)))


def trace_keras_layers(module: nn.Module, input_size: int = checks.MIN_SIZE) -> list[KerasLayer]:
  """Runs `module.init` abstractly (no FLOPs, no memory) and returns the Keras layers it recorded."""
  x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
  with recording() as layers, suspended():
    jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), x)
  return layers


_CACHE: dict[tuple, tuple[KerasLayer, ...]] = {}

# Fields that change no layer or weight of the Keras list.
_NON_ARCHITECTURE_FIELDS = ("frozen_bn", "dtype", "param_dtype", "parent", "name")


def cached_keras_layers(module: nn.Module) -> list[KerasLayer]:
  """`trace_keras_layers` of a fresh copy of `module`, cached per architecture."""
  fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
            if f.name not in _NON_ARCHITECTURE_FIELDS}
  key = (type(module).__qualname__, repr(sorted(fields.items())))
  if key not in _CACHE:
    _CACHE[key] = tuple(trace_keras_layers(type(module)(**fields, parent=None)))
  return list(_CACHE[key])


# ---- Keras layers as Flax calls. `module` is the enclosing compact module (its dtype settings are used). ----

def input_layer(x: jax.Array, name: str = "input_layer") -> jax.Array:
  record(name, "InputLayer")
  return emit(name, x)


def zero_padding(x: jax.Array, pad: int, name: str) -> jax.Array:
  record(name, "ZeroPadding2D")
  return emit(name, jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))))


def conv(module: nn.Module, x: jax.Array, filters: int, kernel_size: int, name: str, *, strides: int = 1,
         padding: str = "VALID", use_bias: bool = True) -> jax.Array:
  weights = [("params", name, "kernel")] + ([("params", name, "bias")] if use_bias else [])
  record(name, "Conv2D", weights)
  # Keras 'same' equals XLA 'SAME' here: every 'same' conv in these backbones has stride 1.
  return emit(name, nn.Conv(filters, (kernel_size, kernel_size), strides=(strides, strides), padding=padding,
                            use_bias=use_bias, dtype=module.dtype, param_dtype=module.param_dtype, name=name)(x))


def batch_norm(module: nn.Module, x: jax.Array, name: str, train: bool) -> jax.Array:
  record(name, "BatchNormalization", [("params", name, "scale"), ("params", name, "bias"),
                                      ("batch_stats", name, "mean"), ("batch_stats", name, "var")])
  # A frozen layer keeps Keras's inference behaviour: moving statistics used, never updated.
  use_running_average = not train or name in module.frozen_bn
  return emit(name, nn.BatchNorm(use_running_average=use_running_average, momentum=BN_MOMENTUM,
                                 epsilon=BN_EPSILON, dtype=module.dtype, param_dtype=module.param_dtype,
                                 name=name)(x))


def relu(x: jax.Array, name: str) -> jax.Array:
  record(name, "Activation")
  return emit(name, nn.relu(x))


def max_pool(x: jax.Array, window: int, strides: int, name: str) -> jax.Array:
  record(name, "MaxPooling2D")
  return emit(name, nn.max_pool(x, (window, window), strides=(strides, strides), padding="VALID"))


def avg_pool(x: jax.Array, window: int, strides: int, name: str) -> jax.Array:
  record(name, "AveragePooling2D")
  return emit(name, nn.avg_pool(x, (window, window), strides=(strides, strides), padding="VALID"))


def add(xs: Sequence[jax.Array], name: str) -> jax.Array:
  record(name, "Add")
  out = xs[0]
  for x in xs[1:]:
    out = out + x
  return emit(name, out)


def concatenate(xs: Sequence[jax.Array], name: str) -> jax.Array:
  record(name, "Concatenate")
  return emit(name, jnp.concatenate(xs, axis=-1))


def global_pool(x: jax.Array, pooling: str) -> jax.Array:
  """Keras's `pooling="avg"|"max"` (layers named avg_pool / max_pool)."""
  if pooling == "avg":
    record("avg_pool", "GlobalAveragePooling2D")
    return emit("avg_pool", jnp.mean(x, axis=(1, 2)))
  if pooling == "max":
    record("max_pool", "GlobalMaxPooling2D")
    return emit("max_pool", jnp.max(x, axis=(1, 2)))
  raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")


def classifier(module: nn.Module, x: jax.Array, num_classes: int, activation: str | None) -> jax.Array:
  """Keras's include_top head: global average pool, then the `predictions` Dense layer."""
  x = global_pool(x, "avg")
  record("predictions", "Dense", [("params", "predictions", "kernel"), ("params", "predictions", "bias")])
  x = nn.Dense(num_classes, dtype=module.dtype, param_dtype=module.param_dtype, name="predictions")(x)
  x = x.astype(jnp.float32)
  # Keras's Dense carries its activation: the `predictions` layer's output is the softmax.
  if activation == "softmax":
    return emit("predictions", nn.softmax(x))
  if activation is None:
    return emit("predictions", x)
  raise ValueError(f"classifier_activation must be 'softmax' or None, got {activation!r}")


def application_doc(keras_name: str, what: str, mode: str, channels: int, layer: str) -> str:
  """The docstring of a named model (ResNet50, DenseNet121, ...): Keras's arguments, input, output."""
  return f"""Keras's `keras.applications.{keras_name}`: {what}.

      model, variables = models.{keras_name}.pretrained("imagenet", pooling="avg")
      pooled = model.apply(variables, models.preprocess_input(rgb, "{mode}"))
      maps = model.apply(variables, x, features=("{layer}",))  # {{name: output}}

  Keras's arguments are fields: include_top, pooling (None, "avg" or "max"), num_classes (Keras's `classes`),
  classifier_activation ("softmax" or None); Keras's `weights=` is `.pretrained(weights)`, and there is no
  `input_shape`: any input size at least 32x32 works. Also frozen_bn, dtype, param_dtype (see KerasApplication).

  Input: NHWC float (or uint8) images (N, H, W, 3); the ImageNet weights expect Keras's "{mode}" preprocessing,
  `models.preprocess_input(rgb_0_255, "{mode}")`.

  Output (`__call__`): the final feature map (N, h, w, {channels}) with h = `model.feature_size(H)` (about
  H / 32); with pooling, (N, {channels}); with include_top, (N, num_classes) float32 probabilities (logits with
  classifier_activation=None). With `features=names`: {{Keras layer name: output}} instead.
  """


class KerasApplication(nn.Module):
  """Fields, input checks, output end and `.pretrained` shared by the Keras Applications backbones.

  The fields are Keras's constructor arguments (`keras.applications.ResNet50(...)`):
    include_top: Keras's `predictions` head (global average pool + Dense, softmax unless
      `classifier_activation=None`), as `include_top=True`.
    pooling: None (the final feature map), "avg" or "max" (global pooling), when include_top is False.
    num_classes: Keras's `classes` (1000 for the ImageNet top).
    classifier_activation: "softmax" or None (logits), Keras's `classifier_activation`.
    frozen_bn: BatchNorm layer names that always run in inference mode (statistics fixed) even with train=True.
    dtype / param_dtype: compute and parameter dtypes (e.g. bfloat16 compute, float32 parameters).
  Keras's `weights=` is `.pretrained(...)`; `input_shape` is not needed: any NHWC batch at least 32x32.
  """
  include_top: bool = False
  pooling: str | None = None
  num_classes: int = 1000
  classifier_activation: str | None = "softmax"
  frozen_bn: Sequence[str] = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def output(self, x: jax.Array) -> jax.Array:
    if self.include_top:
      return classifier(self, x, self.num_classes, self.classifier_activation)
    if self.pooling is not None:
      x = global_pool(x, self.pooling)
    return x

  @property
  def where(self) -> str:
    """How errors name the model: "ResNet50", or "ResNet50 'resnet50'" inside a ResDenseNet."""
    return type(self).__name__ + (f" {self.name!r}" if self.name else "")

  @nn.nowrap
  def check_input(self, x: Any, train: bool, features: Any) -> tuple[str, ...] | None:
    """Refuses what the model cannot take (at trace time, no op added); returns the feature names asked for."""
    checks.check_images(x, self.where, train=train)
    return requested(features)

  @nn.nowrap
  def feature_size(self, size: int) -> int:
    """The final feature map's side for an input side `size` (each family's strides and paddings)."""
    raise NotImplementedError(type(self).__name__)

  @property
  def min_input_size(self) -> int:
    """The smallest input side accepted: Keras's 32, or more where the final feature map would be empty."""
    return next(s for s in range(checks.MIN_SIZE, 1 << 16) if self.feature_size(s) > 0)

  def keras_layers(self) -> list[KerasLayer]:
    """Keras's `model.layers` for this architecture, with the Flax variables of each layer's weights."""
    return cached_keras_layers(self)

  @loading.class_or_instance_method
  def pretrained(self, weights: Any = "imagenet", *, rng: Any = 0, cache_dir: Any = None,
                 download: bool = True) -> dict[str, Any]:
    """Keras weights as this model's {"params", "batch_stats"}, every variable checked (`weights.load_keras`).

    On the class it builds the model from the constructor arguments and returns (model, variables):

        model, variables = models.ResNet101.pretrained("imagenet", include_top=False, pooling="avg")
        variables = models.ResNet(stage_sizes=(2, 2, 2, 2)).pretrained("/w/my_resnet18.h5")

    weights: "imagenet" (Keras's published file for this architecture and top, found in `cache_dir` or
      `~/.keras/models`, else downloaded and MD5-checked), a published file name, the path of a Keras file
      (legacy `.h5`, full-model `.h5`, `.weights.h5`, `.keras`; `path#name` picks a nested model), or "none"
      (initial weights from `rng`).
    rng: a PRNG key or an int seed (`jax.random.key(seed, impl="rbg")`, as the training engine's), used only
      for "none".
    cache_dir / download: where published files are looked up first, and whether a missing one may be fetched.
    """
    return loading.backbone_variables(self, weights, rng=rng, cache_dir=cache_dir, download=download)
