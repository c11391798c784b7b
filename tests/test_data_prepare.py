"""Prepared data: TFDS array_record round trip, CLI, and the pipelines reading it."""

import subprocess
import sys

import numpy as np
import pytest
from data_fixtures import small_collection

from resdense_jax import data
from resdense_jax.data import augment, prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = small_collection(tmp_path_factory)
  out = tmp_path_factory.mktemp("prepared")
  data.prepare_dataset(root, out, image_size=32, encoding="png", progress=False)
  return root, out


def test_round_trip_matches_the_raw_scans(prepared):
  root, out = prepared
  collection = data.discover(root)
  for split in ("train", "validation", "test"):
    refs = collection.split(split)
    p = data.PreparedData(out, split)
    assert p.image_size == 32 and p.split == split
    assert [(r.scan_id, r.label, r.path) for r in p.scans] == [(r.scan_id, r.label, r.path) for r in refs]
    for k, ref in enumerate(refs[:3]):
      raw = data.read_scan(ref.path).slices
      assert p.num_slices[k] == len(raw)
      for i in (0, len(raw) - 1):
        np.testing.assert_array_equal(p.load(k, i), augment.resize(raw[i], 32))  # PNG: lossless.
    record = p.record(1, 2)
    assert record["scan_id"] in (refs[1].scan_id, refs[1].scan_id.encode())
    assert record["slice_index"] == 2 and record["label"] == (-1 if split == "test" else refs[1].label)
  assert len(data.PreparedData(out, "train")) == sum(
      len(data.read_scan(r.path).slices) for r in collection.train)


def test_pipelines_read_prepared_data_like_raw_folders(prepared):
  root, out = prepared
  refs = data.discover(root).validation
  source = data.PreparedData(out, "validation")
  from_raw = list(data.eval_pipeline(refs, image_size=32, batch_size=16))
  from_prepared = list(data.eval_pipeline(source, image_size=32, batch_size=16))
  assert len(from_raw) == len(from_prepared) == data.eval_steps(source, 16)
  for a, b in zip(from_raw, from_prepared):
    for key in ("image", "label", "scan_index", "slice_index", "mask"):
      np.testing.assert_array_equal(a[key], b[key])
  a = next(iter(data.train_pipeline(refs, image_size=32, batch_size=8, seed=1)))
  b = next(iter(data.train_pipeline(source, image_size=32, batch_size=8, seed=1)))
  np.testing.assert_array_equal(a["image"], b["image"])  # Same order and augmentation.
  assert data.steps_per_epoch(source, 8) == data.steps_per_epoch(refs, 8)


def test_prepared_data_pickles_for_worker_processes(prepared):
  import pickle
  _, out = prepared
  p = data.PreparedData(out, "train")
  p.load(0, 0)
  clone = pickle.loads(pickle.dumps(p))
  np.testing.assert_array_equal(clone.load(0, 1), p.load(0, 1))


def test_missing_split_and_missing_dataset_name_the_path(prepared, tmp_path):
  _, out = prepared
  with pytest.raises(data.ScanError, match="no split 'dev'"):
    data.PreparedData(out, "dev")
  with pytest.raises(data.ScanError, match=str(tmp_path)):
    data.PreparedData(tmp_path, "train")


def test_cli_writes_jpeg_dataset_and_summary(tmp_path_factory):
  root = small_collection(tmp_path_factory)
  out = tmp_path_factory.mktemp("cli")
  result = subprocess.run([sys.executable, "-m", "resdense_jax.data.prepare", f"--source={root}",
                           f"--out={out}", "--image_size=24"], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "train: " in result.stdout and "0 bad slices skipped" in result.stdout
  p = data.PreparedData(out, "train")
  assert p.image_size == 24 and p.load(0, 0).shape == (24, 24)
  raw = data.read_scan(p.scans[0].path).slices[0]
  assert np.abs(p.load(0, 0).astype(float) - augment.resize(raw, 24)).mean() < 3  # JPEG q95.


def test_manual_download_instructions_explain_access():
  text = prepare.Cov19CtDb.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert "MIA-COV19D" in text and "on request" in text and "train/covid" in text
