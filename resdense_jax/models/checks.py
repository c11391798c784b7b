"""What a model accepts, checked when it is traced: Python-level shape and dtype tests, no op in the program.

Each error names the model and says what is wrong and what to do. The limits are Keras's: NHWC batches of RGB
images at least 32x32 (`imagenet_utils.obtain_input_shape(min_size=32)` for ResNet, ResNet V2 and DenseNet).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from resdense_jax.models.features import close_matches

# Keras Applications' `min_size` for ResNet, ResNet V2 and DenseNet.
MIN_SIZE = 32
# How far from the given size to look for one where every backbone's feature map agrees (the fused model).
_SEARCH = 4096


def _dtype(x: Any):
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def check_images(x: Any, where: str, *, train: bool, batch_norm_trains: bool = True) -> None:
  """Raises ValueError unless `x` is an NHWC batch of 3-channel images (floating or uint8), at least
  MIN_SIZE x MIN_SIZE, and not empty when BatchNorm computes batch statistics (`train` and
  `batch_norm_trains`)."""
  shape = tuple(int(d) for d in jnp.shape(x))
  if len(shape) != 4:
    if len(shape) == 3 and shape[-1] == 3:
      hint = "; add a batch axis: x[None]"
    elif len(shape) == 3 and shape[0] == 3:
      hint = "; a channels-first image: x.transpose(1, 2, 0)[None]"
    elif len(shape) == 2:
      hint = "; a grey image: jnp.repeat(x[None, :, :, None], 3, axis=-1)"
    else:
      hint = ""
    raise ValueError(f"{where}: expected NHWC images (batch, height, width, 3), got shape {shape}{hint}")
  n, h, w, c = shape
  if c != 3 and shape[1] in (1, 3):
    raise ValueError(f"{where}: got shape {shape}, which looks channels-first (N, C, H, W); these models are "
                     f"channels-last (NHWC, Keras's default): x.transpose(0, 2, 3, 1)")
  if c == 1:
    raise ValueError(f"{where}: got 1 channel (shape {shape}); the models take RGB (3 channels): repeat the grey "
                     "channel, jnp.repeat(x, 3, axis=-1)")
  if c != 3:
    raise ValueError(f"{where}: expected 3 (RGB) channels in the last axis, got {c} (shape {shape})")
  dtype = np.dtype(_dtype(x))
  if not (jnp.issubdtype(dtype, jnp.floating) or dtype == np.uint8):
    raise ValueError(f"{where}: got dtype {dtype}; expected floating point or uint8 images (booleans and integer "
                     "labels are not images): x.astype(jnp.float32) if the values are pixels")
  if h < MIN_SIZE or w < MIN_SIZE:
    raise ValueError(f"{where}: input {h}x{w} is smaller than {MIN_SIZE}x{MIN_SIZE}, the smallest Keras accepts "
                     "for these applications; resize the images up")
  if n == 0 and train and batch_norm_trains:
    raise ValueError(f"{where}: an empty batch (shape {shape}) with train=True: BatchNorm's batch statistics of 0 "
                     "images are NaN; pass at least one image, or train=False")


def agreeing_sizes(size_fns: Mapping[str, Callable[[int], int]], size: int) -> tuple[int | None, int | None]:
  """The nearest input sides at or below / above `size` (at least MIN_SIZE) where every function (input side to
  feature-map side) gives the same, non-empty size; None where there is none within reach."""
  def works(s):
    sides = {fn(s) for fn in size_fns.values()}
    return len(sides) == 1 and min(sides) > 0

  below = next((s for s in range(size, MIN_SIZE - 1, -1) if works(s)), None)
  above = next((s for s in range(max(size, MIN_SIZE), size + _SEARCH) if works(s)), None)
  return below, above


def size_mismatch_message(where: str, height: int, width: int,
                          size_fns: Mapping[str, tuple[Callable[[int], int], Callable[[int], int]]]) -> str:
  """Why an input size does not fuse (each backbone's feature-map size) and the nearest sizes that do.

  `size_fns`: {backbone: (height fn, width fn)}, each input side to feature-map side."""
  maps = ", ".join(f"{name} {fh(height)}x{fw(width)}" for name, (fh, fw) in size_fns.items())
  hints, best = [], []
  for axis, size, index in (("height", height, 0), ("width", width, 1)):
    below, above = agreeing_sizes({name: fns[index] for name, fns in size_fns.items()}, size)
    options = [s for s in (below, above) if s is not None]
    if below == size:
      best.append(size)
      continue
    hints.append(f"{axis} {size}: {' or '.join(map(str, options)) or 'none nearby'}")
    best.append(min(options, key=lambda s: (abs(s - size), -s)) if options else size)
  return (f"{where}: the backbones' feature maps differ for a {height}x{width} input ({maps}) and must be equal "
          f"to be added; nearest sizes that work: {'; '.join(hints)} (e.g. {best[0]}x{best[1]})")


def check_choice(value: str, choices: Sequence[str], where: str, what: str) -> None:
  """ValueError naming an unknown `value`, the close match and the choices."""
  if value in choices:
    return
  matches = close_matches(str(value), choices)
  hint = f" (did you mean {matches[0]!r}?)" if matches else ""
  raise ValueError(f"{where}: unknown {what} {value!r}{hint}; choose from {tuple(choices)}")
