"""Lung-region crop (data/lungs.py): boxes on phantoms with known lungs, synthetic chests and the real series, the
fallback, lungless slices dropped, one box per scan, and the crop reaching the model input everywhere."""

import pickle
import re

import cv2
import numpy as np
import pytest
from data_fixtures import REAL_DICOM, REAL_NIFTI, needs_real_dicom, needs_real_nifti

import demo_configs
from resdense_jax import data, evaluate, predict
from resdense_jax.data import augment, lungs, sources, synthetic

N, SIZE, LUNGLESS = 9, 64, 2  # slices, side, lungless slices at each end of a phantom


def _hu_to_uint8(hu):
  return data.window_to_uint8(np.asarray(hu, np.float32))


def phantom(n=N, size=SIZE, lungless=LUNGLESS, lungs_at=(0.3, 0.7), seed=0):
  """uint8 lung-window slices of a chest phantom: air around a body (with a table under it), two lungs on all
  but the `lungless` slices at each end, a small trachea everywhere and bowel gas on the lowest slice.
  Returns (slices [n, size, size], lung mask [n, size, size])."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:size, :size] / size
  body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1
  slices, masks = [], []
  for i in range(n):
    hu = np.where(body, 40.0, -1000.0)
    hu[(y > 0.83) & (y < 0.86) & (x > 0.1) & (x < 0.9)] = 150.0  # table: not air
    lung = np.zeros_like(body)
    if lungless <= i < n - lungless:
      grow = 0.8 + 0.2 * np.sin(np.pi * (i - lungless + 1) / (n - 2 * lungless + 1))
      for cx in lungs_at:
        lung |= ((x - cx) / (0.12 * grow)) ** 2 + ((y - 0.5) / (0.2 * grow)) ** 2 < 1
    hu[lung] = -850.0
    for cx in lungs_at if lung.any() else ():  # vessels: single bright pixels inside, which the closing fills
      hu[int(0.45 * size), int(cx * size)] = hu[int(0.55 * size), int(cx * size) + 2] = 40.0
    hu[(x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.03 ** 2] = -1000.0  # trachea
    if i == 0:  # bowel gas below the lungs: a slice's largest air inside the body, small beside the lungs in 3-D
      hu[(x - 0.5) ** 2 + (y - 0.68) ** 2 < 0.085 ** 2] = -1000.0
    hu += rng.normal(0, 15, hu.shape)
    slices.append(_hu_to_uint8(hu))
    masks.append(lung)
  return np.stack(slices), np.stack(masks)


def _truth_box(masks):
  """(top, left, bottom, right) fractions of the lungs' union bounding box."""
  union = masks.any(axis=0)
  rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
  h, w = union.shape
  return rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w


def _write_pngs(slices, folder):
  folder.mkdir(parents=True)
  for i, image in enumerate(slices):
    cv2.imwrite(str(folder / f"{i}.png"), image)
  return folder


@pytest.fixture(scope="module")
def phantom_scans(tmp_path_factory):
  """The phantom as a PNG folder (intensity threshold) and as a DICOM series (Hounsfield threshold)."""
  root = tmp_path_factory.mktemp("lungs")
  slices, masks = phantom()
  png = _write_pngs(slices, root / "png_scan")
  synthetic.write_dicom_series(data.Scan(slices=slices, scan_id="dicom_scan"), root / "dicom_scan")
  return {"png": png, "dicom": root / "dicom_scan"}, slices, masks


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_phantom_box_is_the_union_of_its_lungs(phantom_scans, kind):
  paths, _, masks = phantom_scans
  got = data.read_scan_slices(paths[kind], data.ReadOptions(lung_crop=True, lung_crop_margin=0.0)).box
  assert got.found
  assert (got.top, got.left, got.bottom, got.right) == pytest.approx(_truth_box(masks), abs=1e-9)
  assert got.lung == tuple(masks.any(axis=(1, 2)))  # the trachea and bowel gas are no lung


def test_lung_masks_are_closed_over_vessels():
  slices, masks = phantom()
  found = lungs.lung_masks(np.stack([lungs.thumbnail(s) for s in slices]), lungs.air_threshold(slices))
  np.testing.assert_array_equal(found, masks)  # the vessel pixels inside the lungs are lung


def test_hounsfield_threshold_where_the_scan_has_hu_otsu_on_images(phantom_scans, monkeypatch):
  paths, slices, _ = phantom_scans
  volume = np.stack([lungs.thumbnail(s) for s in slices])
  assert lungs.air_threshold(volume, data.DEFAULT_WINDOW) == _hu_to_uint8(lungs.HU_THRESHOLD) == 162
  assert lungs.air_threshold(volume, (40.0, 400.0)) == 1  # a mediastinal window: air and lung both black
  assert _hu_to_uint8(-850) < lungs.air_threshold(volume) < _hu_to_uint8(40)  # Otsu, between lung and tissue
  windows = []
  find = lungs.find_lung_box
  monkeypatch.setattr(lungs, "find_lung_box", lambda *a, **k: windows.append(k["window"]) or find(*a, **k))
  for kind in ("dicom", "png"):
    data.read_scan_slices(paths[kind], data.ReadOptions(lung_crop=True, lung_crop_margin=0.01))
  assert windows == [data.DEFAULT_WINDOW, None]


def test_margin_widens_and_the_crop_is_square_inside_the_slice():
  box = lungs.LungBox(0.25, 0.1, 0.5, 0.9, (True,), True)  # rows 16..32, columns 6..58 of a 64 x 64 slice
  assert box.pixels((64, 64)) == (0, 6, 52, 58)  # rows grown to 52 about their centre (-2..50), shifted inside
  assert lungs.LungBox(0.4, 0.1, 0.6, 0.9, (True,), True).pixels((64, 64)) == (6, 6, 58, 58)
  slices, masks = phantom()
  found = lungs.find_lung_box([lungs.thumbnail(s) for s in slices], margin=0.05)
  top, left, bottom, right = _truth_box(masks)
  assert (found.top, found.left, found.bottom, found.right) == pytest.approx(
      (top - 0.05, left - 0.05, bottom + 0.05, right + 0.05), abs=1e-9)
  image = np.arange(100 * 60, dtype=np.int32).reshape(100, 60)
  cropped = lungs.crop(image, lungs.LungBox(0.1, 0.0, 0.3, 1.0, (True,), True))
  assert cropped.shape == (60, 60) and cropped[0, 0] == image[0, 0]  # squared, shifted to stay inside


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_chest_box_holds_its_opacities(seed):
  scan, opacity = synthetic.synthetic_scan(seed, covid=True, num_slices=10, slice_size=64)
  assert opacity.any()
  read = data.read_scan_slices(scan, data.ReadOptions(lung_crop=True, lung_crop_margin=0.0))
  y0, x0, y1, x1 = read.box.pixels((64, 64))
  rows, cols = np.nonzero(opacity.any(axis=0))  # ground-glass opacities lie in the lungs
  assert y0 <= rows.min() and rows.max() < y1 and x0 <= cols.min() and cols.max() < x1
  assert (y1 - y0) * (x1 - x0) < 0.7 * 64 * 64  # and the box is no full slice
  assert read.slices[0].shape == (y1 - y0, x1 - x0)


@needs_real_dicom
def test_real_dicom_series_box_around_both_lungs():
  read = data.read_scan_slices(REAL_DICOM, data.ReadOptions(lung_crop=True, drop_lungless_slices=True))
  box = read.box
  # Liver dome to shoulders: the first and last slices show no lung, the middle ones do.
  first, stop = box.lung_range()
  assert 2 <= first <= 10 and 50 <= stop <= 60 and all(box.lung[first:stop])
  assert read.indices.tolist() == list(range(first, stop))
  assert 0.05 < box.left < 0.2 and 0.8 < box.right < 0.95 and 0.15 < box.top < 0.35 and 0.75 < box.bottom < 0.95
  # The crop keeps the lungs: the lung-window pixels darker than -400 HU inside the body are inside it.
  middle = data.read_scan(REAL_DICOM).slices[32]
  y0, x0, y1, x1 = box.pixels(middle.shape)
  assert (y1 - y0, x1 - x0) == read.slices[0].shape and y1 - y0 < 0.85 * 512
  lung_pixels = lungs.lung_masks(lungs.thumbnail(middle)[None], 162)[0]
  inside = np.zeros_like(lung_pixels)
  inside[y0 // 4:y1 // 4, x0 // 4:x1 // 4] = True
  assert lung_pixels.sum() > 1000 and not (lung_pixels & ~inside).any()


@needs_real_nifti
def test_real_nifti_volume_lungless_ends():
  read = data.read_scan_slices(REAL_NIFTI, data.ReadOptions(lung_crop=True, drop_lungless_slices=True))
  first, stop = read.box.lung_range()
  assert len(read.box.lung) == 191 and 5 <= first <= 25 and 160 <= stop <= 185  # abdomen and neck dropped
  assert len(read) == stop - first and read.slices[0].shape[0] <= 167


def test_no_lung_falls_back_to_the_full_slices_naming_the_scan(tmp_path):
  slices, _ = phantom(lungless=N)  # a body without lungs
  folder = _write_pngs(slices, tmp_path / "no_lungs")
  options = data.ReadOptions(lung_crop=True, drop_lungless_slices=True)
  with pytest.warns(data.DataWarning, match=re.escape(str(folder)) + ": no lung found"):
    read = data.read_scan_slices(folder, options)
  assert not read.box.found and len(read) == N and read.slices[0].shape == (SIZE, SIZE)
  source = data.RawScans([data.ScanRef("s", folder, 0, "")], options=options, progress=False)
  assert source.num_slices.tolist() == [N]
  np.testing.assert_array_equal(source.load(0, 0), slices[0])


def test_lungless_ends_dropped_only_when_asked(phantom_scans):
  paths, slices, masks = phantom_scans
  kept = list(range(LUNGLESS, N - LUNGLESS))
  for drop, want in ((True, kept), (False, list(range(N)))):
    options = data.ReadOptions(drop_lungless_slices=drop, lung_crop=True)
    read = data.read_scan_slices(paths["png"], options)
    assert read.indices.tolist() == want
    source = data.RawScans([data.ScanRef("s", paths["png"], 1, "")], options=options, progress=False)
    assert source.num_slices.tolist() == [len(want)]
    y0, x0, y1, x1 = read.box.pixels((SIZE, SIZE))
    np.testing.assert_array_equal(source.load(0, 0), slices[want[0]][y0:y1, x0:x1])
  # drop_lungless_slices alone finds the lungs but does not crop.
  read = data.read_scan_slices(paths["png"], data.ReadOptions(drop_lungless_slices=True))
  assert read.indices.tolist() == kept and read.slices[0].shape == (SIZE, SIZE)


def test_one_box_per_scan_shared_by_readers_and_sent_to_workers(tmp_path, monkeypatch):
  slices, _ = phantom(seed=3)
  folder = _write_pngs(slices, tmp_path / "once")
  calls = []
  find = lungs.find_lung_box
  monkeypatch.setattr(lungs, "find_lung_box", lambda *a, **k: calls.append(1) or find(*a, **k))
  options = data.ReadOptions(lung_crop=True)
  ref = data.ScanRef("s", folder, 1, "")
  source = data.RawScans([ref], options=options, progress=False)
  data.RawScans([ref], options=options, progress=False)
  data.read_scan_slices(ref, options)
  worker_copy = pickle.loads(pickle.dumps(source))  # what a grain worker process receives
  np.testing.assert_array_equal(worker_copy.load(0, 3), source.load(0, 3))
  assert len(calls) == 1
  data.RawScans([ref], options=data.ReadOptions(lung_crop=True, lung_crop_margin=0.1), progress=False)
  assert len(calls) == 2  # another margin, another box


def _crops(folder, size, box_options):
  """resize(crop(slice)) of every slice: what the model should see."""
  read = data.read_scan_slices(folder, box_options)
  return read, np.stack([augment.resize(s, size) for s in read.slices])


def test_crop_reaches_the_train_and_eval_batches(phantom_scans):
  paths, slices, _ = phantom_scans
  options = data.ReadOptions(lung_crop=True)
  _, want = _crops(paths["png"], 32, options)
  source = data.RawScans([data.ScanRef("s", paths["png"], 1, "")], options=options, progress=False)
  batch = next(iter(data.train_pipeline(source, image_size=32, batch_size=N, seed=0, augment=False,
                                        read_threads=1)))
  # The rows come shuffled; each training image is one of the cropped slices, and all of them are there.
  got = batch["image"][..., 0]
  order = [int(np.flatnonzero([(g == w).all() for w in want])[0]) for g in got]
  assert sorted(order) == list(range(N))
  evaluated = next(iter(data.eval_pipeline(source, image_size=32, batch_size=N)))
  np.testing.assert_array_equal(evaluated["image"][..., 0], want)
  uncropped = np.stack([augment.resize(s, 32) for s in slices])
  assert not np.array_equal(want, uncropped)


def test_crop_reaches_the_predictor_input(phantom_scans):
  paths, _, _ = phantom_scans
  config = demo_configs.tiny_config()
  config.data.lung_crop, config.data.drop_lungless_slices = True, True
  # No model is run: the step is replaced by one that records what it is fed (no weights, nothing compiled).
  predictor = predict.Predictor(None, {}, config, batch_size=8)
  fed = []
  predictor._eval_fn = lambda variables, images: fed.append(np.asarray(images)) or np.zeros(len(images))
  prediction = predictor.predict(paths["dicom"])
  kept = list(range(LUNGLESS, N - LUNGLESS))
  assert prediction.slice_indices.tolist() == kept and prediction.n_slices == len(kept)
  source = data.RawScans([data.ScanRef("s", paths["dicom"], None, "")], options=predictor.read_options,
                         progress=False)
  evaluated = next(iter(data.eval_pipeline(source, image_size=32, batch_size=len(kept))))
  np.testing.assert_array_equal(np.concatenate(fed)[:len(kept)], evaluated["image"])
  _, want = _crops(paths["dicom"], 32, predictor.read_options)
  np.testing.assert_array_equal(evaluated["image"][..., 0], want)


def test_prepared_data_refuses_the_lung_crop(tmp_path):
  config = demo_configs.tiny_config()
  config.data.prepared_dir = str(tmp_path / "prepared")
  config.data.lung_crop = True
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "prepared")) + ".*lung_crop.*raw scans"):
    sources.data_sources(config, tmp_path)


def test_training_and_evaluation_sources_read_with_the_config(tmp_path, monkeypatch):
  config = demo_configs.tiny_config()
  config.data.root = str(synthetic.write_collection(
      tmp_path / "collection", num_scans={"train": (1, 1), "validation": (1, 1), "test": 0}, slice_size=64,
      num_slices=(4, 5), seed=0, progress=False))
  config.data.lung_crop, config.data.lung_crop_margin = True, 0.02
  want = data.ReadOptions(lung_crop=True, lung_crop_margin=0.02)
  train_source, val_source = sources.data_sources(config, tmp_path)
  assert train_source.options == val_source.options == want
  assert all(box.found for box in train_source.boxes + val_source.boxes)

  class Seen(Exception):
    pass

  def seen(source, **_):
    raise Seen(source)

  monkeypatch.setattr(data, "eval_pipeline", seen)
  with pytest.raises(Seen) as caught:  # evaluate() given plain ScanRefs reads them the same way
    evaluate.evaluate(None, {}, val_source.scans, config, None)
  assert caught.value.args[0].options == want
