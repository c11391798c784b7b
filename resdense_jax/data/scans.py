"""Reading one CT scan: a folder of slice images, a DICOM series or a NIfTI volume.

Every reader returns a `Scan`: uint8 slices `[n, h, w]` ordered along the body axis (inferior to
superior for DICOM and NIfTI; numeric file order for image folders, as COV19-CT-DB ships them),
in the radiological display convention (anterior at the top, the patient's right on the left).
Hounsfield units are mapped to uint8 through a window (centre, width), the lung window by default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np

from resdense_jax.data import dicom, nifti
# Re-exported: `data.scans` is where callers have always found these.
from resdense_jax.data.common import (DEFAULT_WINDOW, DICOM_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES,
                                      DataWarning, ScanError, SliceError, is_image, is_nifti, natural_key,
                                      uint8_to_hu, warn, window_to_uint8)

LABELS = {0: "non-covid", 1: "covid"}

__all__ = [
    "DEFAULT_WINDOW", "DICOM_SUFFIXES", "IMAGE_SUFFIXES", "LABELS", "NIFTI_SUFFIXES", "DataWarning", "Scan",
    "ScanError", "ScanRef", "SliceError", "is_image", "is_nifti", "natural_key", "read_image_folder",
    "read_image_slice", "read_scan", "scan_files", "uint8_to_hu", "warn", "window_to_uint8",
]


@dataclasses.dataclass(frozen=True)
class ScanRef:
  """Where a scan lives and what is known about it. label: 1 COVID, 0 non-COVID, None unknown."""

  scan_id: str
  path: Path
  label: int | None
  split: str


@dataclasses.dataclass
class Scan:
  """A scan in memory: `slices` uint8 `[n, h, w]` along the body axis."""

  slices: np.ndarray
  scan_id: str
  label: int | None = None
  path: Path | None = None
  # Files (or frames) that could not be decoded and were left out.
  skipped: tuple[str, ...] = ()


def _scan_id_of(path: Path) -> str:
  name = path.name
  for suffix in (".nii.gz", ".nii"):
    if name.lower().endswith(suffix):
      return name[: -len(suffix)]
  return name


def scan_files(folder: Path) -> tuple[str, list[Path]]:
  """Classifies a scan folder and lists its slice files in order.

  Returns ("images", files in natural order), ("dicom", files, unordered) or ("nifti", [file]).
  Stray files are skipped with a warning naming them; an empty folder is an error.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise ScanError(folder, "not a folder, a NIfTI file or anything else readable as a scan")
  entries = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: natural_key(p.name))
  if not entries:
    raise ScanError(folder, "empty scan folder (no slice files)")
  images = [p for p in entries if is_image(p)]
  if images:
    kind, chosen = "images", images
  else:
    dicoms = [p for p in entries if dicom.is_dicom_file(p)]
    niftis = [p for p in entries if is_nifti(p)]
    if dicoms:
      kind, chosen = "dicom", dicoms
    elif len(niftis) == 1:
      kind, chosen = "nifti", niftis
    elif niftis:
      raise ScanError(folder, f"holds {len(niftis)} NIfTI volumes; give one volume per scan")
    else:
      raise ScanError(folder, "no slice images, DICOM files or NIfTI volume in this scan folder "
                      f"(found {', '.join(p.name for p in entries[:5])})")
  for stray in sorted(set(entries) - set(chosen)):
    warn(f"{stray}: stray file in scan folder {folder} (not a {kind} slice); skipped")
  return kind, chosen


def read_image_slice(path: Path) -> np.ndarray:
  """Decodes one slice image to uint8 grey `[h, w]`; raises SliceError naming the file."""
  try:
    buffer = np.fromfile(path, dtype=np.uint8)
  except OSError as error:
    raise SliceError(path, f"unreadable slice ({error.strerror})") from error
  image = cv2.imdecode(buffer, cv2.IMREAD_GRAYSCALE) if buffer.size else None
  if image is None:
    raise SliceError(path, "corrupt or unsupported slice image (cannot be decoded)")
  return image


def _stack_slices(folder: Path, files, images) -> np.ndarray:
  shapes = {}
  for path, image in zip(files, images):
    shapes.setdefault(image.shape, []).append(path.name)
  if len(shapes) > 1:
    common = max(shapes, key=lambda s: len(shapes[s]))
    odd = ", ".join(f"{names[0]} is {s[0]}x{s[1]}" for s, names in shapes.items() if s != common)
    raise ScanError(folder, f"mixed slice sizes within one scan: most slices are "
                    f"{common[0]}x{common[1]} but {odd}")
  return np.stack(images)


def read_image_folder(folder: Path, files: list[Path]) -> tuple[np.ndarray, tuple[str, ...]]:
  images, kept, skipped = [], [], []
  for path in files:
    try:
      images.append(read_image_slice(path))
      kept.append(path)
    except SliceError as error:
      skipped.append(path.name)
      warn(f"{error}; skipped")
  if not images:
    raise ScanError(folder, f"none of its {len(files)} slice images could be decoded")
  if skipped:
    warn(f"{folder}: skipped {len(skipped)} of {len(files)} slices that could not be decoded")
  return _stack_slices(folder, kept, images), tuple(skipped)


def read_scan(path, *, window=DEFAULT_WINDOW, scan_id: str | None = None,
              label: int | None = None) -> Scan:
  """Reads a scan: a folder of slice images, a folder with one DICOM series, or a NIfTI volume.

  Args:
    path: scan folder, or a `.nii` / `.nii.gz` file.
    window: (centre, width) in Hounsfield units for DICOM and NIfTI; image folders are
      taken as already windowed.
    scan_id: defaults to the folder name (or the NIfTI file name without its suffix).
    label: 1 COVID, 0 non-COVID, None unknown.
  """
  path = Path(path)
  if not path.exists():
    raise ScanError(path, "no such scan folder or file")
  if path.is_file():
    if not is_nifti(path):
      raise ScanError(path, "a single file must be a NIfTI volume (.nii or .nii.gz)")
    kind, files = "nifti", [path]
  else:
    kind, files = scan_files(path)
  skipped: tuple[str, ...] = ()
  if kind == "images":
    slices, skipped = read_image_folder(path, files)
  elif kind == "dicom":
    slices, skipped = dicom.read_dicom_series(path, files, window=window)
  else:
    slices = window_to_uint8(nifti.read_nifti_hu(files[0]), window)
  return Scan(slices=np.ascontiguousarray(slices), scan_id=scan_id or _scan_id_of(path),
              label=label, path=path, skipped=skipped)
