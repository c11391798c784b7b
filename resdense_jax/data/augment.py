"""Host-side slice transforms: resize (squash or aspect-preserving pad), Keras-style random flip and rotation,
grey to RGB.

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


# How a slice becomes the model's square input (`config.data.resize`, `scans.ReadOptions.resize`).
RESIZE_MODES = ("squash", "pad")
# What "pad" fills around the slice: 0 is the bottom of the window, so on windowed CT it is air (-1350 HU and
# below in the lung window), what surrounds the patient; JPEG / PNG exports have a black background too, and
# the rotation's constant fill (Keras RandomRotation fill_value 0) already brings that value in.
PAD_VALUE = 0


def _interpolation(shape: tuple[int, ...], target: tuple[int, int]) -> int:
  shrinking = shape[0] > target[0] or shape[1] > target[1]
  return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def content_box(shape: tuple[int, ...], size: int, mode: str = "squash") -> tuple[int, int, int, int]:
  """(y0, x0, y1, x1) of the model input `[size, size]` that a slice of `shape` (h, w) fills after
  `resize(..., mode=mode)`: the whole input for "squash"; for "pad" the longer side spans it and the other is
  scaled alike, rounded to the nearest pixel (at least 1) and centred (an odd remainder of padding goes to the
  bottom / right). Explanation maps are cut to this box before they are laid over the slice."""
  check_resize_mode(mode)
  h, w = int(shape[0]), int(shape[1])
  if mode == "squash" or h == w:
    return 0, 0, size, size
  if h > w:
    height, width = size, max(1, min(size, (2 * w * size + h) // (2 * h)))
  else:
    height, width = max(1, min(size, (2 * h * size + w) // (2 * w))), size
  top, left = (size - height) // 2, (size - width) // 2
  return top, left, top + height, left + width


def check_resize_mode(mode: str) -> str:
  if mode not in RESIZE_MODES:
    raise ValueError(f"unknown resize mode {mode!r} (config.data.resize); choose one of {RESIZE_MODES}")
  return mode


def resize(image: np.ndarray, size: int, *, out: np.ndarray | None = None,
           mode: str = "squash") -> np.ndarray:
  """uint8 `[h, w]` -> `[size, size]` (written into `out` if given): area averaging when shrinking, bilinear
  when growing.

  mode "squash": both sides scaled to `size` (a non-square slice is stretched). "pad": the aspect ratio kept,
  the longer side scaled to `size`, the slice centred and the rest filled with PAD_VALUE (`content_box` says
  where the slice lies). A square slice comes out the same, bit for bit, in both modes.
  """
  if mode != "squash" and check_resize_mode(mode) == "pad" and image.shape[0] != image.shape[1]:
    y0, x0, y1, x1 = content_box(image.shape, size, mode)
    if out is None:
      out = np.full((size, size), PAD_VALUE, image.dtype)
    else:  # Only the border: the box is written below.
      for border in (np.s_[:y0], np.s_[y1:], np.s_[y0:y1, :x0], np.s_[y0:y1, x1:]):
        out[border] = PAD_VALUE
    target = (y1 - y0, x1 - x0)
    if image.shape[:2] == target:
      out[y0:y1, x0:x1] = image
    else:
      out[y0:y1, x0:x1] = cv2.resize(image, target[::-1], interpolation=_interpolation(image.shape, target))
    return out
  if image.shape == (size, size):
    if out is None:
      return image
    out[...] = image
    return out
  interpolation = _interpolation(image.shape, (size, size))
  if out is None:
    return cv2.resize(image, (size, size), interpolation=interpolation)
  return cv2.resize(image, (size, size), dst=out, interpolation=interpolation)


def rotation_angle(rng: np.random.Generator, factor: float) -> float:
  """Radians, uniform in [-factor * 2 pi, factor * 2 pi] (Keras RandomRotation's factor)."""
  limit = factor * 2.0 * math.pi
  return float(rng.uniform(-limit, limit))


def _rotation_matrix(h: int, w: int, angle: float, flip: bool) -> np.ndarray:
  """Forward 2x3 affine of `flip` (left-right mirror) then rotation by `angle` about the centre."""
  matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), math.degrees(angle), 1.0)
  if flip:  # R @ F with F: x -> (w - 1) - x, so one warp does both.
    matrix[:, 2] += matrix[:, 0] * (w - 1)
    matrix[:, 0] *= -1.0
  return matrix


def rotate(image: np.ndarray, angle: float, *, out: np.ndarray | None = None) -> np.ndarray:
  """Rotates `[h, w]` counter-clockwise by `angle` radians, bilinear, constant 0 fill."""
  return flip_and_rotate(image, False, angle, out=out)


def flip_horizontal(image: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
  return cv2.flip(image, 1) if out is None else cv2.flip(image, 1, dst=out)


def flip_and_rotate(image: np.ndarray, flip: bool, angle: float, *,
                    out: np.ndarray | None = None) -> np.ndarray:
  """Mirrors `[h, w]` left-right if `flip`, then rotates it by `angle` (see `rotate`), in a
  single warp (written into `out` if given; the same pixels as flipping first, up to one grey
  level of OpenCV's fixed-point rounding on a few pixels)."""
  if angle == 0.0:
    if flip:
      return flip_horizontal(image, out=out)
    if out is None:
      return image
    out[...] = image
    return out
  h, w = image.shape[:2]
  matrix = _rotation_matrix(h, w, angle, bool(flip))
  if out is None:
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  return cv2.warpAffine(image, matrix, (w, h), dst=out, flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def draw_flips_and_angles(rng: np.random.Generator, n: int,
                          rotation_factor: float) -> tuple[np.ndarray, np.ndarray]:
  """`n` RandomFlip("horizontal") coins and RandomRotation(rotation_factor) angles, drawn
  at once (one generator call each instead of two per slice)."""
  flips = rng.random(n) < 0.5
  if rotation_factor > 0:
    limit = rotation_factor * 2.0 * math.pi
    angles = rng.uniform(-limit, limit, n)
  else:
    angles = np.zeros(n)
  return flips, angles


def random_flip_and_rotate(image: np.ndarray, rng: np.random.Generator, *,
                           rotation_factor: float = 0.2) -> np.ndarray:
  """RandomFlip("horizontal") then RandomRotation(rotation_factor), from one generator."""
  flip = rng.random() < 0.5
  angle = rotation_angle(rng, rotation_factor) if rotation_factor > 0 else 0.0
  return flip_and_rotate(image, flip, angle)


def grey_to_rgb(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """`[..., h, w]` -> `[..., h, w, 3]` with the grey value in every channel (into `out` if
  given). A batch of slices is converted in one OpenCV call (as one tall image)."""
  shape = image.shape
  flat = np.ascontiguousarray(image).reshape(-1, shape[-1])
  if out is None:
    out = np.empty((*shape, 3), np.uint8)
  if not out.flags.c_contiguous or out.shape != (*shape, 3):
    raise ValueError(f"grey_to_rgb needs a contiguous {(*shape, 3)} output array, got "
                     f"{out.shape} with strides {out.strides}")
  cv2.cvtColor(flat, cv2.COLOR_GRAY2RGB, dst=out.reshape(flat.shape[0], shape[-1], 3))
  return out
