"""DICOM orientation worked out by hand: slice order and in-plane flips beyond head-first supine.

`synthetic.write_dicom_series` writes only head-first supine series and is built as the reader's
inverse, so a convention wrong in both would pass the other DICOM tests. Here every series is
written with pydicom directly, and what the reader must return is stated by hand from the DICOM
patient coordinate system (PS3.3 C.7.6.2.1.1):

- LPS: +x toward the patient's left, +y toward posterior, +z toward superior (the head).
- ImageOrientationPatient: the direction cosines of a row (the way the column index grows), then
  of a column (the way the row index grows).
- ImagePositionPatient: the centre of the first transmitted pixel (row 0, column 0).

The reader's contract (WORKSPACE_NOTES.md, "Data"): slices inferior to superior, anterior at the
top of the image, the patient's right on the image's left.
"""

import dataclasses
import math
from typing import Callable

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from resdense_jax import data

SIZE = 16
# The phantom as the reader must show it. Both markers are anterior (top rows); the bright one is
# on the patient's right (image left), the dimmer one on the left. One quadrant marker tells every
# flip apart; the second, off the diagonal, tells a transpose apart too.
RIGHT_ANTERIOR, RIGHT_ANTERIOR_GREY = (slice(2, 6), slice(2, 6)), 250
LEFT_ANTERIOR, LEFT_ANTERIOR_GREY = (slice(2, 4), slice(10, 14)), 220
# Background grey of each slice, inferior to superior: the expected output order.
LEVELS = (40, 80, 120, 160, 200)
# Centre 127.5, width 255: HU 0..255 map onto grey 0..255 unchanged.
IDENTITY_WINDOW = (127.5, 255.0)


def display_slice(level: int) -> np.ndarray:
  image = np.full((SIZE, SIZE), level, np.int32)
  image[RIGHT_ANTERIOR] = RIGHT_ANTERIOR_GREY
  image[LEFT_ANTERIOR] = LEFT_ANTERIOR_GREY
  return image


EXPECTED = np.stack([display_slice(level) for level in LEVELS]).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Series:
  patient_position: str
  orientation: tuple[float, ...]  # ImageOrientationPatient.
  # Display image -> stored pixel array, worked out by hand from the orientation.
  stored: Callable[[np.ndarray], np.ndarray]
  # (file name, InstanceNumber, ImagePositionPatient, background level).
  files: tuple[tuple[str, int, tuple[float, float, float], int], ...]


def _tilted_series(degrees: float, shifts=(0.0, -10.0, 0.0, -10.0, 0.0)) -> Series:
  """Head-first supine through a gantry tilted by `degrees` about the patient's x axis.

  Rows run (1, 0, 0), columns (0, cos t, sin t): the column index still grows toward the patient's
  left and the row index toward posterior (and a little superior), so no flip. The slice normal is
  row x column = (0, -sin t, cos t). The planes lie 2 mm apart along it, but the first pixel of
  planes 1 and 3 sits 10 mm further toward anterior within its plane (a re-centred field of view;
  the markers are drawn relative to each image, so they move with it). That lowers their z by
  10 sin t = 3.4 mm, more than the 2 cos t = 1.9 mm between planes: by z alone the order would be
  planes 1, 0, 3, 2, 4 (checked in the test), along the normal it is 0, 1, 2, 3, 4.
  """
  t = math.radians(degrees)
  row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, math.cos(t), math.sin(t)])
  normal = np.array([0.0, -math.sin(t), math.cos(t)])
  files = []
  for plane, (shift, level) in enumerate(zip(shifts, LEVELS)):
    corner = 2.0 * plane * normal + (shift - 7.5) * col - 7.5 * row
    files.append((f"{plane + 1}.dcm", plane + 1, tuple(float(v) for v in corner), level))
  return Series("HFS", (*row, *col), lambda image: image, tuple(files))


SERIES = {
    # IOP [1,0,0, 0,1,0]: columns run right -> left (+x), rows anterior -> posterior (+y): stored
    # as displayed, no flip. The first pixel is the patient's right-anterior corner. InstanceNumber
    # grows with z; the file names sort against it (a, b, c, d, e = levels 120, 200, 80, 160, 40).
    "head_first_supine": Series("HFS", (1, 0, 0, 0, 1, 0), lambda image: image, (
        ("e.dcm", 1, (-7.5, -7.5, -20.0), 40),
        ("c.dcm", 2, (-7.5, -7.5, -15.0), 80),
        ("a.dcm", 3, (-7.5, -7.5, -10.0), 120),
        ("d.dcm", 4, (-7.5, -7.5, -5.0), 160),
        ("b.dcm", 5, (-7.5, -7.5, 0.0), 200))),
    # IOP [-1,0,0, 0,1,0]: columns run left -> right (-x), so the patient's right is on the stored
    # image's right: stored mirrored left-right, the reader must flip left-right. The first pixel
    # is the patient's left-anterior corner. z decreases as InstanceNumber and file order grow:
    # the output is the file order reversed (05.dcm first). The normal row x column = (0,0,-1)
    # points inferior: the reader must turn it toward superior.
    "feet_first_supine": Series("FFS", (-1, 0, 0, 0, 1, 0), lambda image: image[:, ::-1], (
        ("01.dcm", 1, (7.5, -7.5, 0.0), 200),
        ("02.dcm", 2, (7.5, -7.5, -5.0), 160),
        ("03.dcm", 3, (7.5, -7.5, -10.0), 120),
        ("04.dcm", 4, (7.5, -7.5, -15.0), 80),
        ("05.dcm", 5, (7.5, -7.5, -20.0), 40))),
    # IOP [-1,0,0, 0,-1,0]: columns run left -> right, rows posterior -> anterior (-y): anterior
    # at the stored image's bottom and the patient's right on its right: stored turned 180
    # degrees, the reader must flip both ways. The first pixel is the patient's left-posterior
    # corner. InstanceNumber counts from the head down: output in reverse InstanceNumber order.
    "head_first_prone": Series("HFP", (-1, 0, 0, 0, -1, 0), lambda image: image[::-1, ::-1], (
        ("1.dcm", 1, (7.5, 7.5, 0.0), 200),
        ("2.dcm", 2, (7.5, 7.5, -5.0), 160),
        ("3.dcm", 3, (7.5, 7.5, -10.0), 120),
        ("4.dcm", 4, (7.5, 7.5, -15.0), 80),
        ("5.dcm", 5, (7.5, 7.5, -20.0), 40))),
    # IOP [1,0,0, 0,-1,0]: columns run right -> left as displayed, rows posterior -> anterior:
    # stored upside down, the reader must flip the rows only. The first pixel is the patient's
    # right-posterior corner. The normal (0,0,-1) points inferior; InstanceNumber grows with z.
    "feet_first_prone": Series("FFP", (1, 0, 0, 0, -1, 0), lambda image: image[::-1, :], (
        ("s10.dcm", 1, (-7.5, 7.5, -20.0), 40),
        ("s11.dcm", 2, (-7.5, 7.5, -15.0), 80),
        ("s12.dcm", 3, (-7.5, 7.5, -10.0), 120),
        ("s8.dcm", 4, (-7.5, 7.5, -5.0), 160),
        ("s9.dcm", 5, (-7.5, 7.5, 0.0), 200))),
    "head_first_supine_tilted_20deg": _tilted_series(20.0),
}


def _write_series(folder, series: Series) -> None:
  """One CT file per entry of `series.files`: uint16 HU + 1024 with RescaleIntercept -1024."""
  folder.mkdir()
  study_uid, series_uid = generate_uid(), generate_uid()
  for name, number, position, level in series.files:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "orientation-phantom"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.PatientPosition = series.patient_position  # Informative only: IOP/IPP are what count.
    ds.ImageOrientationPatient = [float(v) for v in series.orientation]
    ds.ImagePositionPatient = list(position)
    ds.PixelSpacing = [1.0, 1.0]
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    stored = np.ascontiguousarray(series.stored(display_slice(level)) + 1024).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    ds.save_as(folder / name, enforce_file_format=True)


def _lps_offset(orientation, row: float, col: float) -> np.ndarray:
  """Where stored pixel (row, col) lies from the image centre in LPS mm (1 mm pixels)."""
  row_cosines, col_cosines = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
  centre = (SIZE - 1) / 2
  return (col - centre) * row_cosines + (row - centre) * col_cosines


def _marker_side(image: np.ndarray, grey: int) -> str:
  rows, cols = np.nonzero(image == grey)
  vertical = "top" if rows.mean() < SIZE / 2 else "bottom"
  return f"{vertical}-{'left' if cols.mean() < SIZE / 2 else 'right'}"


@pytest.mark.parametrize("name", SERIES)
def test_dicom_series_comes_out_inferior_to_superior_anterior_up_right_on_left(tmp_path, name):
  series = SERIES[name]
  folder = tmp_path / name
  _write_series(folder, series)
  # The fixture itself, against the standard's pixel-to-patient equation rather than the reader:
  # the bright marker of every stored image lies right-anterior (-x, -y), the dim one left-anterior.
  for file_name, *_ in series.files:
    ds = pydicom.dcmread(folder / file_name)
    for grey, x_sign in ((RIGHT_ANTERIOR_GREY, -1), (LEFT_ANTERIOR_GREY, 1)):
      rows, cols = np.nonzero(ds.pixel_array.astype(int) - 1024 == grey)
      offset = _lps_offset(ds.ImageOrientationPatient, rows.mean(), cols.mean())
      assert np.sign(offset[0]) == x_sign and offset[1] < 0, (file_name, grey, offset)
  if name.endswith("tilted_20deg"):
    z = [position[2] for _, _, position, _ in series.files]
    assert np.argsort(z).tolist() == [1, 0, 3, 2, 4]  # z alone would mis-order this series.

  slices = data.read_scan(folder, window=IDENTITY_WINDOW).slices
  assert slices.shape == EXPECTED.shape
  assert [int(s[SIZE // 2, SIZE // 2]) for s in slices] == list(LEVELS), "slice order"
  assert [_marker_side(s, RIGHT_ANTERIOR_GREY) for s in slices] == ["top-left"] * len(LEVELS)
  assert [_marker_side(s, LEFT_ANTERIOR_GREY) for s in slices] == ["top-right"] * len(LEVELS)
  np.testing.assert_array_equal(slices, EXPECTED)


def _sheared_series(degrees: float) -> Series:
  """A gantry tilted by `degrees` as CT scanners tilt it: tilted planes (rows (1, 0, 0), columns (0, cos t,
  sin t)) whose first pixels step 2 mm along the table (z), not along the normal: the voxel grid is sheared,
  the planes 2 cos t = 1.88 mm apart along the normal (0, -sin t, cos t)."""
  t = math.radians(degrees)
  row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, math.cos(t), math.sin(t)])
  files = []
  for plane, level in enumerate(LEVELS):
    corner = np.array([0.0, 0.0, 2.0 * plane]) - 7.5 * col - 7.5 * row
    files.append((f"{plane + 1}.dcm", plane + 1, tuple(float(v) for v in corner), level))
  return Series("HFS", (*row, *col), lambda image: image, tuple(files))


# Evenly spaced series, each with its distance between planes along the normal: one affine places every
# voxel. The tilted one without the re-centred planes steps 2 mm along its normal; the sheared one steps along
# z, so its affine's slice column leaves the normal.
GEOMETRY_SERIES = {
    **{name: (series, 5.0) for name, series in SERIES.items() if not name.endswith("tilted_20deg")},
    "head_first_supine_tilted_20deg_even": (_tilted_series(20.0, shifts=(0.0,) * 5), 2.0),
    "head_first_supine_sheared_20deg": (_sheared_series(20.0), 2.0 * math.cos(math.radians(20.0))),
}


@pytest.mark.parametrize("name", GEOMETRY_SERIES)
def test_affine_places_every_voxel_where_the_standard_says(tmp_path, name):
  """scan.affine maps each returned voxel (row, column, slice) to the RAS+ position of the stored pixel it
  shows, by the standard's equation: position + c * row cosines + r * column cosines (1 mm pixels), LPS with
  x and y negated. The stored pixel of each displayed one is found through the fixture's own `stored`."""
  series, slice_spacing = GEOMETRY_SERIES[name]
  folder = tmp_path / name
  _write_series(folder, series)
  scan = data.read_scan(folder, window=IDENTITY_WINDOW, hu=True)
  np.testing.assert_array_equal(scan.hu, EXPECTED.astype(np.float32))
  # Which stored pixel every displayed pixel comes from: `stored` moves an index image as it moves pixels.
  display_index = np.arange(SIZE * SIZE).reshape(SIZE, SIZE)
  stored_index = series.stored(display_index)
  files = sorted(series.files, key=lambda entry: entry[3])  # by background level: inferior to superior
  row_cosines, col_cosines = np.asarray(series.orientation[:3], float), np.asarray(series.orientation[3:], float)
  for k, (_, _, position, _) in enumerate(files):
    for r in range(SIZE):
      for c in range(SIZE):
        i, j = divmod(int(stored_index[r, c]), SIZE)
        lps = np.asarray(position, float) + c * row_cosines + r * col_cosines
        np.testing.assert_allclose(scan.affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1.0], atol=1e-9,
                                   err_msg=f"{name}: voxel (row {i}, column {j}, slice {k})")
  assert scan.spacing == pytest.approx((1.0, 1.0, slice_spacing))
  assert scan.axcodes == nib.aff2axcodes(scan.affine) == ("P", "L", "S")


def test_unevenly_spaced_series_is_warned_about(tmp_path):
  _write_series(tmp_path / "uneven", SERIES["head_first_supine_tilted_20deg"])
  with pytest.warns(data.DataWarning, match="uneven.*not evenly spaced"):
    data.read_scan(tmp_path / "uneven", window=IDENTITY_WINDOW)
