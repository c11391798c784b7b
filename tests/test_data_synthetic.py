"""Synthetic CT: layout, determinism, opacity masks and their visibility."""

import csv

import numpy as np
import pytest
from data_fixtures import small_collection

from resdense_jax import data
from resdense_jax.data import synthetic


def test_layout_masks_and_test_labels(tmp_path_factory):
  root = small_collection(tmp_path_factory)
  c = data.discover(root)
  for ref in c.train + c.validation:
    n = len(data.read_scan(ref.path).slices)
    assert 6 <= n <= 10 and sorted(p.name for p in ref.path.iterdir()) == sorted(f"{i}.jpg" for i in range(n))
    mask_file = root / "_masks" / ref.split / f"{ref.scan_id}.npz"
    assert mask_file.exists() == bool(ref.label)
    if ref.label:
      mask = synthetic.load_mask(root, ref.split, ref.scan_id)
      assert mask.shape == (n, 64, 64) and mask.dtype == bool
  with open(root / "_labels" / "test.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["scan_id"] for r in rows) == sorted(r.scan_id for r in c.test)
  assert sorted(int(r["label"]) for r in rows) == [0, 1]


def test_deterministic_from_seed():
  a, ma = synthetic.synthetic_scan(11, covid=True, num_slices=5, slice_size=48)
  b, mb = synthetic.synthetic_scan(11, covid=True, num_slices=5, slice_size=48)
  c, _ = synthetic.synthetic_scan(12, covid=True, num_slices=5, slice_size=48)
  np.testing.assert_array_equal(a.slices, b.slices)
  np.testing.assert_array_equal(ma, mb)
  assert not np.array_equal(a.slices, c.slices)


def test_collection_is_deterministic_and_refuses_to_overwrite(tmp_path):
  options = {"num_scans": {"train": (1, 1)}, "slice_size": 32, "num_slices": (3, 4), "progress": False}
  one = synthetic.write_collection(tmp_path / "a", seed=7, **options)
  two = synthetic.write_collection(tmp_path / "b", seed=7, **options)
  for ref_a, ref_b in zip(data.discover(one).train + data.discover(one).validation,
                          data.discover(two).train + data.discover(two).validation):
    np.testing.assert_array_equal(data.read_scan(ref_a.path).slices, data.read_scan(ref_b.path).slices)
  with pytest.raises(FileExistsError, match=str(one)):
    synthetic.write_collection(one, seed=7, **options)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_covid_opacities_are_visible_peripheral_and_in_the_lungs(seed):
  scan, mask = synthetic.synthetic_scan(seed, covid=True, num_slices=16, slice_size=96)
  assert mask.any(axis=(1, 2)).mean() >= 0.5  # Most slices show opacities.
  hu = data.uint8_to_hu(scan.slices)
  lungs = _lung_region(hu) | mask
  # Opacities fill lung: were they aerated, they would be lung.
  assert _lung_region(np.where(mask, -850.0, hu))[mask].mean() > 0.95
  aerated = lungs & ~mask
  # Ground glass: well above aerated lung, below soft tissue.
  assert np.median(hu[mask]) > np.median(hu[aerated]) + 250
  assert np.median(hu[mask]) < -50
  # Peripheral: opacities lie farther out from the mediastinum than aerated lung on average.
  rows, cols = np.mgrid[:96, :96]
  radius = np.hypot((rows - 47.5) * 1.3, cols - 47.5)[None].repeat(16, 0)
  assert radius[mask].mean() > radius[aerated].mean()


def _lung_region(hu):
  """Air inside the body (enclosed by tissue on all four sides): the lungs and airways."""
  body = hu > -300
  inside = np.ones_like(body)
  for axis in (1, 2):
    inside &= np.maximum.accumulate(body, axis=axis) & np.flip(
        np.maximum.accumulate(np.flip(body, axis), axis=axis), axis)
  return inside & (hu < -400)


def test_non_covid_scans_have_no_masks_and_clear_lungs():
  scan, mask = synthetic.synthetic_scan(4, covid=False, num_slices=8, slice_size=64)
  assert not mask.any()
  hu = data.uint8_to_hu(scan.slices[2:6])
  assert (hu < -700).mean() > 0.1  # Aerated lungs are a sizeable part of the mid-chest slices.
