"""Scan readers: image folders, DICOM series (synthetic and real), NIfTI volumes (synthetic and real)."""

import re

import nibabel as nib
import numpy as np
import pydicom
import pytest
from data_fixtures import (REAL_DICOM, REAL_NIFTI, needs_real_dicom, needs_real_nifti,
                           numbered_slices, write_image_scan)
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000Lossless, RLELossless

from resdense_jax import data
from resdense_jax.data import synthetic


def _grey_levels(slices):
  return [int(round(float(s.mean()))) for s in slices]


def test_image_folder_sorted_numerically_not_lexically(tmp_path):
  slices = numbered_slices(12)
  folder = write_image_scan(tmp_path / "ct_scan_7", slices)
  scan = data.read_scan(folder, label=1)
  assert scan.slices.dtype == np.uint8 and scan.slices.shape == (12, 16, 16)
  assert _grey_levels(scan.slices) == [10 + 20 * i for i in range(12)]  # 10.jpg after 9.jpg.
  assert scan.scan_id == "ct_scan_7" and scan.label == 1 and scan.path == folder


def test_png_slices_and_colour_images_become_grey(tmp_path):
  rgb = np.zeros((3, 8, 8, 3), np.uint8)
  rgb[..., :] = np.array([30, 60, 90], np.uint8)
  folder = write_image_scan(tmp_path / "s", rgb, suffix=".png")
  scan = data.read_scan(folder)
  assert scan.slices.shape == (3, 8, 8)
  assert 55 <= scan.slices.mean() <= 70  # Luma of BGR (30, 60, 90).


def test_corrupt_slice_is_skipped_counted_and_named(tmp_path):
  folder = write_image_scan(tmp_path / "s", numbered_slices(4))
  (folder / "2.jpg").write_bytes(b"not a jpeg at all")
  with pytest.warns(data.DataWarning, match=re.escape(str(folder / "2.jpg"))):
    scan = data.read_scan(folder)
  assert scan.skipped == ("2.jpg",)
  assert _grey_levels(scan.slices) == [10, 30, 70]


def test_empty_scan_folder_names_the_path(tmp_path):
  folder = tmp_path / "empty_scan"
  folder.mkdir()
  with pytest.raises(data.ScanError, match=re.escape(str(folder)) + ".*empty"):
    data.read_scan(folder)


def test_stray_file_warns_with_its_path(tmp_path):
  folder = write_image_scan(tmp_path / "s", numbered_slices(3))
  (folder / "notes.txt").write_text("scanner export log")
  with pytest.warns(data.DataWarning, match=re.escape(str(folder / "notes.txt")) + ".*stray"):
    scan = data.read_scan(folder)
  assert len(scan.slices) == 3


def test_mixed_slice_sizes_resized_to_the_common_size_naming_the_odd_slice(tmp_path):
  folder = write_image_scan(tmp_path / "s", numbered_slices(3, size=16))
  write_image_scan(folder, [np.full((20, 24), 200, np.uint8)], names=["3.jpg"])
  with pytest.warns(data.DataWarning, match=re.escape(str(folder)) + ".*mixed slice sizes.*3.jpg is 20x24"):
    scan = data.read_scan(folder)
  assert scan.slices.shape == (4, 16, 16)
  assert _grey_levels(scan.slices) == [10, 30, 50, 200]


def test_all_slices_corrupt_is_an_error(tmp_path):
  folder = tmp_path / "s"
  folder.mkdir()
  (folder / "0.jpg").write_bytes(b"xx")
  with pytest.warns(data.DataWarning), pytest.raises(data.ScanError, match=re.escape(str(folder))):
    data.read_scan(folder)


def test_window_maps_lung_window_edges():
  hu = np.array([-2000, -1350, -600, 150, 3000], np.float32)
  np.testing.assert_array_equal(data.window_to_uint8(hu), [0, 0, 128, 255, 255])
  levels = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(data.window_to_uint8(data.uint8_to_hu(levels)), levels)


@pytest.fixture(scope="module")
def small_scan():
  scan, _ = synthetic.synthetic_scan(3, covid=True, num_slices=6, slice_size=32, scan_id="p1")
  return scan


def test_dicom_series_ordered_by_position_with_hounsfield_units(tmp_path, small_scan):
  files = synthetic.write_dicom_series(small_scan, tmp_path / "series")
  # Names that sort against the anatomy: position must decide, not the file name.
  for i, path in enumerate(files):
    path.rename(path.with_name(f"IM{(len(files) - i) * 7 % 11:02d}_{i}.dcm"))
  scan = data.read_scan(tmp_path / "series")
  np.testing.assert_array_equal(scan.slices, small_scan.slices)
  # Stored values are HU + 1024 with intercept -1024; pydicom's modality LUT is the reference.
  ds = pydicom.dcmread(sorted((tmp_path / "series").iterdir())[0])
  hu = apply_modality_lut(ds.pixel_array, ds)
  k = int(np.argmin([abs(s - ds.ImagePositionPatient[2]) for s in
                     [-400.0 + 5.0 * j for j in range(len(files))]]))
  np.testing.assert_array_equal(data.window_to_uint8(hu), small_scan.slices[k])


def test_dicom_falls_back_to_instance_number(tmp_path, small_scan):
  files = synthetic.write_dicom_series(small_scan, tmp_path / "series")
  for path in files:
    ds = pydicom.dcmread(path)
    del ds.ImagePositionPatient
    ds.save_as(path)
  scan = data.read_scan(tmp_path / "series")
  # InstanceNumber counts from the top down, so this order is the reverse of the positions.
  np.testing.assert_array_equal(scan.slices, small_scan.slices[::-1])


def test_dicom_folder_mixing_series_names_the_folder(tmp_path, small_scan):
  folder = tmp_path / "mixed"
  synthetic.write_dicom_series(small_scan, folder, series_uid="1.2.3.4")
  other = synthetic.write_dicom_series(small_scan, tmp_path / "other", series_uid="1.2.3.5")
  other[0].rename(folder / "extra.dcm")
  with pytest.raises(data.ScanError, match=re.escape(str(folder)) + ".*mixes 2 series"):
    data.read_scan(folder)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_dicom_decodes_losslessly(tmp_path, small_scan, syntax):
  files = synthetic.write_dicom_series(small_scan, tmp_path / "c", transfer_syntax=syntax)
  assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
  np.testing.assert_array_equal(data.read_scan(tmp_path / "c").slices, small_scan.slices)


def test_dicom_files_without_suffix_are_found_by_magic(tmp_path, small_scan):
  files = synthetic.write_dicom_series(small_scan, tmp_path / "s")
  for i, path in enumerate(files):
    path.rename(path.with_name(f"1.2.840.{i}"))
  np.testing.assert_array_equal(data.read_scan(tmp_path / "s").slices, small_scan.slices)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "LAI", "PSR"])
def test_nifti_reoriented_to_display_slices(tmp_path, small_scan, orientation):
  file = synthetic.write_nifti(small_scan, tmp_path / f"scan_{orientation}.nii.gz",
                               orientation=orientation)
  assert nib.aff2axcodes(nib.load(file).affine) == tuple(orientation)
  scan = data.read_scan(file)
  np.testing.assert_array_equal(scan.slices, small_scan.slices)
  assert scan.scan_id == f"scan_{orientation}"


def test_unreadable_nifti_names_the_file(tmp_path):
  file = tmp_path / "broken.nii.gz"
  file.write_bytes(b"\x1f\x8b not really gzip")
  with pytest.raises(data.ScanError, match=re.escape(str(file))):
    data.read_scan(file)


BONE_WINDOW = (700.0, 600.0)  # 400..1000 HU: bone only, even contrast-enhanced blood is black.


def _assert_spine_posterior(bone_slice):
  """Anatomy independent of headers: in the middle columns (sternum in front, spine behind)
  most bone lies in the lower, posterior half of a display-oriented slice."""
  rows, cols = bone_slice.shape
  band = bone_slice[:, cols * 2 // 5: cols * 3 // 5] > 128
  assert band[rows // 2:].sum() > 3 * band[: rows // 2].sum() > 0


@needs_real_dicom
def test_real_dicom_series_order_and_hounsfield_units():
  scan = data.read_scan(REAL_DICOM)
  assert scan.slices.shape == (64, 512, 512)
  # File names run top-down (z = -124 ... -439); the reader orders inferior to superior.
  first, last = (pydicom.dcmread(REAL_DICOM / name) for name in ("1-64.dcm", "1-01.dcm"))
  assert float(first.ImagePositionPatient[2]) < float(last.ImagePositionPatient[2])
  for k, ds in ((0, first), (63, last)):
    expected = data.window_to_uint8(apply_modality_lut(ds.pixel_array, ds))
    np.testing.assert_array_equal(scan.slices[k], expected)
  assert abs(scan.slices[32][:20, :20].mean() - data.window_to_uint8(np.float32(-1024))) < 3
  _assert_spine_posterior(data.read_scan(REAL_DICOM, window=BONE_WINDOW).slices[32])


@needs_real_nifti
def test_real_nifti_reoriented_from_lps():
  image = nib.load(REAL_NIFTI)
  assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
  scan = data.read_scan(REAL_NIFTI)
  assert scan.slices.shape == (191, 167, 233)
  # L-P-S voxels already run (left, posterior, superior): display rows are +P and columns +L
  # with no flips, and slices ascend toward superior.
  raw = np.asarray(image.dataobj, np.float32)
  expected = data.window_to_uint8(raw.transpose(2, 1, 0))
  np.testing.assert_array_equal(scan.slices, expected)
  assert scan.slices[0].mean() > scan.slices[95].mean()  # Abdomen (no lung) below the chest.
