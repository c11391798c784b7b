"""The data readers as a researcher uses them (issue 12): geometry and Hounsfield units, and the resize mode.

Every expected value here is worked out from pydicom, nibabel or OpenCV directly, not through the project's
readers: voxel positions from the DICOM pixel-to-patient equation (PS3.3 C.7.6.2.1.1) and nibabel's affines,
HU as pixel * RescaleSlope + RescaleIntercept, padded model inputs pixel by pixel.
"""

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
from demo_configs import tiny_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from resdense_jax import data, explain, feature_cache, predict, train
from resdense_jax.data import augment, sources, synthetic

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
LUNG_WINDOW = (-600.0, 1500.0)


def _dicom_patient_position(ds, row: float, col: float) -> np.ndarray:
  """RAS+ mm of stored pixel (row, col) of `ds`: PS3.3 C.7.6.2.1.1 in LPS, then x and y negated."""
  iop = np.asarray(ds.ImageOrientationPatient, float)
  row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
  lps = (np.asarray(ds.ImagePositionPatient, float) + col * col_spacing * iop[:3]
         + row * row_spacing * iop[3:])
  return LPS_TO_RAS * lps


def _window_by_hand(hu: np.ndarray, window=LUNG_WINDOW) -> np.ndarray:
  """The linear lung window in float64 (unrounded), 0..255."""
  centre, width = window
  return np.clip((np.asarray(hu, np.float64) - (centre - width / 2)) * 255.0 / width, 0, 255)


def _sample(shape, count: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [tuple(int(rng.integers(0, n)) for n in shape) for _ in range(count)]


# --------------------------------------------------------------------------------- real DICOM and NIfTI


def test_real_dicom_spacing_affine_and_hu_follow_the_headers(shared_data):
  folder = shared_data / "chest_ct_dicom"
  datasets = [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]
  iop = np.asarray(datasets[0].ImageOrientationPatient, float)
  # Rows along +x (toward the patient's left), columns along +y (posterior): stored as the reader displays it
  # (anterior up, the patient's right on the left), so displayed pixel (i, j) is stored pixel (i, j).
  assert iop.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
  normal = np.cross(iop[:3], iop[3:])  # (0, 0, 1): toward the head
  datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)))
  depth = [float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)) for ds in datasets]
  np.testing.assert_allclose(np.diff(depth), 5.0, atol=1e-9)
  row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)

  scan = data.read_scan(folder, hu=True)
  n, h, w = scan.hu.shape
  assert (n, h, w) == (64, 512, 512) and scan.hu.dtype == np.float32
  assert scan.spacing == pytest.approx((row_spacing, col_spacing, 5.0), abs=1e-9)
  assert scan.spacing[0] == pytest.approx(0.841796875)
  np.testing.assert_allclose(scan.affine @ [0, 0, 0, 1], [*_dicom_patient_position(datasets[0], 0, 0), 1],
                             atol=1e-6)
  np.testing.assert_allclose(scan.affine @ [h - 1, w - 1, n - 1, 1],
                             [*_dicom_patient_position(datasets[-1], h - 1, w - 1), 1], atol=1e-6)
  assert scan.axcodes == nib.aff2axcodes(scan.affine) == ("P", "L", "S")
  for k, i, j in _sample((n, h, w), 300):
    ds = datasets[k]
    expected = float(ds.pixel_array[i, j]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert scan.hu[k, i, j] == expected, (k, i, j)
    np.testing.assert_allclose((scan.affine @ [i, j, k, 1])[:3], _dicom_patient_position(ds, i, j), atol=1e-6)
  assert float(datasets[0].RescaleIntercept) == -1024.0
  # The uint8 slices are the project's window of these HU, as read without hu=True, bit for bit.
  np.testing.assert_array_equal(scan.slices, data.window_to_uint8(scan.hu, LUNG_WINDOW))
  np.testing.assert_array_equal(scan.slices, data.read_scan(folder).slices)
  assert np.abs(scan.slices.astype(np.float64) - _window_by_hand(scan.hu)).max() <= 0.5 + 1e-3
  assert scan.window == LUNG_WINDOW


def test_real_nifti_spacing_affine_and_hu_follow_nibabel(shared_data):
  path = shared_data / "chest_ct_nifti" / "chest_ct.nii.gz"
  image = nib.load(path)
  assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
  volume = np.asarray(image.dataobj, np.float64)  # int16 HU (scl_slope unset)
  zooms = [float(z) for z in image.header.get_zooms()]
  # L-P-S: the file's first axis runs toward the patient's left (the reader's columns, right to left), its
  # second toward posterior (the rows, anterior to posterior), its third toward the head (the slices): voxel
  # (row i, column j, slice k) is file voxel (j, i, k).
  swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)

  scan = data.read_scan(path, hu=True)
  n, h, w = scan.hu.shape
  assert (w, h, n) == image.shape
  assert scan.spacing == pytest.approx((zooms[1], zooms[0], zooms[2])) == (1.5, 1.5, 1.5)
  np.testing.assert_allclose(scan.affine, image.affine @ swap, atol=1e-9)
  np.testing.assert_allclose(scan.affine @ [0, 0, 0, 1], image.affine @ [0, 0, 0, 1], atol=1e-9)
  np.testing.assert_allclose(scan.affine @ [h - 1, w - 1, n - 1, 1], image.affine @ [w - 1, h - 1, n - 1, 1],
                             atol=1e-9)
  assert scan.axcodes == ("P", "L", "S")
  for k, i, j in _sample((n, h, w), 300):
    assert scan.hu[k, i, j] == volume[j, i, k], (k, i, j)
  np.testing.assert_array_equal(scan.slices, data.window_to_uint8(scan.hu, LUNG_WINDOW))
  np.testing.assert_array_equal(scan.slices, data.read_scan(path).slices)


# ------------------------------------------------------------------------------------ synthetic scans


def _oblong_scan(rows: int = 24, cols: int = 40, num_slices: int = 5) -> data.Scan:
  """A synthetic chest cut to rows x cols (not square: a swapped row / column would show)."""
  scan, _ = synthetic.synthetic_scan(3, covid=True, num_slices=num_slices, slice_size=cols)
  top = (cols - rows) // 2
  return data.Scan(slices=np.ascontiguousarray(scan.slices[:, top:top + rows]), scan_id="oblong")


def test_synthetic_dicom_with_rescale_slope_intercept_and_unequal_pixels(tmp_path):
  original = _oblong_scan()
  files = synthetic.write_dicom_series(original, tmp_path / "series", pixel_spacing=(0.6, 0.9),
                                       slice_spacing=2.5, first_z=-100.0, rescale_slope=2.5,
                                       rescale_intercept=-1000.5)
  datasets = [pydicom.dcmread(path) for path in files]  # file i at z = -100 + 2.5 i: already inferior first
  assert [float(ds.ImagePositionPatient[2]) for ds in datasets] == [-100.0 + 2.5 * i for i in range(5)]
  assert (float(datasets[0].RescaleSlope), float(datasets[0].RescaleIntercept)) == (2.5, -1000.5)

  scan = data.read_scan(tmp_path / "series", hu=True)
  n, h, w = scan.hu.shape
  assert (n, h, w) == (5, 24, 40)
  assert scan.spacing == pytest.approx((0.6, 0.9, 2.5))
  expected_hu = np.stack([ds.pixel_array.astype(np.float64) * 2.5 - 1000.5 for ds in datasets])
  np.testing.assert_allclose(scan.hu, expected_hu, rtol=0, atol=1e-3)
  # The rescale really is applied: HU within half a stored step of what was written.
  assert np.abs(scan.hu - data.uint8_to_hu(original.slices)).max() <= 1.25 + 1e-3
  np.testing.assert_allclose(scan.affine @ [0, 0, 0, 1], [*_dicom_patient_position(datasets[0], 0, 0), 1],
                             atol=1e-9)
  np.testing.assert_allclose(scan.affine @ [h - 1, w - 1, n - 1, 1],
                             [*_dicom_patient_position(datasets[-1], h - 1, w - 1), 1], atol=1e-9)
  np.testing.assert_allclose(scan.affine @ [1, 0, 0, 1] - scan.affine @ [0, 0, 0, 1], [0, -0.6, 0, 0])
  np.testing.assert_allclose(scan.affine @ [0, 1, 0, 1] - scan.affine @ [0, 0, 0, 1], [-0.9, 0, 0, 0])
  np.testing.assert_array_equal(scan.slices, data.window_to_uint8(scan.hu, LUNG_WINDOW))
  np.testing.assert_array_equal(scan.slices, data.read_scan(tmp_path / "series").slices)


@pytest.mark.parametrize("orientation", ["LPS", "ASL"])
def test_synthetic_nifti_geometry_against_the_files_own_affine(tmp_path, orientation):
  original = _oblong_scan()
  path = synthetic.write_nifti(original, tmp_path / "scan.nii.gz", voxel_size=(0.7, 0.8, 5.0),
                               orientation=orientation)
  image = nib.load(path)
  assert nib.aff2axcodes(image.affine) == tuple(orientation)
  volume = np.asarray(image.dataobj, np.float64)
  scan = data.read_scan(path, hu=True)
  n, h, w = scan.hu.shape
  assert (n, h, w) == (5, 24, 40)
  # voxel_size is (x, y, z) of the RAS volume it was written as: x along the columns, y along the rows.
  assert scan.spacing == pytest.approx((0.8, 0.7, 5.0))
  to_file = np.linalg.inv(image.affine)
  for k, i, j in _sample((n, h, w), 100):
    voxel = to_file @ scan.affine @ [i, j, k, 1]  # the file's own voxel at that position
    np.testing.assert_allclose(voxel, np.round(voxel), atol=1e-6)
    a, b, c = (int(v) for v in np.round(voxel[:3]))
    assert scan.hu[k, i, j] == volume[a, b, c], (k, i, j)
  assert scan.axcodes == ("P", "L", "S")


def test_hu_and_affine_round_trip_through_nibabel(tmp_path):
  """The documented use: `Nifti1Image(scan.hu.transpose(1, 2, 0), scan.affine)` is the scan as NIfTI."""
  dicom_folder = tmp_path / "series"
  synthetic.write_dicom_series(_oblong_scan(), dicom_folder, pixel_spacing=(0.6, 0.9), slice_spacing=2.5)
  scan = data.read_scan(dicom_folder, hu=True)
  nib.save(nib.Nifti1Image(scan.hu.transpose(1, 2, 0), scan.affine), tmp_path / "again.nii.gz")
  again = data.read_scan(tmp_path / "again.nii.gz", hu=True)
  np.testing.assert_array_equal(again.hu, scan.hu)
  np.testing.assert_allclose(again.affine, scan.affine, atol=1e-5)  # NIfTI stores the affine in float32
  assert again.spacing == pytest.approx(scan.spacing)


def _multiframe_file(path, frames: np.ndarray, positions, spacing=(0.5, 0.75), thickness=3.0):
  """An enhanced-CT-like multi-frame file: geometry only in its functional groups."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.SeriesInstanceUID = "CT", generate_uid()
  ds.NumberOfFrames = len(frames)
  ds.Rows, ds.Columns = frames.shape[1:]
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
  ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
  measures, plane = Dataset(), Dataset()
  measures.PixelSpacing, measures.SliceThickness = list(spacing), thickness
  plane.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
  shared = Dataset()
  shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([plane])
  ds.SharedFunctionalGroupsSequence = Sequence([shared])
  per_frame = []
  for position in positions:
    item, where = Dataset(), Dataset()
    where.ImagePositionPatient = list(position)
    item.PlanePositionSequence = Sequence([where])
    per_frame.append(item)
  ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
  ds.PixelData = frames.astype(np.int16).tobytes()
  ds.save_as(path, enforce_file_format=True)


def test_multiframe_dicom_geometry_from_functional_groups(tmp_path):
  frames = (np.arange(3 * 4 * 6).reshape(3, 4, 6) * 10).astype(np.int16)
  folder = tmp_path / "frames"
  folder.mkdir()
  positions = [(-10.0, -20.0, 30.0 + 3.0 * f) for f in range(3)]
  _multiframe_file(folder / "volume.dcm", frames, positions)
  scan = data.read_scan(folder, hu=True)
  np.testing.assert_array_equal(scan.hu, frames * 2.0 - 1000.0)  # frames in stored order, as stored
  assert scan.spacing == pytest.approx((0.5, 0.75, 3.0))
  # Stored pixel (r, c) of frame f at LPS (-10 + 0.75 c, -20 + 0.5 r, 30 + 3 f).
  np.testing.assert_allclose(scan.affine @ [3, 5, 2, 1], [10.0 - 0.75 * 5, 20.0 - 0.5 * 3, 36.0, 1.0])
  np.testing.assert_allclose(scan.affine @ [0, 0, 0, 1], [10.0, 20.0, 30.0, 1.0])


def test_image_folders_have_no_geometry_and_refuse_hu(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  for index in range(2):
    cv2.imwrite(str(folder / f"{index}.png"), np.full((8, 12), 40 * index, np.uint8))
  scan = data.read_scan(folder)
  assert (scan.spacing, scan.affine, scan.axcodes, scan.hu, scan.window) == (None, None, None, None, None)
  with pytest.raises(data.ScanError, match=f"{folder}: .*no Hounsfield units"):
    data.read_scan(folder, hu=True)


# ------------------------------------------------------------------------------------------- resize


def test_pad_keeps_the_aspect_by_hand():
  # 2x4 -> 4x4 (scale 1): the slice verbatim in rows 1-2, zero rows above and below.
  image = np.arange(1, 9, dtype=np.uint8).reshape(2, 4)
  expected = np.array([[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]], np.uint8)
  np.testing.assert_array_equal(augment.resize(image, 4, mode="pad"), expected)
  # 4x2 (tall) -> 4x4: zero columns left and right.
  np.testing.assert_array_equal(augment.resize(image.T.copy(), 4, mode="pad"), expected.T)
  # 20x40 -> 40x40: rows 10..29 are the slice exactly, the 10 rows above and below are 0; into `out`, whose
  # old pixels must not survive.
  wide = ((np.arange(20 * 40).reshape(20, 40) * 7) % 250 + 1).astype(np.uint8)
  out = np.full((40, 40), 255, np.uint8)
  assert augment.resize(wide, 40, mode="pad", out=out) is out
  np.testing.assert_array_equal(out[10:30], wide)
  assert not out[:10].any() and not out[30:].any()
  # Growing 20x40 -> 80x80: rows 20..59 are OpenCV's bilinear 40x80 of it; shrinking to 10: rows 2..6 its
  # area average to 5x10 (the odd padding row at the bottom).
  grown = augment.resize(wide, 80, mode="pad")
  np.testing.assert_array_equal(grown[20:60], cv2.resize(wide, (80, 40), interpolation=cv2.INTER_LINEAR))
  assert not grown[:20].any() and not grown[60:].any()
  shrunk = augment.resize(wide, 10, mode="pad")
  np.testing.assert_array_equal(shrunk[2:7], cv2.resize(wide, (10, 5), interpolation=cv2.INTER_AREA))
  assert not shrunk[:2].any() and not shrunk[7:].any()
  # 3x4 -> 5x5: 4 columns -> 5, 3 rows -> 3.75, rounded to 4 rows (0..3), one zero row below.
  small = np.array([[10, 20, 30, 40], [50, 60, 70, 80], [90, 100, 110, 120]], np.uint8)
  five = augment.resize(small, 5, mode="pad")
  np.testing.assert_array_equal(five[:4], cv2.resize(small, (5, 4), interpolation=cv2.INTER_LINEAR))
  assert not five[4].any()
  # The real NIfTI's 167x233 slices at 256: 233 -> 256, 167 -> 167 * 256 / 233 = 183.48 -> 183 rows, from
  # row (256 - 183) // 2 = 36.
  assert augment.content_box((167, 233), 256, "pad") == (36, 0, 219, 256)
  assert augment.content_box((233, 167), 256, "pad") == (0, 36, 256, 219)
  assert augment.content_box((167, 233), 256, "squash") == (0, 0, 256, 256)
  nifti_like = np.full((167, 233), 200, np.uint8)
  padded = augment.resize(nifti_like, 256, mode="pad")
  assert (padded[36:219] == 200).all() and not padded[:36].any() and not padded[219:].any()
  with pytest.raises(ValueError, match="config.data.resize"):
    augment.resize(image, 4, mode="crop")
  with pytest.raises(ValueError, match="config.data.resize"):
    data.ReadOptions(resize="stretch")


@pytest.mark.parametrize("shape, size", [((167, 233), 256), ((233, 167), 64), ((20, 40), 40), ((12, 20), 64),
                                         ((512, 512), 256), ((30, 30), 64), ((64, 64), 64)])
def test_squash_is_unchanged_bit_for_bit(shape, size):
  """The default: OpenCV's resize to size x size, area when either side shrinks, else bilinear (computed here
  with cv2 directly); pad gives the same on square slices."""
  image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
  shrinking = shape[0] > size or shape[1] > size
  expected = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
  if shape == (size, size):
    expected = image
  np.testing.assert_array_equal(augment.resize(image, size), expected)
  np.testing.assert_array_equal(augment.resize(image, size, mode="squash"), expected)
  out = np.full((size, size), 7, np.uint8)
  augment.resize(image, size, out=out, mode="squash")
  np.testing.assert_array_equal(out, expected)
  if shape[0] == shape[1]:
    np.testing.assert_array_equal(augment.resize(image, size, mode="pad"), expected)


# ------------------------------------------------- the one reading path: pipelines, Predictor, config


SLICE_SHAPE = (20, 40)
SIZE = 40  # the model input: the 20x40 slices' rows 10..29, unscaled, between 10 zero rows above and below


def _oblong_slice(seed: int) -> np.ndarray:
  return ((np.arange(20 * 40).reshape(SLICE_SHAPE) * 7 + 31 * seed) % 250 + 1).astype(np.uint8)


def _padded(image: np.ndarray) -> np.ndarray:
  return np.pad(image, ((10, 10), (0, 0)))


def _collection(root):
  """train/validation x covid/non-covid, one scan each of 3 lossless 20x40 PNG slices; returns {scan_id:
  slices}."""
  slices, seed = {}, 0
  for split in ("train", "validation"):
    for label in ("covid", "non-covid"):
      scan_id = f"{split}_{label}"
      folder = root / split / label / scan_id
      folder.mkdir(parents=True)
      slices[scan_id] = [_oblong_slice(seed + i) for i in range(3)]
      seed += 3
      for i, image in enumerate(slices[scan_id]):
        cv2.imwrite(str(folder / f"{i}.png"), image)
  return slices


def _config(root, resize: str | None):
  config = tiny_config()
  config.data.root = str(root)
  config.data.image_size = SIZE
  config.eval.batch_size = 4
  if resize is not None:
    config.data.resize = resize
  return config


@pytest.fixture(scope="module")
def oblong_collection(tmp_path_factory):
  root = tmp_path_factory.mktemp("oblong")
  return root, _collection(root)


@pytest.mark.parametrize("resize", ["pad", "squash"])
def test_train_and_eval_pipelines_follow_config_data_resize(tmp_path, oblong_collection, resize):
  root, slices = oblong_collection
  config = _config(root, resize)
  train_source, validation_source = sources.data_sources(config, tmp_path)  # what train.py reads through
  expected_of = (_padded if resize == "pad" else
                 lambda image: cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))
  train_expected = {expected_of(image).tobytes() for scan_id, scan in slices.items() if "train" in scan_id
                    for image in scan}
  seen = set()
  for batch in data.train_pipeline(train_source, image_size=SIZE, batch_size=2, augment=False, num_epochs=1,
                                   shard_by_process=False):
    for image in batch["image"]:
      np.testing.assert_array_equal(image[..., 0], image[..., 2])
      assert image[..., 0].tobytes() in train_expected
      seen.add(image[..., 0].tobytes())
  assert seen == train_expected
  checked = 0
  for batch in data.eval_pipeline(validation_source, image_size=SIZE, batch_size=4):
    for image, scan_index, slice_index, mask in zip(batch["image"], batch["scan_index"], batch["slice_index"],
                                                    batch["mask"]):
      if mask:
        scan_id = validation_source.scans[scan_index].scan_id
        np.testing.assert_array_equal(image[..., 0], expected_of(slices[scan_id][slice_index]))
        checked += 1
  assert checked == 6


def _recording_predictor(monkeypatch, config):
  """A Predictor whose compiled model is replaced by a recorder of the uint8 RGB batches fed to it."""
  fed = []

  def fake_eval_step(variables, images):
    fed.append(np.asarray(images))
    return np.zeros(len(images), np.float32)

  monkeypatch.setattr(train, "compile_eval_step", lambda model, mesh, tta="none": fake_eval_step)
  return predict.Predictor(None, {}, config), fed


@pytest.mark.parametrize("resize", ["pad", "squash", None])
def test_predictor_feeds_the_model_the_resize_of_the_runs_config(monkeypatch, oblong_collection, resize):
  root, slices = oblong_collection
  predictor, fed = _recording_predictor(monkeypatch, _config(root, resize))
  scan_id = "validation_covid"
  prediction = predictor.predict(root / "validation" / "covid" / scan_id)
  assert len(prediction.slice_probs) == 3
  images = np.concatenate(fed)[:3]
  for image, original in zip(images, slices[scan_id]):
    if resize == "pad":
      expected = _padded(original)
    else:  # squash, also for a run's config from before the field existed
      expected = cv2.resize(original, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(image[..., 0], expected)


def test_predictor_model_inputs_of_raw_slices_follow_resize(monkeypatch, oblong_collection):
  root, slices = oblong_collection
  predictor, _ = _recording_predictor(monkeypatch, _config(root, "pad"))
  images = predictor.model_inputs(slices["validation_covid"])
  np.testing.assert_array_equal(images[0, ..., 0], _padded(slices["validation_covid"][0]))


@pytest.mark.parametrize("resize", ["pad", "squash"])
def test_explain_maps_lie_over_the_slice_not_the_padding(monkeypatch, oblong_collection, resize):
  """explain's maps are computed on the model input; with "pad" they are cut to the box the slice fills before
  they are laid over the slice. A map equal to the input image must then come back as the slice itself."""
  root, _ = oblong_collection
  predictor, _ = _recording_predictor(monkeypatch, _config(root, resize))
  fake_cam = lambda variables, images: {"cam": np.asarray(images[..., 0], np.float32),
                                        "prob": np.zeros(len(images), np.float32)}
  predictor.__dict__["_explain_fns"] = {("cam", None): fake_cam}
  flat = np.full((24, 40), 200, np.uint8)  # oblong: "pad" puts 0s above and below it in the input
  maps, _ = explain.activation_maps(predictor, [flat, flat], method="cam")
  assert maps.shape == (2, 24, 40)
  # (squash stretches the slice over the whole input; pad without the cut would put its zero rows on the slice)
  np.testing.assert_allclose(maps, 200.0, rtol=1e-5)


def test_feature_cache_views_follow_the_resize_mode():
  image = _oblong_slice(3)
  kwargs = dict(image_size=SIZE, seed=0, view=0, scan_index=0, slice_index=0, augment=False)
  np.testing.assert_array_equal(feature_cache.view_image(image, resize="pad", **kwargs), _padded(image))
  np.testing.assert_array_equal(feature_cache.view_image(image, **kwargs),
                                cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))


def test_prepared_data_refuses_pad(tmp_path):
  config = _config(tmp_path, "pad")
  config.data.prepared_dir = str(tmp_path / "prepared")
  with pytest.raises(ValueError, match="prepared.*config.data.resize='pad'"):
    sources.data_sources(config, tmp_path)


def test_lung_crop_then_pad_on_the_real_nifti(shared_data):
  """The box is squared where the slice allows; the NIfTI's 167-row slices cannot square a 212-column box, so
  "pad" pads that crop (and "squash" would stretch it)."""
  path = shared_data / "chest_ct_nifti" / "chest_ct.nii.gz"
  read = data.read_scan_slices(path, data.ReadOptions(lung_crop=True, resize="pad"))
  crop_shape = read.slices[0].shape
  assert crop_shape[0] < crop_shape[1], crop_shape  # still oblong after squaring
  y0, x0, y1, x1 = augment.content_box(crop_shape, 64, "pad")
  assert (x0, x1) == (0, 64) and 0 < y0 and y1 < 64
  inputs = read.model_inputs(64)
  assert not inputs[:, :y0].any() and not inputs[:, y1:].any()
  middle = len(read.slices) // 2
  expected = cv2.resize(read.slices[middle], (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
  np.testing.assert_array_equal(inputs[middle, y0:y1], expected)
