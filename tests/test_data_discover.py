"""Collections: COV19-CT-DB layout, lenient names, flat folders, bad trees, stratified splits."""

import re

import numpy as np
import pytest
from data_fixtures import SMALL, numbered_slices, small_collection, write_image_scan

from resdense_jax import data
from resdense_jax.data import synthetic


def _tree(root, layout):
  """layout: {"train/COVID": 3, ...} -> that many 2-slice scans in each folder."""
  for folder, count in layout.items():
    for i in range(count):
      write_image_scan(root / folder / f"scan_{folder.replace('/', '_')}_{i}", numbered_slices(2, 8))
  return root


def test_discovers_synthetic_collection(tmp_path_factory):
  root = small_collection(tmp_path_factory)
  c = data.discover(root)
  assert (len(c.train), len(c.validation), len(c.test)) == (8, 4, 2)
  assert sum(r.label for r in c.train) == SMALL["train"][0]
  assert {r.split for r in c.validation} == {"validation"}
  assert all(r.label is None and r.split == "test" for r in c.test)
  assert all(r.path.parent.name in ("covid", "non-covid") for r in c.train)
  ref = c.train[0]
  assert ref.path == root / "train" / ("covid" if ref.label else "non-covid") / ref.scan_id


@pytest.mark.parametrize("covid,noncovid", [("COVID", "Non-COVID"), ("covid", "non_covid"),
                                            ("Covid", "noncovid"), ("covid", "NON COVID")])
def test_lenient_class_folder_names(tmp_path, covid, noncovid):
  root = _tree(tmp_path, {f"train/{covid}": 2, f"train/{noncovid}": 3, f"val/{covid}": 1,
                          f"val/{noncovid}": 1})
  c = data.discover(root)
  assert sorted(r.label for r in c.train) == [0, 0, 0, 1, 1]
  assert len(c.validation) == 2


def test_missing_class_folder_names_the_split(tmp_path):
  root = _tree(tmp_path, {"train/covid": 2})
  with pytest.raises(data.ScanError, match=re.escape(str(root / "train")) + ".*missing class folder non-covid"):
    data.discover(root)


def test_empty_collection_names_the_root(tmp_path):
  (tmp_path / "nothing_here").mkdir()
  with pytest.raises(data.ScanError, match=re.escape(str(tmp_path / "nothing_here")) + ".*empty collection"):
    data.discover(tmp_path / "nothing_here")


def test_empty_scan_folder_and_stray_files_are_named_and_skipped(tmp_path):
  root = _tree(tmp_path, {"train/covid": 2, "train/non-covid": 2})
  (root / "train" / "covid" / "hollow_scan").mkdir()
  (root / "train" / "non-covid" / "README.txt").write_text("hi")
  with pytest.warns(data.DataWarning) as record:
    c = data.discover(root)
  messages = " ".join(str(w.message) for w in record)
  assert str(root / "train" / "covid" / "hollow_scan") in messages and "empty scan folder" in messages
  assert str(root / "train" / "non-covid" / "README.txt") in messages
  assert len(c.train) + len(c.validation) == 4


def test_flat_folder_of_dicom_nifti_and_image_scans(tmp_path):
  scan, _ = synthetic.synthetic_scan(1, covid=False, num_slices=3, slice_size=16)
  synthetic.write_dicom_series(scan, tmp_path / "patient_a")
  synthetic.write_nifti(scan, tmp_path / "patient_b.nii.gz")
  write_image_scan(tmp_path / "patient_c", scan.slices, suffix=".png")
  c = data.discover(tmp_path)
  assert [r.scan_id for r in c.test] == ["patient_a", "patient_b", "patient_c"]
  assert not c.train and not c.validation
  for ref in c.test:
    np.testing.assert_array_equal(data.read_scan(ref.path).slices, scan.slices)


def test_split_by_scan_is_stratified_disjoint_and_seeded(tmp_path):
  root = _tree(tmp_path, {"train/covid": 12, "train/non-covid": 8})
  a, b, other = data.discover(root, seed=3), data.discover(root, seed=3), data.discover(root, seed=4)
  assert [r.path for r in a.validation] == [r.path for r in b.validation]
  assert {r.path for r in a.validation} != {r.path for r in other.validation}
  assert not {r.path for r in a.train} & {r.path for r in a.validation}
  assert len(a.train) + len(a.validation) == 20
  assert sorted(r.label for r in a.validation) == [0, 0, 1, 1, 1]  # 0.25 of 8 and of 12.
  assert {r.split for r in a.validation} == {"validation"}
  half = data.discover(root, val_fraction=0.5, seed=0)
  assert sum(r.label == 1 for r in half.validation) == 6
