"""DICOM series: slice ordering along the slice normal, Hounsfield units, windowing.

Compressed transfer syntaxes (JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE) decode through
pydicom's pixel-data plugins: pylibjpeg with its libjpeg, openjpeg and rle packages.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors

from resdense_jax.data.common import (DEFAULT_WINDOW, DICOM_SUFFIXES, ScanError, SliceError,
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
  row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
  if abs(np.cross(row, col)[2]) < 0.5:  # Not axial: keep the stored orientation.
    return False, False
  return bool(col[1] < -0.5), bool(row[0] < -0.5)


def order_series(folder: Path, files: list[Path]) -> tuple[list[Path], list[str]]:
  """Reads headers, checks the folder holds one series, returns files in slice order.

  Returns (ordered readable files, names of unreadable files).
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
  order = slice_order(headers, kept, folder)
  return [kept[i] for i in order], skipped


def read_dicom_slice(path: Path, *, window=DEFAULT_WINDOW) -> np.ndarray:
  """One DICOM file (single frame) windowed to uint8 `[h, w]`, in display orientation."""
  try:
    ds = pydicom.dcmread(path)
  except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as error:
    raise SliceError(path, f"unreadable DICOM file ({error})") from error
  hu = dataset_hu(ds, path)
  if hu.ndim != 2:
    raise SliceError(path, f"expected one frame per file, found pixel data of shape {hu.shape}")
  flip_rows, flip_cols = _display_flips(ds)
  image = window_to_uint8(hu, window)
  return image[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]


def read_dicom_series(folder: Path, files: list[Path], *, window=DEFAULT_WINDOW
                      ) -> tuple[np.ndarray, tuple[str, ...]]:
  """A DICOM series folder as uint8 slices `[n, h, w]`, inferior to superior."""
  ordered, skipped = order_series(folder, files)
  if len(ordered) == 1:
    # A multi-frame file: frames are the slices, in stored order.
    ds = pydicom.dcmread(ordered[0])
    hu = dataset_hu(ds, ordered[0])
    return window_to_uint8(hu if hu.ndim == 3 else hu[None], window), tuple(skipped)
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
