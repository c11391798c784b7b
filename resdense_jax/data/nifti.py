"""NIfTI volumes: reorientation to RAS+, axial slices in display orientation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from resdense_jax.data.common import ScanError


def canonical_to_slices(data: np.ndarray) -> np.ndarray:
  """RAS+ voxels `[x, y, z]` -> axial slices `[z, rows, cols]`, inferior to superior.

  Rows run anterior to posterior and columns from the patient's right to left (the
  radiological convention DICOM viewers and COV19-CT-DB use), so both in-plane axes flip.
  """
  return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])


def read_nifti_hu(path: Path) -> np.ndarray:
  """Hounsfield units as float32 slices `[n, h, w]` of a `.nii` / `.nii.gz` CT volume."""
  path = Path(path)
  try:
    image = nib.load(path)
    image = nib.as_closest_canonical(image)
    data = np.asarray(image.dataobj, dtype=np.float32)  # dataobj applies scl_slope/scl_inter.
  except Exception as error:  # nibabel raises several types for truncated or invalid files.
    raise ScanError(path, f"unreadable NIfTI volume ({error})") from error
  if data.ndim == 4:
    data = data[..., 0]
  if data.ndim != 3:
    raise ScanError(path, f"expected a 3-D volume, found shape {data.shape}")
  return canonical_to_slices(data)


def num_axial_slices(path: Path) -> int:
  """Number of axial slices after reorientation, from the header only."""
  try:
    image = nib.load(path)
  except Exception as error:
    raise ScanError(path, f"unreadable NIfTI volume ({error})") from error
  axcodes = nib.aff2axcodes(image.affine)
  axis = next(i for i, code in enumerate(axcodes) if code in "SI")
  return int(image.shape[axis])
