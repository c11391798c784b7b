"""What every scan reader shares: errors and warnings, file kinds, slice-name order, the HU window, axis codes.

scans.py, dicom.py, nifti.py and discover.py import from here (and nothing here imports them), so the
readers depend on one small module instead of on each other. `scans` re-exports every public name.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from nibabel import orientations

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})
# Lung window: centre -600 HU, width 1500 HU.
DEFAULT_WINDOW = (-600.0, 1500.0)


class ScanError(ValueError):
  """A scan, slice or collection that cannot be used; the message names the path."""

  def __init__(self, path, problem: str):
    self.path = Path(path)
    super().__init__(f"{path}: {problem}")


class SliceError(ScanError):
  """One unreadable slice; pipelines skip it and count it instead of stopping."""


class DataWarning(UserWarning):
  """Something in the data was skipped (a stray file, a bad slice); names the path."""


def warn(message: str) -> None:
  warnings.warn(message, DataWarning, stacklevel=3)


def window_to_uint8(hu: np.ndarray, window=DEFAULT_WINDOW) -> np.ndarray:
  """Maps Hounsfield units linearly from [centre - width/2, centre + width/2] onto 0..255."""
  centre, width = window
  low = centre - width / 2.0
  scaled = (np.asarray(hu, np.float32) - low) * (255.0 / width)
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def uint8_to_hu(pixels: np.ndarray, window=DEFAULT_WINDOW) -> np.ndarray:
  """The inverse of `window_to_uint8` (exact on 0..255 up to rounding), as float32 HU."""
  centre, width = window
  return (np.asarray(pixels, np.float32) * (width / 255.0) + centre - width / 2.0)


def natural_key(name: str):
  """Sort key putting '2.jpg' before '10.jpg' (COV19-CT-DB numbers its slices 0, 1, ...)."""
  return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower())
               for part in re.split(r"(\d+)", name) if part)


def is_nifti(path: Path) -> bool:
  return path.name.lower().endswith(NIFTI_SUFFIXES)


def is_image(path: Path) -> bool:
  return path.suffix.lower() in IMAGE_SUFFIXES


# Every affine the readers give maps a voxel's (row, column, slice, 1) to RAS+ millimetres: x grows toward the
# patient's Right, y toward Anterior, z toward Superior (NIfTI's and nibabel's world coordinates; DICOM's
# patient coordinates are LPS, the same with x and y negated).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def axis_codes(affine: np.ndarray | None) -> tuple[str, str, str] | None:
  """For each voxel axis of a (row, column, slice) -> RAS+ affine, the patient direction it grows toward
  ("R"/"L", "A"/"P", "S"/"I"; nibabel's `aff2axcodes`); None without an affine."""
  if affine is None:
    return None
  return tuple(orientations.aff2axcodes(affine))
