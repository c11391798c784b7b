"""Class activation maps of Res-Dense Net: CAM on the fused feature map, and Grad-CAM on any layer.

CAM (Zhou et al. 2016) is what the paper's design motivates: the head is global average pooling followed by one
Dense layer, so the COVID logit of a slice is exactly the spatial mean of

    cam(y, x) = sum_k w_k F_k(y, x)        (F: the fused feature map "add", w: the head's COVID weights)

plus the head's bias. `cam` is thus each location's contribution to the logit: positive pushes towards COVID.
For a softmax head, w is the COVID column minus the non-COVID column (their difference is the logit of
sigmoid(P(COVID))). With GeM pooling the decomposition is no longer exact, but the map is still the
projection of the head's weights onto the fused features.

Grad-CAM (Selvaraju et al. 2017) works for any named module: the gradient of the COVID logit with respect to
the module's output, averaged over space, weights its channels; ReLU keeps the positive evidence.
Layers are module paths below the Res-Dense Net, e.g. "resnet101" (the backbone's final feature map, Keras's
conv5_block3_out), "densenet121" (Keras's `relu`), "resnet101/conv5_block3_3_conv", "resnet101_fusion_conv".

Both are computed from outside the model (flax `capture_intermediates` and `intercept_methods`), so the
model code carries nothing for them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resdense_jax import losses

FUSION_SUFFIX = "_fusion_conv"


def covid_weights(params: dict) -> tuple[jax.Array, jax.Array]:
  """(w [C], b []) of the head such that the COVID logit is pooled_features @ w + b."""
  kernel = jnp.asarray(params["predictions"]["kernel"], jnp.float32)
  bias = jnp.asarray(params["predictions"]["bias"], jnp.float32)
  if kernel.shape[-1] == 1:
    return kernel[:, 0], bias[0]
  if kernel.shape[-1] == 2:
    return kernel[:, 1] - kernel[:, 0], bias[1] - bias[0]
  raise ValueError(f"CAM needs a head with 1 (sigmoid) or 2 (softmax) outputs, got {kernel.shape[-1]}")


def covid_logit(logits: jax.Array) -> jax.Array:
  """[B] logit of COVID vs non-COVID: the single logit, or the softmax logit difference."""
  logits = jnp.asarray(logits, jnp.float32)
  if logits.shape[-1] == 1:
    return logits[:, 0]
  return logits[:, 1] - logits[:, 0]


def _is_fusion_conv(module: nn.Module, method_name: str) -> bool:
  return method_name == "__call__" and module.name is not None and module.name.endswith(FUSION_SUFFIX)


def fused_features(model, variables: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(fused feature map "add" [B, h, w, C] float32, logits) of raw RGB [0, 255] NHWC `images`."""
  logits, state = model.apply(variables, images, train=False, capture_intermediates=_is_fusion_conv,
                              mutable=["intermediates"])
  captured = state["intermediates"]
  branches = []
  for name in model.backbones:
    features = captured[f"{name}{FUSION_SUFFIX}"]["__call__"][0].astype(jnp.float32)
    if model.fusion_activation == "relu":
      features = nn.relu(features)
    branches.append(features)
  return sum(branches[1:], branches[0]), logits


def class_activation_maps(model, variables: dict, images: jax.Array) -> dict[str, jax.Array]:
  """CAM at feature-map resolution.

  Returns {"cam": [B, h, w] logit contribution of each location, "logit": [B] COVID logit of the model,
  "bias": [] head bias, "prob": [B] P(COVID)}. With average pooling, cam.mean((1, 2)) + bias == logit.
  """
  features, logits = fused_features(model, variables, images)
  w, b = covid_weights(variables["params"])
  cam = jnp.einsum("bhwc,c->bhw", features, w)
  logit = covid_logit(logits)
  return {"cam": cam, "logit": logit, "bias": b, "prob": _probability(logits)}


def _probability(logits: jax.Array) -> jax.Array:
  return losses.covid_probability(logits)


def _layer_path(layer: str) -> tuple[str, ...]:
  path = tuple(part for part in layer.replace(".", "/").split("/") if part)
  if not path:
    raise ValueError("Grad-CAM needs a layer name, e.g. 'resnet101' or 'resnet101/conv5_block3_3_conv'")
  return path


def layer_names(model, variables: dict) -> list[str]:
  """Every module path Grad-CAM accepts, in call order ("resnet101", "resnet101/conv1_conv", ...)."""
  seen: list[str] = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.path:
      name = "/".join(context.module.path)
      if name not in seen:
        seen.append(name)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return seen


def _perturbed_apply(model, variables, images, path: tuple[str, ...], delta):
  """Model logits with `delta` added to the output of module `path`, and that output (before delta)."""
  found = []

  def add_delta(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and tuple(context.module.path) == path:
      if found:
        raise ValueError(f"layer {'/'.join(path)!r} is called more than once; pick a layer called once")
      found.append(out)
      out = out + delta.astype(out.dtype) if delta is not None else out
    return out

  with nn.intercept_methods(add_delta):
    logits = model.apply(variables, images, train=False)
  if not found:
    raise ValueError(f"no layer {'/'.join(path)!r} in this model; Grad-CAM takes a module path such as "
                     f"'{model.backbones[0]}' or '{model.backbones[0]}{FUSION_SUFFIX}' "
                     "(cam.layer_names(model, variables) lists them all)")
  return logits, found[0]


def grad_cam(model, variables: dict, images: jax.Array, layer: str) -> dict[str, jax.Array]:
  """Grad-CAM of the COVID logit at module `layer`.

  Returns {"cam": [B, h, w] (ReLU of the gradient-weighted channel sum, at the layer's resolution),
  "logit": [B], "prob": [B]}. Each image's logit depends only on its own activations (inference mode), so
  the gradient of the batch's summed logits gives every image's own gradient.
  """
  path = _layer_path(layer)
  images = jnp.asarray(images)
  _, activation = jax.eval_shape(lambda: _perturbed_apply(model, variables, images, path, None))

  def summed_logit(delta):
    logits, activations = _perturbed_apply(model, variables, images, path, delta)
    return covid_logit(logits).sum(), (logits, activations)

  delta = jnp.zeros(activation.shape, jnp.float32)
  grads, (logits, activations) = jax.grad(summed_logit, has_aux=True)(delta)
  if activations.ndim != 4:
    raise ValueError(f"layer {layer!r} outputs shape {activations.shape}; Grad-CAM needs a [B, h, w, C] map")
  alpha = grads.mean(axis=(1, 2))  # [B, C]
  cam = nn.relu(jnp.einsum("bhwc,bc->bhw", activations.astype(jnp.float32), alpha))
  return {"cam": cam, "logit": covid_logit(logits), "prob": _probability(logits)}


@functools.partial(jax.jit, static_argnums=(1,))
def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, h, w] -> [B, *size], bilinear (the usual way CAMs are laid over the input)."""
  maps = jnp.asarray(maps, jnp.float32)
  return jax.image.resize(maps, (maps.shape[0], *size), method="bilinear")


def compiled(fn, model, **kwargs) -> Any:
  """`fn(model, variables, images, **kwargs)` jit-compiled with the model (and layer) fixed."""
  return jax.jit(lambda variables, images: fn(model, variables, images, **kwargs))


def inside_outside_ratio(cam: np.ndarray, mask: np.ndarray) -> float:
  """mean of max(cam, 0) inside `mask` / mean outside: > 1 when the map concentrates on the mask."""
  cam = np.maximum(np.asarray(cam, np.float64), 0.0)
  mask = np.asarray(mask, bool)
  if cam.shape != mask.shape:
    raise ValueError(f"map shape {cam.shape} differs from mask shape {mask.shape}")
  if not mask.any() or mask.all():
    raise ValueError("the mask must have pixels both inside and outside")
  outside = cam[~mask].mean()
  return float(cam[mask].mean() / outside) if outside > 0 else float("inf")
