"""Keras Applications' `preprocess_input` modes, jit-friendly (keras/src/applications/imagenet_utils.py).

Input is RGB in [0, 255], channels last. ImageNet weights expect the mode their model was trained with:
ResNet "caffe", DenseNet "torch".
"""

from __future__ import annotations

import jax.numpy as jnp

IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

MODES = ("caffe", "torch", "tf")


def preprocess_input(x, mode: str):
  """caffe: RGB to BGR, minus the ImageNet mean (no scaling); torch: /255 then ImageNet mean/std; tf: to [-1, 1]."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  if mode == "caffe":
    return x[..., ::-1] - jnp.asarray(IMAGENET_MEAN_BGR, x.dtype)
  if mode == "torch":
    return (x / 255.0 - jnp.asarray(IMAGENET_MEAN_RGB, x.dtype)) / jnp.asarray(IMAGENET_STD_RGB, x.dtype)
  if mode == "tf":
    return x / 127.5 - 1.0
  raise ValueError(f"preprocess_input: mode must be one of {MODES}, got {mode!r}")
