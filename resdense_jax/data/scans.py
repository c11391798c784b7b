"""Reading one CT scan: a folder of slice images, a DICOM series or a NIfTI volume.

Every reader returns a `Scan`: uint8 slices `[n, h, w]` ordered along the body axis (inferior to
superior for DICOM and NIfTI; numeric file order for image folders, as COV19-CT-DB ships them),
in the radiological display convention (anterior at the top, the patient's right on the left).
Hounsfield units are mapped to uint8 through a window (centre, width), the lung window by default.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})
# Lung window: centre -600 HU, width 1500 HU.
DEFAULT_WINDOW = (-600.0, 1500.0)
LABELS = {0: "non-covid", 1: "covid"}


class ScanError(ValueError):
  """A scan, slice or collection that cannot be used; the message names the path."""

  def __init__(self, path, problem: str):
    self.path = Path(path)
    super().__init__(f"{path}: {problem}")


class SliceError(ScanError):
  """One unreadable slice; pipelines skip it and count it instead of stopping."""


class DataWarning(UserWarning):
  """Something in the data was skipped (a stray file, a bad slice); names the path."""


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
  from resdense_jax.data import dicom  # Local: pydicom is only needed for DICOM folders.

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
    from resdense_jax.data import dicom
    slices, skipped = dicom.read_dicom_series(path, files, window=window)
  else:
    from resdense_jax.data import nifti
    slices = window_to_uint8(nifti.read_nifti_hu(files[0]), window)
  return Scan(slices=np.ascontiguousarray(slices), scan_id=scan_id or _scan_id_of(path),
              label=label, path=path, skipped=skipped)
