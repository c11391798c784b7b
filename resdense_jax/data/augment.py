"""Host-side slice transforms: resize, Keras-style random flip and rotation, grey to RGB.

Semantics follow Keras `RandomFlip("horizontal")` (mirror left-right with probability 1/2) and
`RandomRotation(factor, fill_mode="constant", interpolation="bilinear")`: an angle drawn
uniformly from [-factor * 2 pi, factor * 2 pi], positive counter-clockwise, about the image
centre, pixels from outside filled with 0. OpenCV does the pixel work (it releases the GIL and
is several times faster than PIL for these operations).
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 `[h, w]` -> `[size, size]`: area averaging when shrinking, bilinear when growing."""
  if image.shape == (size, size):
    return image
  shrinking = image.shape[0] > size or image.shape[1] > size
  return cv2.resize(image, (size, size),
                    interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def rotation_angle(rng: np.random.Generator, factor: float) -> float:
  """Radians, uniform in [-factor * 2 pi, factor * 2 pi] (Keras RandomRotation's factor)."""
  limit = factor * 2.0 * math.pi
  return float(rng.uniform(-limit, limit))


def rotate(image: np.ndarray, angle: float) -> np.ndarray:
  """Rotates `[h, w]` counter-clockwise by `angle` radians, bilinear, constant 0 fill."""
  if angle == 0.0:
    return image
  h, w = image.shape[:2]
  matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), math.degrees(angle), 1.0)
  return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def flip_horizontal(image: np.ndarray) -> np.ndarray:
  return cv2.flip(image, 1)


def random_flip_and_rotate(image: np.ndarray, rng: np.random.Generator, *,
                           rotation_factor: float = 0.2) -> np.ndarray:
  """RandomFlip("horizontal") then RandomRotation(rotation_factor), from one generator."""
  flip = rng.random() < 0.5
  angle = rotation_angle(rng, rotation_factor) if rotation_factor > 0 else 0.0
  if flip:
    image = flip_horizontal(image)
  return rotate(image, angle)


def grey_to_rgb(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """`[h, w]` -> `[h, w, 3]` with the grey value in every channel (into `out` if given)."""
  if out is None:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
  cv2.cvtColor(image, cv2.COLOR_GRAY2RGB, dst=out)
  return out
