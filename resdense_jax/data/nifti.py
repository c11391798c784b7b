"""NIfTI volumes: reorientation to RAS+, axial slices in display orientation, their voxel geometry."""

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


# canonical_to_slices as a matrix on voxel indices: (row i, column j, slice k, 1) of the slices -> the RAS+
# canonical volume's (x, y, z, 1) = (X - 1 - j, Y - 1 - i, k, 1); the last column is filled in per volume.
_SLICES_TO_CANONICAL = np.array([[0.0, -1.0, 0.0, 0.0],
                                 [-1.0, 0.0, 0.0, 0.0],
                                 [0.0, 0.0, 1.0, 0.0],
                                 [0.0, 0.0, 0.0, 1.0]])


def nifti_geometry(path: Path) -> tuple[tuple[float, float, float], np.ndarray]:
  """(spacing, affine) of the slices `read_nifti_hu` gives, from the header only.

  affine: 4x4 float64, (row, column, slice, 1) -> RAS+ mm: the file's own affine (nibabel's: sform, else
  qform) composed with the reorientation to the closest canonical axes and `canonical_to_slices`' transpose
  and flips; an oblique volume keeps its obliquity. spacing: (row, column, slice) mm, the lengths of the
  affine's first three columns (the header's zooms in the slices' axis order).
  """
  path = Path(path)
  try:
    image = nib.load(path)
    affine, shape = np.asarray(image.affine, np.float64), tuple(int(n) for n in image.shape[:3])
  except Exception as error:  # nibabel raises several types for truncated or invalid files.
    raise ScanError(path, f"unreadable NIfTI volume ({error})") from error
  if len(shape) != 3:
    raise ScanError(path, f"expected a 3-D volume, found shape {image.shape}")
  ornt = nib.orientations.io_orientation(affine)
  canonical = affine @ nib.orientations.inv_ornt_aff(ornt, shape)  # what as_closest_canonical gives
  canonical_shape = [shape[int(np.flatnonzero(ornt[:, 0] == axis)[0])] for axis in range(3)]
  to_canonical = _SLICES_TO_CANONICAL.copy()
  to_canonical[:2, 3] = canonical_shape[0] - 1, canonical_shape[1] - 1
  slices_affine = canonical @ to_canonical
  spacing = np.linalg.norm(slices_affine[:3, :3], axis=0)
  return (float(spacing[0]), float(spacing[1]), float(spacing[2])), slices_affine
