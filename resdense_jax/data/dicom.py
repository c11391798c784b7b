"""DICOM series: slice ordering along the slice normal, Hounsfield units, windowing, voxel geometry.

Compressed transfer syntaxes (JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE) decode through
pydicom's pixel-data plugins: pylibjpeg with its libjpeg, openjpeg and rle packages.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors

from resdense_jax.data.common import (DEFAULT_WINDOW, DICOM_SUFFIXES, LPS_TO_RAS, ScanError, SliceError,
                                      is_image, is_nifti, natural_key, warn, window_to_uint8)


def is_dicom_file(path: Path) -> bool:
  """A DICOM suffix, or the 'DICM' magic after the 128-byte preamble."""
  path = Path(path)
  if path.suffix.lower() in DICOM_SUFFIXES:
    return True
  if path.name.upper() == "DICOMDIR" or is_image(path) or is_nifti(path):
    return False
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:] == b"DICM"


def read_header(path: Path) -> pydicom.Dataset:
  try:
    return pydicom.dcmread(path, stop_before_pixels=True)
  except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as error:
    raise SliceError(path, f"unreadable DICOM file ({error})") from error


def dataset_hu(ds: pydicom.Dataset, path: Path) -> np.ndarray:
  """Pixel data of one file in Hounsfield units, float32 `[h, w]` (or `[frames, h, w]`)."""
  try:
    pixels = ds.pixel_array
  except Exception as error:  # pydicom raises many types for broken or undecodable pixel data.
    raise SliceError(path, f"cannot decode DICOM pixel data "
                     f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}): {error}") from error
  slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
  intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
  return pixels.astype(np.float32) * slope + intercept


def _normal(ds: pydicom.Dataset) -> np.ndarray | None:
  orientation = ds.get("ImageOrientationPatient")
  if orientation is None or len(orientation) != 6:
    return None
  row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
  return np.cross(row, col)


def slice_order(headers: list[pydicom.Dataset], files: list[Path], folder: Path) -> list[int]:
  """Indices sorting the series along its slice normal, toward superior for axial scans.

  ImagePositionPatient projected onto the normal (row x column of ImageOrientationPatient);
  InstanceNumber where positions are missing; file names as the last resort.
  """
  normal = _normal(headers[0])
  positions = [h.get("ImagePositionPatient") for h in headers]
  if normal is not None and all(p is not None and len(p) == 3 for p in positions):
    # Sign so that the dominant patient axis increases (LPS: toward left, posterior, superior).
    normal = normal * np.sign(normal[np.argmax(np.abs(normal))])
    keys = [float(np.dot(np.asarray(p, float), normal)) for p in positions]
    if len(set(np.round(keys, 3))) < len(keys):
      warn(f"{folder}: several slices share one ImagePositionPatient; order may be ambiguous")
    return sorted(range(len(files)), key=lambda i: (keys[i], natural_key(files[i].name)))
  numbers = [h.get("InstanceNumber") for h in headers]
  if all(n is not None for n in numbers):
    return sorted(range(len(files)), key=lambda i: (int(numbers[i]), natural_key(files[i].name)))
  warn(f"{folder}: no ImagePositionPatient or InstanceNumber; slices ordered by file name")
  return sorted(range(len(files)), key=lambda i: natural_key(files[i].name))


def _display_flips(ds: pydicom.Dataset) -> tuple[bool, bool]:
  """(flip rows, flip columns) bringing an axial image to anterior-up, patient-right-left."""
  orientation = ds.get("ImageOrientationPatient")
  if orientation is None or len(orientation) != 6:
    return False, False
  return _orientation_flips(orientation)


def _orientation_flips(orientation) -> tuple[bool, bool]:
  row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
  if abs(np.cross(row, col)[2]) < 0.5:  # Not axial: keep the stored orientation.
    return False, False
  return bool(col[1] < -0.5), bool(row[0] < -0.5)


def order_series(folder: Path, files: list[Path]) -> tuple[list[Path], list[str], Planes]:
  """Reads headers, checks the folder holds one series, returns files in slice order.

  Returns (ordered readable files, names of unreadable files, their Planes in that order).
  """
  headers, kept, skipped = [], [], []
  for path in files:
    try:
      headers.append(read_header(path))
      kept.append(path)
    except SliceError as error:
      skipped.append(path.name)
      warn(f"{error}; skipped")
  if not kept:
    raise ScanError(folder, f"none of its {len(files)} DICOM files could be read")
  series = collections.Counter(str(h.get("SeriesInstanceUID", "")) for h in headers)
  if len(series) > 1:
    listed = "; ".join(f"{uid or '(no SeriesInstanceUID)'}: {n} files" for uid, n in series.items())
    raise ScanError(folder, f"DICOM folder mixes {len(series)} series ({listed}); "
                    "put each series in its own folder")
  if len(kept) == 1:  # One file (a multi-frame one, or a series of one slice): nothing to order.
    return kept, skipped, Planes.of(headers)
  order = slice_order(headers, kept, folder)
  return [kept[i] for i in order], skipped, Planes.of([headers[i] for i in order])


def _read_dataset(path: Path) -> pydicom.Dataset:
  try:
    return pydicom.dcmread(path)
  except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as error:
    raise SliceError(path, f"unreadable DICOM file ({error})") from error


def _single_frame_hu(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
  ds = _read_dataset(path)
  hu = dataset_hu(ds, path)
  if hu.ndim != 2:
    raise SliceError(path, f"expected one frame per file, found pixel data of shape {hu.shape}")
  return ds, hu


def _display(ds: pydicom.Dataset, image: np.ndarray) -> np.ndarray:
  flip_rows, flip_cols = _display_flips(ds)
  return image[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]


def read_dicom_slice(path: Path, *, window=DEFAULT_WINDOW) -> np.ndarray:
  """One DICOM file (single frame) windowed to uint8 `[h, w]`, in display orientation."""
  ds, hu = _single_frame_hu(path)
  return _display(ds, window_to_uint8(hu, window))


def read_dicom_slice_hu(path: Path) -> np.ndarray:
  """One DICOM file (single frame) in Hounsfield units (pixel * RescaleSlope + RescaleIntercept), float32
  `[h, w]`, in display orientation: `window_to_uint8` of it is `read_dicom_slice`."""
  ds, hu = _single_frame_hu(path)
  return np.ascontiguousarray(_display(ds, hu))


def read_frames_hu(path: Path) -> np.ndarray:
  """A multi-frame DICOM file's frames in Hounsfield units, float32 `[n, h, w]`, in stored order."""
  hu = dataset_hu(_read_dataset(path), path)
  return hu if hu.ndim == 3 else hu[None]


# ------------------------------------------------------------------------------------------------ geometry


def _floats(value, count: int) -> tuple[float, ...] | None:
  if value is None or len(value) != count:
    return None
  return tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class Planes:
  """What the voxel geometry needs of a series' headers, its files in slice order: small enough for every
  SliceReader to keep (the headers are read once, when the series is ordered).

  orientation, pixel_spacing, shape (rows, columns), thickness (SpacingBetweenSlices, else SliceThickness):
  the first file's; positions: every file's ImagePositionPatient `[n, 3]`, None unless all have one.
  """

  orientation: tuple[float, ...] | None
  pixel_spacing: tuple[float, ...] | None
  shape: tuple[int, int] | None
  thickness: float | None
  positions: np.ndarray | None

  @classmethod
  def of(cls, headers: list[pydicom.Dataset]) -> "Planes":
    first = headers[0]
    positions = [_floats(h.get("ImagePositionPatient"), 3) for h in headers]
    rows, cols = first.get("Rows"), first.get("Columns")
    thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
    return cls(orientation=_floats(first.get("ImageOrientationPatient"), 6),
               pixel_spacing=_floats(first.get("PixelSpacing"), 2),
               shape=None if rows is None or cols is None else (int(rows), int(cols)),
               thickness=None if thickness is None else float(thickness),
               positions=None if any(p is None for p in positions) else np.asarray(positions, np.float64))

  def subset(self, indices) -> "Planes":
    """These planes of the files `indices` only (those whose slices decoded)."""
    positions = None if self.positions is None else self.positions[np.asarray(indices, np.int64)]
    return dataclasses.replace(self, positions=positions)


def series_geometry(planes: Planes, name, *, display: bool = True
                    ) -> tuple[tuple[float, float, float], np.ndarray] | None:
  """(spacing, affine) of a series whose slices come out in the order of `planes`, in display orientation
  (`display`, as `read_dicom_slice` flips them) or as stored; None when the headers lack what it takes
  (ImageOrientationPatient, PixelSpacing, Rows/Columns, every ImagePositionPatient; for one slice
  SpacingBetweenSlices or SliceThickness).

  spacing: (row, column, slice) in mm: PixelSpacing (between rows, between columns) and the distance between
  consecutive slice planes along the slice normal. affine: 4x4 float64 mapping (row, column, slice, 1) of the
  returned slices to RAS+ mm (common.LPS_TO_RAS of the standard's pixel-to-patient equation, PS3.3
  C.7.6.2.1.1: stored pixel (r, c) of a plane at ImagePositionPatient P lies at P + c * dc * row cosines + r *
  dr * column cosines); its slice column is the mean step between consecutive ImagePositionPatient (along the
  normal unless the gantry was tilted). Unevenly spaced slices (a missing file) are warned about, naming
  `name`: one affine cannot place them all.
  """
  if planes.orientation is None or planes.pixel_spacing is None or planes.shape is None or (
      planes.positions is None):
    return None
  orientation = np.asarray(planes.orientation)
  row_cosines, col_cosines = orientation[:3], orientation[3:]
  normal = np.cross(row_cosines, col_cosines)
  if not np.linalg.norm(normal):
    return None
  normal = normal / np.linalg.norm(normal)
  positions = planes.positions
  if len(positions) > 1:
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    depth = positions @ normal
    slice_spacing = abs(depth[-1] - depth[0]) / (len(positions) - 1)
    expected = positions[0] + np.arange(len(positions))[:, None] * step
    off = np.linalg.norm(positions - expected, axis=1).max()
    if off > max(1e-3, 0.01 * np.linalg.norm(step)):
      gaps = np.round(np.abs(np.diff(depth)), 3)
      warn(f"{name}: slice positions not evenly spaced on one line (distances along the normal "
           f"{gaps.min():g} to {gaps.max():g} mm; an ImagePositionPatient {off:.3g} mm from where even steps "
           "put it): the affine places the slices evenly")
  else:
    if planes.thickness is None:
      return None
    slice_spacing = planes.thickness
    step = normal * slice_spacing
  if not slice_spacing:
    return None
  flip_rows, flip_cols = _orientation_flips(orientation) if display else (False, False)
  dr, dc = planes.pixel_spacing
  rows, cols = planes.shape
  lps = np.eye(4)
  lps[:3, 0] = col_cosines * dr * (-1.0 if flip_rows else 1.0)  # the row index grows along a column
  lps[:3, 1] = row_cosines * dc * (-1.0 if flip_cols else 1.0)
  lps[:3, 2] = step
  lps[:3, 3] = positions[0] + (rows - 1) * dr * col_cosines * flip_rows + (cols - 1) * dc * row_cosines * flip_cols
  return (float(dr), float(dc), float(slice_spacing)), LPS_TO_RAS @ lps


def _functional(ds: pydicom.Dataset, group: pydicom.Dataset | None, sequence: str, keyword: str):
  """`keyword` of a frame: from its functional group's `sequence`, the shared one's, or the top level."""
  for item in (group, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
    inner = item.get(sequence) if item is not None else None
    if inner and keyword in inner[0]:
      return inner[0].get(keyword)
  return ds.get(keyword)


def frame_planes(path: Path) -> Planes:
  """The Planes of a multi-frame file's frames, in stored order (enhanced CT keeps position, orientation and
  pixel spacing in functional groups; older files at the top level)."""
  ds = read_header(path)
  count = int(ds.get("NumberOfFrames", 1) or 1)
  groups = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
  headers = []
  for index in range(count):
    group = groups[index] if index < len(groups) else None
    header = pydicom.Dataset()
    header.Rows, header.Columns = ds.get("Rows"), ds.get("Columns")
    for sequence, keyword in (("PlanePositionSequence", "ImagePositionPatient"),
                              ("PlaneOrientationSequence", "ImageOrientationPatient"),
                              ("PixelMeasuresSequence", "PixelSpacing"),
                              ("PixelMeasuresSequence", "SpacingBetweenSlices"),
                              ("PixelMeasuresSequence", "SliceThickness")):
      value = _functional(ds, group, sequence, keyword)
      if value is not None:
        setattr(header, keyword, value)
    headers.append(header)
  return Planes.of(headers)


def read_dicom_series(folder: Path, files: list[Path], *, window=DEFAULT_WINDOW
                      ) -> tuple[np.ndarray, tuple[str, ...]]:
  """A DICOM series folder as uint8 slices `[n, h, w]`, inferior to superior."""
  ordered, skipped, _ = order_series(folder, files)
  if len(ordered) == 1:
    # A multi-frame file: frames are the slices, in stored order.
    return window_to_uint8(read_frames_hu(ordered[0]), window), tuple(skipped)
  slices, kept = [], []
  for path in ordered:
    try:
      slices.append(read_dicom_slice(path, window=window))
      kept.append(path)
    except SliceError as error:
      skipped.append(path.name)
      warn(f"{error}; skipped")
  if not slices:
    raise ScanError(folder, "no DICOM slice could be decoded")
  if len({s.shape for s in slices}) > 1:
    sizes = collections.Counter(s.shape for s in slices)
    raise ScanError(folder, f"mixed slice sizes within one DICOM series: {dict(sizes)}")
  if skipped:
    warn(f"{folder}: skipped {len(skipped)} of {len(files)} DICOM files that could not be decoded")
  return np.stack(slices), tuple(skipped)
