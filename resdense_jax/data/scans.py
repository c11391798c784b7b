"""Reading one CT scan: a folder of slice images, a DICOM series or a NIfTI volume.

Every reader returns a `Scan`: uint8 slices `[n, h, w]` ordered along the body axis (inferior to
superior for DICOM and NIfTI; numeric file order for image folders, as COV19-CT-DB ships them),
in the radiological display convention (anterior at the top, the patient's right on the left).
Hounsfield units are mapped to uint8 through a window (centre, width), the lung window by default.

For 3-D work `read_scan` also gives DICOM and NIfTI scans' voxel geometry (`Scan.spacing`, `Scan.affine`,
`Scan.axcodes`) and, with `hu=True`, the float32 Hounsfield units the slices were windowed from (`Scan.hu`).
The affine maps (row, column, slice, 1) to RAS+ mm, so `nibabel.Nifti1Image(scan.hu.transpose(1, 2, 0),
scan.affine)` is the scan as a NIfTI image. Image folders carry no geometry: those fields are None.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from resdense_jax.data import augment, dicom, nifti
# Re-exported: `data.scans` is where callers have always found these.
from resdense_jax.data.common import (DEFAULT_WINDOW, DICOM_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES,
                                      DataWarning, ScanError, SliceError, axis_codes, is_image, is_nifti,
                                      natural_key, uint8_to_hu, warn, window_to_uint8)

LABELS = {0: "non-covid", 1: "covid"}

__all__ = [
    "DEFAULT_WINDOW", "DICOM_SUFFIXES", "IMAGE_SUFFIXES", "LABELS", "NIFTI_SUFFIXES", "DataWarning", "ReadOptions",
    "Scan", "ScanError", "ScanRef", "ScanSlices", "SliceError", "SliceReader", "decode_image", "is_image",
    "is_nifti", "natural_key", "read_image_slice", "read_scan", "read_slices", "scan_files", "uint8_to_hu", "warn",
    "window_to_uint8",
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
  """A scan in memory: `slices` uint8 `[n, h, w]` along the body axis.

  Voxel `slices[k, i, j]` is (row i, column j, slice k). From `read_scan`, DICOM and NIfTI scans also carry:
  spacing: (row, column, slice) in mm (DICOM: PixelSpacing, then the distance between consecutive slice
    planes along the normal; NIfTI: the header's zooms in that order).
  affine: 4x4 float64 mapping (row, column, slice, 1) to RAS+ mm (x toward the patient's right, y anterior, z
    superior; DICOM's LPS patient coordinates with x and y negated); `axcodes` says where each axis points
    (("P", "L", "S") for an axial scan: rows run anterior to posterior, columns right to left).
  hu: float32 Hounsfield units `[n, h, w]` with `read_scan(..., hu=True)`; then
    `slices == window_to_uint8(hu, window)`.
  window: the (centre, width) the slices were windowed through.
  All None where unknown: image folders (their pixels carry no size, position or HU), headers without the
  tags, slices of other sizes resized to the scan's most common one, slices cropped (`ScanSlices.to_scan`).
  """

  slices: np.ndarray
  scan_id: str
  label: int | None = None
  path: Path | None = None
  # Files (or frames) that could not be decoded and were left out.
  skipped: tuple[str, ...] = ()
  # Where the slices came from: "images", "dicom" or "nifti" (DICOM and NIfTI slices are windowed HU); "" unknown.
  kind: str = ""
  spacing: tuple[float, float, float] | None = None
  affine: np.ndarray | None = None
  hu: np.ndarray | None = None
  window: tuple[float, float] | None = None

  @property
  def axcodes(self) -> tuple[str, str, str] | None:
    """Where the row, column and slice axes point in RAS+ terms (nibabel's `aff2axcodes` of `affine`)."""
    return axis_codes(self.affine)


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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IMREAD_GRAYSCALE: colour, palette and alpha images become their luma (0.299 R + 0.587 G + 0.114 B, alpha
# ignored) and EXIF orientation is applied; IMREAD_ANYDEPTH: 16-bit and float images keep their values, which
# `_to_uint8` then scales by the slice's own range.
_DECODE_FLAGS = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH


def _without_iccp(data: np.ndarray) -> np.ndarray:
  """PNG bytes without their iCCP (embedded ICC profile) chunks; other bytes as they are.

  libpng prints `libpng warning: iCCP: ...` on stderr for the many profiles viewers embed that it finds wrong
  (known incorrect sRGB profiles, RGB profiles in grey images); a grey slice needs no colour profile. Chunks
  before the first IDAT are walked (iCCP must precede it); a malformed header is left to the decoder's error.
  """
  if data.size < 8 or data[:8].tobytes() != _PNG_SIGNATURE:
    return data
  chunks, position = [], 8  # (start, end) of every chunk before IDAT
  while position + 8 <= data.size:
    length = int.from_bytes(data[position:position + 4].tobytes(), "big")
    end = position + 12 + length  # length, type, data, CRC
    if data[position + 4:position + 8].tobytes() == b"IDAT" or end > data.size:
      break
    chunks.append((position, end))
    position = end
  iccp = [(start, end) for start, end in chunks if data[start + 4:start + 8].tobytes() == b"iCCP"]
  if not iccp:
    return data
  keep = np.ones(data.size, bool)
  for start, end in iccp:
    keep[start:end] = False
  return data[keep]


def _to_uint8(image: np.ndarray) -> np.ndarray:
  """16-bit or float grey -> uint8 by the slice's own range (minimum 0, maximum 255; a constant slice is 0).

  Not `>> 8`: 16-bit CT exports mostly hold 12-bit values or HU + 1024 (0..~3000), which the top byte would
  turn into a nearly black slice."""
  if image.dtype == np.uint8:
    return image
  values = image.astype(np.float64)
  finite = values[np.isfinite(values)]
  if not finite.size or finite.max() <= finite.min():
    return np.zeros(image.shape, np.uint8)
  low, high = float(finite.min()), float(finite.max())
  values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
  return np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def decode_image(data: np.ndarray, path: Path) -> np.ndarray:
  """Encoded slice image bytes (uint8 array) -> uint8 grey `[h, w]`, every image mode alike: grey; RGB, RGBA,
  grey + alpha and palette images as their luma, alpha ignored; 16-bit and float images scaled by the slice's
  range (`_to_uint8`); EXIF orientation applied. Raises SliceError naming `path` when it does not decode."""
  image = cv2.imdecode(_without_iccp(data), _DECODE_FLAGS) if data.size else None
  if image is None or image.ndim != 2 or not image.size:
    raise SliceError(path, "corrupt or unsupported slice image (cannot be decoded)")
  return _to_uint8(image)


def read_image_slice(path: Path) -> np.ndarray:
  """Decodes one slice image to uint8 grey `[h, w]` (see `decode_image`); raises SliceError naming the file."""
  try:
    buffer = np.fromfile(path, dtype=np.uint8)
  except OSError as error:
    raise SliceError(path, f"unreadable slice ({error.strerror})") from error
  return decode_image(buffer, Path(path))


# ------------------------------------------------------------------------------------- the one reading path


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  """How every slice is read, in training, evaluation, predict and explain alike (`pipeline.RawScans` one slice
  at a time, `pipeline.read_scan_slices` a whole scan).

  window: (centre, width) in HU for DICOM and NIfTI. lung_crop: crop every slice to its scan's lung box
  (`data.lungs`) before resizing. lung_crop_margin: added on every side of the box, a fraction of the slice's
  side. drop_lungless_slices: leave out the scan's leading and trailing slices that show no lung.
  resize: how a slice (or its crop) becomes the square model input (`augment.resize`): "squash" scales both
  sides to the input size, stretching a non-square slice; "pad" keeps its aspect ratio, scaling the longer
  side to the input size and padding the shorter one, centred, with 0 (air in the window). The lung box is
  already squared where the slice allows, so with lung_crop "pad" pads only crops the slice was too narrow to
  square (the real NIfTI's 167x212 box of a 167x233 slice), which "squash" would stretch.
  """

  window: tuple[float, float] = DEFAULT_WINDOW
  lung_crop: bool = False
  lung_crop_margin: float = 0.05
  drop_lungless_slices: bool = False
  resize: str = "squash"

  def __post_init__(self):
    augment.check_resize_mode(self.resize)

  @classmethod
  def from_config(cls, data_config) -> "ReadOptions":
    """From `config.data` (a checkpoint's config from before these fields reads as the defaults)."""
    get = data_config.get
    return cls(lung_crop=bool(get("lung_crop", False)),
               lung_crop_margin=float(get("lung_crop_margin", 0.05)),
               drop_lungless_slices=bool(get("drop_lungless_slices", False)),
               resize=str(get("resize", "squash")))

  @property
  def finds_lungs(self) -> bool:
    return self.lung_crop or self.drop_lungless_slices


@functools.lru_cache(maxsize=2)  # Process-wide: training jumps between scans; two volumes are plenty.
def _volume(path: Path, window, kind: str) -> np.ndarray:
  if kind == "nifti":
    return window_to_uint8(nifti.read_nifti_hu(path), window)
  slices, _ = dicom.read_dicom_series(path.parent, [path], window=window)  # one multi-frame file
  return slices


class SliceReader:
  """One scan's slices, read one at a time and decoded the one way every reader shares.

  `item`: a scan path (image folder, DICOM series folder, NIfTI file), a ScanRef, or a Scan already in memory.
  `read(i)` gives slice i as uint8 `[h, w]` (sizes may differ between slices) or raises SliceError; the order is
  `read_scan`'s (body axis for DICOM and NIfTI, natural file-name order for images).
  """

  def __init__(self, item, *, window=DEFAULT_WINDOW):
    self.window = tuple(window)
    self.skipped: tuple[str, ...] = ()
    self._slices = None
    self._hu = None  # hu_volume()'s, read on first use
    self.planes = None  # a DICOM series' dicom.Planes (what its geometry needs of the headers)
    if isinstance(item, Scan):
      self.path, self.scan_id, self.label = item.path, item.scan_id, item.label
      self.kind, self.files, self._slices = "memory", [], item.slices
      self.hu = item.kind in ("dicom", "nifti")
      self.count, self._scan_kind = len(item.slices), item.kind
      return
    if isinstance(item, ScanRef):
      path, self.scan_id, self.label = Path(item.path), item.scan_id, item.label
    else:
      path = Path(item)
      self.scan_id, self.label = _scan_id_of(path), None
    self.path = path
    if not path.exists():
      raise ScanError(path, "no such scan folder or file")
    if path.is_file():
      if not is_nifti(path):
        raise ScanError(path, "a single file must be a NIfTI volume (.nii or .nii.gz)")
      self.kind, self.files = "nifti", [path]
    else:
      self.kind, self.files = scan_files(path)
    self.hu = self.kind in ("dicom", "nifti")
    if self.kind == "dicom":
      self.files, skipped, self.planes = dicom.order_series(path, self.files)
      self.skipped = tuple(skipped)
      frames = int(dicom.read_header(self.files[0]).get("NumberOfFrames", 1) or 1)
      if len(self.files) == 1 and frames > 1:
        self.kind = "frames"  # One multi-frame file: its frames are the slices, in stored order.
      self.count = frames if self.kind == "frames" else len(self.files)
    elif self.kind == "nifti":
      self.count = nifti.num_axial_slices(self.files[0])
    else:
      self.count = len(self.files)

  def __len__(self) -> int:
    return self.count

  @property
  def hu_window(self):
    """The window the slices were mapped to uint8 through when they come from Hounsfield units, else None."""
    return self.window if self.hu else None

  @property
  def scan_kind(self) -> str:
    """"images", "dicom" or "nifti" (a multi-frame DICOM file counts as DICOM); a Scan in memory's own kind."""
    if self.kind == "memory":
      return self._scan_kind
    return "dicom" if self.kind == "frames" else self.kind

  @property
  def name(self) -> str:
    return str(self.path or self.scan_id)

  def slice_name(self, index: int) -> str:
    """Slice `index`'s file name where slices are files, else "slice <index>" (for messages)."""
    return self.files[index].name if self.kind in ("images", "dicom") else f"slice {index}"

  def read(self, index: int) -> np.ndarray:
    """Slice `index` as uint8 `[h, w]`; raises SliceError for an unreadable slice."""
    if self.kind == "memory":
      return self._slices[index]
    if self.kind == "images":
      return read_image_slice(self.files[index])
    if self.kind == "dicom":
      return dicom.read_dicom_slice(self.files[index], window=self.window)
    try:
      return self.volume()[index]
    except ScanError as error:
      raise SliceError(error.path, str(error).removeprefix(f"{error.path}: ")) from error

  def volume(self) -> np.ndarray:
    """A NIfTI volume's (or multi-frame DICOM file's) slices uint8 `[n, h, w]`, the last two read kept per
    process; raises ScanError when the file does not decode."""
    return _volume(self.files[0], self.window, self.kind)

  def read_hu(self, index: int) -> np.ndarray:
    """Slice `index` in Hounsfield units, float32 `[h, w]`, oriented and ordered as `read` gives it (`read` is
    its window); raises SliceError for an unreadable slice, ScanError for a scan without HU (image folders)."""
    if not self.hu:
      raise ScanError(self.path or Path(self.scan_id), "slice images hold no Hounsfield units (only DICOM "
                      "series and NIfTI volumes do)")
    if self.kind == "dicom":
      return dicom.read_dicom_slice_hu(self.files[index])
    try:
      return self.hu_volume()[index]
    except ScanError as error:
      raise SliceError(error.path, str(error).removeprefix(f"{error.path}: ")) from error

  def hu_volume(self) -> np.ndarray:
    """A NIfTI volume's (or multi-frame DICOM file's) Hounsfield units float32 `[n, h, w]`, kept by this reader
    only (the training path never needs them)."""
    if self._hu is None:
      self._hu = (nifti.read_nifti_hu(self.files[0]) if self.kind == "nifti"
                  else dicom.read_frames_hu(self.files[0]))
    return self._hu

  def geometry(self, indices: Sequence[int]) -> tuple[tuple[float, float, float], np.ndarray] | None:
    """(spacing, affine) of the slices `indices` (in order) as `read` gives them, or None where unknown
    (image folders, a Scan in memory, headers without the tags, a volume missing some of its slices): see
    `Scan` for the conventions."""
    indices = [int(i) for i in indices]
    if self.kind == "dicom":
      return dicom.series_geometry(self.planes.subset(indices), self.name)
    if self.kind in ("nifti", "frames") and indices != list(range(self.count)):
      return None  # A volume decodes whole or not at all; a subset would shift the affine's slice index.
    if self.kind == "nifti":
      return nifti.nifti_geometry(self.files[0])
    if self.kind == "frames":
      return dicom.series_geometry(dicom.frame_planes(self.files[0]), self.name, display=False)
    return None

  def stamp(self):
    """What identifies this scan's files as they are now (the lung-box cache key), None for a Scan in memory."""
    if self.kind == "memory":
      return None
    return (str(self.path), self.path.stat().st_mtime_ns, self.count, self.window)


@dataclasses.dataclass
class ScanSlices:
  """A scan read by the one reading path: `slices` as read (and cropped to the lung box with lung_crop), sizes
  may differ; `indices`: each one's position in the scan (slices that did not decode, or were dropped as
  lungless, are missing); `box`: the scan's lung box where lungs were looked for."""

  scan_id: str
  path: Path | None
  label: int | None
  slices: list
  indices: np.ndarray
  box: object = None  # data.lungs.LungBox, or None where lungs were not looked for
  skipped: tuple[str, ...] = ()
  kind: str = ""
  names: tuple[str, ...] = ()  # each slice's file name ("slice <i>" for volumes), for messages
  resize: str = "squash"  # ReadOptions.resize: how model_inputs makes the slices square

  def __len__(self) -> int:
    return len(self.slices)

  def model_inputs(self, image_size: int) -> np.ndarray:
    """uint8 `[n, S, S]`: every slice resized to the model's input size, as the pipelines resize them."""
    out = np.empty((len(self.slices), image_size, image_size), np.uint8)
    for image, target in zip(self.slices, out):
      augment.resize(image, image_size, out=target, mode=self.resize)
    return out

  def to_scan(self) -> Scan:
    """A data.Scan of these slices (odd sizes resized to the most common one, with a warning naming them)."""
    slices = _stack_slices(self.path or Path(self.scan_id), self.names, self.slices)
    return Scan(slices=slices, scan_id=self.scan_id, label=self.label, path=self.path, skipped=self.skipped,
                kind=self.kind)


def read_slices(reader: SliceReader, *, hu: bool = False) -> tuple[dict[int, np.ndarray], tuple[str, ...]]:
  """Every slice of a scan that decodes ({index: uint8 [h, w]}, or float32 Hounsfield units with `hu`) and the
  names of those skipped, each skipped one with a warning; a ScanError naming the scan when none decodes."""
  if reader.kind in ("nifti", "frames"):
    # A volume that does not decode is the scan's error, not one per slice.
    if hu:
      reader.hu_volume()
    else:
      reader.volume()
  read = reader.read_hu if hu else reader.read
  slices, skipped = {}, list(reader.skipped)
  for index in range(len(reader)):
    try:
      slices[index] = read(index)
    except SliceError as error:
      skipped.append(reader.slice_name(index))
      warn(f"{error}; skipped")
  if not slices:
    what = {"images": "slice images", "dicom": "DICOM slices"}.get(reader.kind, "slices")
    raise ScanError(reader.path or Path(reader.scan_id), f"none of its {len(reader)} {what} could be decoded")
  if len(skipped) > len(reader.skipped):
    warn(f"{reader.name}: skipped {len(skipped)} of {len(reader) + len(reader.skipped)} slices that could "
         "not be decoded")
  return slices, tuple(skipped)


def _stack_slices(folder: Path, names: Sequence[str], images: Sequence[np.ndarray]) -> np.ndarray:
  """One array of `images`; the odd sizes are resized to the most common one, with a warning naming them."""
  shapes = collections.Counter(image.shape for image in images)
  if len(shapes) > 1:
    common = max(shapes, key=lambda shape: (shapes[shape], shape))
    odd = [(name, image.shape) for name, image in zip(names, images) if image.shape != common]
    listed = ", ".join(f"{name} is {s[0]}x{s[1]}" for name, s in odd[:5])
    more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
    warn(f"{folder}: mixed slice sizes within one scan: most slices are {common[0]}x{common[1]} but "
         f"{listed}{more}; those resized to {common[0]}x{common[1]}")
    images = [image if image.shape == common else
              cv2.resize(image, common[::-1], interpolation=cv2.INTER_AREA
                         if image.shape[0] > common[0] or image.shape[1] > common[1] else cv2.INTER_LINEAR)
              for image in images]
  return np.stack(images)


def read_scan(path, *, window=DEFAULT_WINDOW, scan_id: str | None = None,
              label: int | None = None, hu: bool = False) -> Scan:
  """Reads a scan: a folder of slice images, a folder with one DICOM series, or a NIfTI volume.

  Every slice is decoded as the pipelines and predict decode it (`SliceReader`; no lung crop). A scan
  whose slices differ in size (exports often differ by a pixel or two) is returned at its most common size:
  the odd slices are resized to it, with a warning naming them (and no geometry).

      scan = data.read_scan("chest_ct_dicom", hu=True)
      scan.hu.shape, scan.spacing   # (64, 512, 512) float32 HU; (0.84, 0.84, 5.0) mm (row, column, slice)
      scan.affine @ [row, column, slice, 1]   # that voxel's RAS+ position in mm; scan.axcodes ("P", "L", "S")

  Args:
    path: scan folder, or a `.nii` / `.nii.gz` file.
    window: (centre, width) in Hounsfield units for DICOM and NIfTI; image folders are
      taken as already windowed.
    scan_id: defaults to the folder name (or the NIfTI file name without its suffix).
    label: 1 COVID, 0 non-COVID, None unknown.
    hu: also return the Hounsfield units (`Scan.hu`, float32; the slices are their window); a ScanError
      for image folders, which hold none, and for a DICOM series whose slices differ in size.
  """
  path = Path(path)
  reader = SliceReader(path, window=window)
  if hu and not reader.hu:
    raise ScanError(path, "a folder of slice images holds no Hounsfield units: hu=True needs a DICOM series or "
                    "a NIfTI volume")
  slices, skipped = read_slices(reader, hu=hu)
  order = sorted(slices)
  images = [slices[i] for i in order]
  names = tuple(reader.slice_name(i) for i in order)
  uniform = len({image.shape for image in images}) == 1
  hu_slices = None
  if hu:
    if not uniform:
      sizes = collections.Counter(f"{image.shape[0]}x{image.shape[1]}" for image in images)
      raise ScanError(path, f"slices of different sizes ({dict(sizes)}): no one voxel grid for hu=True")
    hu_slices = np.stack(images)
    images = list(window_to_uint8(hu_slices, window))  # the slices read_scan gives without hu, bit for bit
  read = ScanSlices(scan_id=scan_id or reader.scan_id, path=path, label=label, slices=images,
                    indices=np.asarray(order, np.int64), skipped=skipped, kind=reader.scan_kind, names=names)
  scan = read.to_scan()
  geometry = reader.geometry(order) if reader.hu and uniform else None
  if geometry is not None:
    scan.spacing, scan.affine = geometry
  scan.hu = hu_slices
  scan.window = tuple(float(v) for v in window) if reader.hu else None
  return scan
