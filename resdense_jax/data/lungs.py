"""Lung-region crop: one box per scan around both lungs, found from the image itself.

    python -m resdense_jax.data.lung_figure --scan=../shared/data/chest_ct_dicom --out=docs/images/lung_crop.png

Per scan (`config.data.lung_crop`, `drop_lungless_slices`; `pipeline.RawScans` and `pipeline.read_scan_slices`
call `scan_lung_box`, once per scan and process):
1. Every slice is shrunk to at most `THUMBNAIL` pixels a side (area averaging): the box needs no more.
2. Air threshold: where the scan has Hounsfield units (DICOM, NIfTI: slices windowed to uint8), `HU_THRESHOLD`
   mapped through the window; on JPEG / PNG slices (unknown window), Otsu's threshold over the scan's pixels
   inside the body (a first Otsu over all pixels finds the body; the second, inside it, splits lung from tissue).
3. The thumbnails stacked into a volume: air below the threshold, in 3-D components (8-connected in a slice,
   face to face across slices), minus those reaching a slice's edge (outside the body, under the table, between
   the arms); of the rest, the largest (the lungs, joined by the airways) and those at least `KEEP_FRACTION` of
   it (a lung on its own), not the trachea above the apices or bowel gas under the diaphragm; then a
   morphological closing per slice (vessels). A slice shows lung when its mask covers at least
   `MIN_LUNG_FRACTION` of it; a scan whose fullest slice has less than `MIN_PEAK_FRACTION` has no lung (what is
   left is bowel gas or noise).
4. The scan's box is the union of its lung slices' boxes, widened by `margin` (a fraction of the slice's side)
   on every side, then made square where the slice allows (the crop is resized to a square model input: no
   stretching). Boxes are fractions of the slice's height and width, so slices of slightly different sizes in
   one scan are cropped alike. Where the slice is too narrow to square the box (a 167x233 NIfTI slice whose
   lungs span more than 167 columns), the crop stays oblong: `config.data.resize="squash"` stretches it to the
   square input, "pad" keeps its aspect and pads the short side (`augment.resize`).
A scan where no slice shows lung keeps its full slices, with a warning naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Sequence

import cv2
import numpy as np
from scipy import ndimage

from resdense_jax import plotting
from resdense_jax.data.common import SliceError, warn, window_to_uint8
from resdense_jax.data.scans import SliceReader, read_slices

THUMBNAIL = 128  # Longest side, in pixels, of the copy each slice's lung mask is computed on.
HU_THRESHOLD = -400.0  # Air and aerated lung below, soft tissue above.
MIN_LUNG_FRACTION = 0.01  # Lung mask share of the slice for the slice to count as showing lung.
MIN_PEAK_FRACTION = 0.05  # ... and on the scan's fullest slice at least this, or the scan has no lung (bowel gas).
KEEP_FRACTION = 0.2  # Air components (3-D) at least this share of the largest one are lung too.
CLOSING = 0.04  # Closing kernel, as a share of the thumbnail's longest side.


@dataclasses.dataclass(frozen=True)
class LungBox:
  """A scan's crop: `top`, `left`, `bottom`, `right` as fractions of a slice's height and width (bottom and
  right exclusive); `lung`: per slice given, whether it shows lung; `found`: False for the full-slice fallback."""

  top: float
  left: float
  bottom: float
  right: float
  lung: tuple[bool, ...]
  found: bool

  def pixels(self, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the box on a slice of `shape` (h, w), squared where the slice allows."""
    h, w = shape
    if not self.found:
      return 0, 0, h, w
    y0, y1 = int(np.floor(self.top * h)), int(np.ceil(self.bottom * h))
    x0, x1 = int(np.floor(self.left * w)), int(np.ceil(self.right * w))
    y0, y1 = _widen(y0, y1, max(y1 - y0, x1 - x0), h)
    x0, x1 = _widen(x0, x1, max(y1 - y0, x1 - x0), w)
    return y0, x0, y1, x1

  def lung_range(self) -> tuple[int, int] | None:
    """(first, last + 1) of the slices showing lung, in the order given; None when none does."""
    lung = np.flatnonzero(self.lung)
    return (int(lung[0]), int(lung[-1]) + 1) if lung.size else None


def _widen(start: int, stop: int, length: int, limit: int) -> tuple[int, int]:
  """[start, stop) grown about its centre to `length` (at most `limit`), shifted to stay inside [0, limit)."""
  length = min(length, limit)
  grow = length - (stop - start)
  start -= grow // 2
  stop = start + length
  shift = max(0, -start) - max(0, stop - limit)
  return start + shift, stop + shift


def full_slice(count: int) -> LungBox:
  """The fallback: no crop; no slice counted as showing lung."""
  return LungBox(0.0, 0.0, 1.0, 1.0, (False,) * count, False)


def crop(image: np.ndarray, box: LungBox | None) -> np.ndarray:
  """`image` [h, w] cut to `box` (a view; the image itself without a box)."""
  if box is None or not box.found:
    return image
  y0, x0, y1, x1 = box.pixels(image.shape[:2])
  return image[y0:y1, x0:x1]


def thumbnail(image: np.ndarray) -> np.ndarray:
  """uint8 [h, w] -> at most THUMBNAIL pixels a side, area-averaged (the copy the lung mask is found on)."""
  h, w = image.shape[:2]
  scale = THUMBNAIL / max(h, w)
  if scale >= 1.0:
    return np.ascontiguousarray(image)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _otsu(values: np.ndarray) -> int:
  """Otsu's threshold of uint8 `values` (pixels below it are the dark class)."""
  histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
  total = histogram.sum()
  if not total:
    return 0
  levels = np.arange(256, dtype=np.float64)
  weight = np.cumsum(histogram)  # Pixels at or below each level.
  mass = np.cumsum(histogram * levels)
  dark, bright = weight, total - weight
  with np.errstate(divide="ignore", invalid="ignore"):
    between = (mass[-1] * dark / total - mass) ** 2 / (dark * bright)
  between[(dark == 0) | (bright == 0)] = -1.0
  return int(np.argmax(between)) + 1


def _majority_shape(thumbnails: Sequence[np.ndarray]) -> tuple[int, int]:
  shapes = collections.Counter(t.shape[:2] for t in thumbnails)
  return max(shapes, key=lambda shape: (shapes[shape], shape))


def _stack(thumbnails: Sequence[np.ndarray]) -> np.ndarray:
  """The thumbnails as one volume [n, h, w] (the odd sizes resized to the most common one)."""
  h, w = _majority_shape(thumbnails)
  return np.stack([t if t.shape[:2] == (h, w) else cv2.resize(t, (w, h), interpolation=cv2.INTER_AREA)
                   for t in thumbnails])


# In-plane 8-connected, across slices only face to face: air leaks less between slices 5 mm apart.
_CONNECTIVITY = np.zeros((3, 3, 3), bool)
_CONNECTIVITY[1] = True
_CONNECTIVITY[:, 1, 1] = True


def _inner_air(air: np.ndarray) -> tuple[np.ndarray, int]:
  """3-D components of the `air` volume [n, h, w], those reaching a slice's edge (outside the body, under the
  table, between the arms) set to 0: (labels, label count)."""
  labels, count = ndimage.label(air, structure=_CONNECTIVITY)
  edges = np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(),
                          labels[:, :, -1].ravel()])
  outside = np.zeros(count + 1, bool)
  outside[np.unique(edges)] = True
  outside[0] = True
  labels[outside[labels]] = 0
  return labels, count


def air_threshold(volume: np.ndarray, window=None) -> int:
  """uint8 level below which a pixel is air in `volume` [n, h, w]: HU_THRESHOLD through `window` for Hounsfield
  scans, otherwise Otsu's threshold of the pixels inside the body (see the module docstring)."""
  if window is not None:
    return int(np.clip(window_to_uint8(np.float32(HU_THRESHOLD), window), 1, 255))
  first = _otsu(volume)
  labels, _ = _inner_air(volume < first)
  body = (volume >= first) | (labels > 0)
  return _otsu(volume[body]) if body.any() else first


def lung_masks(volume: np.ndarray, threshold: int) -> np.ndarray:
  """bool lung masks [n, h, w] of a thumbnail volume: the largest air component inside the body in 3-D (both
  lungs, joined by the airways) and those at least KEEP_FRACTION of it, closed slice by slice."""
  labels, count = _inner_air(volume < threshold)
  sizes = np.bincount(labels.ravel(), minlength=count + 1)
  sizes[0] = 0
  if not sizes.any():
    return np.zeros(volume.shape, bool)
  keep = sizes >= KEEP_FRACTION * sizes.max()
  keep[0] = False
  masks = keep[labels].astype(np.uint8)
  side = max(3, int(round(CLOSING * max(volume.shape[1:]))) | 1)
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
  return np.stack([cv2.morphologyEx(m, cv2.MORPH_CLOSE, kernel) for m in masks]).astype(bool)


def find_lung_box(thumbnails: Sequence[np.ndarray], *, window=None, margin: float = 0.05,
                  name: str = "scan") -> LungBox:
  """The scan's lung box from its slices' thumbnails (`thumbnail`), in body-axis order; `window`: the
  (centre, width) the slices were windowed with when they come from Hounsfield units (DICOM, NIfTI), None for
  JPEG / PNG slices. Falls back to the full slice, with a warning naming `name`, when no slice shows lung."""
  if not len(thumbnails):
    return full_slice(0)
  volume = _stack(thumbnails)
  masks = lung_masks(volume, air_threshold(volume, window))
  n, h, w = masks.shape
  area = masks.sum(axis=(1, 2))
  lung = area >= MIN_LUNG_FRACTION * h * w
  if area.max() < MIN_PEAK_FRACTION * h * w:
    warn(f"{name}: no lung found in its {n} slices; using the full slices")
    return full_slice(n)
  rows, cols = np.flatnonzero(masks[lung].any(axis=(0, 2))), np.flatnonzero(masks[lung].any(axis=(0, 1)))
  return LungBox(float(max(0.0, rows[0] / h - margin)), float(max(0.0, cols[0] / w - margin)),
                 float(min(1.0, (rows[-1] + 1) / h + margin)), float(min(1.0, (cols[-1] + 1) / w + margin)),
                 tuple(bool(x) for x in lung), True)


# ---------------------------------------------------------------------------------------------- per scan


_BOXES: dict = {}  # (reader.stamp(), margin) -> LungBox, process-wide: every reader of one scan shares it
_BOXES_LOCK = threading.Lock()


def scan_lung_box(reader: SliceReader, margin: float = 0.05,
                  slices: dict[int, np.ndarray] | None = None) -> LungBox:
  """The lung box of the scan `reader` reads, `lung` over every slice index (False where a slice does not
  decode). Found once per scan (files unchanged) and margin in a process; `slices` ({index: uint8 slice}, as
  `scans.read_slices` gives) saves reading them again."""
  stamp = reader.stamp()
  key = None if stamp is None else (stamp, float(margin))
  if key is not None:
    with _BOXES_LOCK:
      if key in _BOXES:
        return _BOXES[key]
  thumbs = {}
  if slices is None:
    for index in range(len(reader)):
      try:
        thumbs[index] = thumbnail(reader.read(index))
      except SliceError:
        continue  # Counted and named where the pipelines or read_slices meet it.
  else:
    thumbs = {index: thumbnail(image) for index, image in slices.items()}
  order = sorted(thumbs)
  found = find_lung_box([thumbs[i] for i in order], window=reader.hu_window, margin=margin, name=reader.name)
  lung = np.zeros(len(reader), bool)
  lung[order] = found.lung
  box = dataclasses.replace(found, lung=tuple(bool(x) for x in lung))
  if key is not None:
    with _BOXES_LOCK:
      _BOXES[key] = box
  return box


# ------------------------------------------------------------------------------------------------ figure


def plot_crops(scans: Sequence[tuple[str, Sequence[np.ndarray], LungBox]], path, *, per_scan: int = 5):
  """A figure: for each (title, the scan's uint8 slices [h, w] in order, its box), `per_scan` slices evenly
  spread over the scan with the box drawn (green: the slice shows lung, orange: it does not), and under them
  the same slices cropped."""
  plt = plotting.pyplot()
  fig, axes = plt.subplots(2 * len(scans), per_scan, figsize=(2.3 * per_scan, 4.8 * len(scans)), dpi=80,
                           squeeze=False)
  for row, (title, slices, box) in enumerate(scans):
    picks = np.linspace(0, len(slices) - 1, per_scan).round().astype(int)
    for column, index in enumerate(picks):
      image = slices[index]
      y0, x0, y1, x1 = box.pixels(image.shape)
      ax = axes[2 * row, column]
      ax.imshow(image, cmap="gray", vmin=0, vmax=255)
      colour = "lime" if box.lung[index] else "orange"
      ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                                 linewidth=1.5))
      ax.set_title(f"slice {index}" + ("" if box.lung[index] else " (no lung)"), fontsize=8)
      ax = axes[2 * row + 1, column]
      ax.imshow(crop(image, box), cmap="gray", vmin=0, vmax=255)
      ax.set_title(f"crop {y1 - y0}x{x1 - x0} of {image.shape[0]}x{image.shape[1]}", fontsize=8)
    axes[2 * row, 0].set_ylabel(title, fontsize=9)
    for ax in axes[2 * row:2 * row + 2].flat:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle("lung crop (config.data.lung_crop): each scan's box on sample slices, and the crops", fontsize=10)
  fig.tight_layout()
  return plotting.save_figure(fig, path)


def figure(scan_paths: Sequence, out, *, margin: float = 0.05, per_scan: int = 5):
  """`plot_crops` of the scans at `scan_paths` (folders or NIfTI files) read as `data.read_scan` reads them,
  each box found as the reading path finds it (`scan_lung_box`); returns (path written, the boxes)."""
  shown, boxes = [], []
  for scan_path in scan_paths:
    reader = SliceReader(scan_path)
    slices, _ = read_slices(reader)
    box = scan_lung_box(reader, margin, slices)
    order = sorted(slices)
    shown.append((f"{reader.scan_id} ({reader.scan_kind})", [slices[i] for i in order],
                  dataclasses.replace(box, lung=tuple(box.lung[i] for i in order))))
    boxes.append(box)
  return plot_crops(shown, out, per_scan=per_scan), boxes
