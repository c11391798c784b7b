"""grain pipelines: epochs, shuffling, resume, per-process shards, eval padding, bad slices."""

import re
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from data_fixtures import numbered_slices, small_collection, write_image_scan

from resdense_jax import data
from resdense_jax.data import pipeline


@pytest.fixture(autouse=True)
def bad_slices(monkeypatch):
  """A fresh process-wide bad-slice counter for each test of this file.

  `pipeline.BAD_SLICES` lives for the whole process and its summary names only the first 10
  paths, so a test that read other bad slices first could push this file's paths out of it;
  and this file's tests must not leave theirs behind for others.
  """
  counter = pipeline.BadSlices()
  monkeypatch.setattr(pipeline, "BAD_SLICES", counter)
  return counter


class TaggedSlices:
  """A slice source whose pixels say which (scan, slice) they are: [0, 0] scan, [0, 1] slice."""

  def __init__(self, num_slices, size=8, bad=()):
    self.num_slices = np.asarray(num_slices)
    self.scans = [data.ScanRef(f"s{i}", Path(f"/fake/s{i}"), i % 2, "train")
                  for i in range(len(num_slices))]
    self.size, self.bad = size, set(bad)

  def load(self, scan_index, slice_index):
    if (scan_index, slice_index) in self.bad or "all" in self.bad:
      raise data.SliceError(Path(f"/fake/s{scan_index}/{slice_index}.jpg"), "corrupt")
    image = np.zeros((self.size, self.size), np.uint8)
    image[0, 0], image[0, 1] = scan_index, slice_index
    return image


def _tags(batch):
  return [(int(im[0, 0, 0]), int(im[0, 1, 0])) for im in batch["image"]]


def _epoch_tags(ds, steps):
  it = iter(ds)
  return [t for _ in range(steps) for t in _tags(next(it))]


def test_train_batches_shapes_and_types(tmp_path_factory):
  refs = data.discover(small_collection(tmp_path_factory)).train
  batch = next(iter(data.train_pipeline(refs, image_size=48, batch_size=8, seed=0)))
  assert batch["image"].shape == (8, 48, 48, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert np.array_equal(batch["image"][..., 0], batch["image"][..., 2])
  assert set(batch["label"].tolist()) <= {0, 1}


def test_epoch_covers_every_slice_once_and_reshuffles():
  source = TaggedSlices([5, 7, 4, 6])
  steps = data.steps_per_epoch(source, batch_size=2)
  assert steps == 11
  ds = data.train_pipeline(source, image_size=8, batch_size=2, seed=1, augment=False)
  tags = _epoch_tags(ds, 2 * steps)
  everything = sorted((s, i) for s, n in enumerate(source.num_slices) for i in range(n))
  assert sorted(tags[: 2 * steps]) == everything and sorted(tags[2 * steps:]) == everything
  assert tags[: 2 * steps] != tags[2 * steps:]  # A new permutation each epoch.
  assert tags[:6] != everything[:6]  # Shuffled, not file order.
  labels = next(iter(ds))["label"]
  assert list(labels) == [s % 2 for s, _ in _tags(next(iter(ds)))]


def test_num_epochs_ends_after_steps_per_epoch():
  source = TaggedSlices([5, 6])
  ds = data.train_pipeline(source, image_size=8, batch_size=4, seed=0, num_epochs=1, augment=False)
  assert sum(1 for _ in ds) == data.steps_per_epoch(source, 4) == 2


def test_same_seed_same_batches_other_seed_differs(tmp_path_factory):
  refs = data.discover(small_collection(tmp_path_factory)).train
  first = [next(iter(data.train_pipeline(refs, image_size=32, batch_size=8, seed=s))) for s in (5, 5, 6)]
  np.testing.assert_array_equal(first[0]["image"], first[1]["image"])
  assert not np.array_equal(first[0]["image"], first[2]["image"])


def test_resumed_iterator_continues_exactly(tmp_path_factory):
  refs = data.discover(small_collection(tmp_path_factory)).train
  ds = data.train_pipeline(refs, image_size=32, batch_size=4, seed=2)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = iter(data.train_pipeline(refs, image_size=32, batch_size=4, seed=2))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_resume_with_worker_processes(tmp_path_factory):
  source = TaggedSlices([9, 8, 7])
  make = lambda: data.train_pipeline(source, image_size=8, batch_size=4, seed=3, augment=False,
                                     num_workers=2)
  it = iter(make())
  head = [_tags(next(it)) for _ in range(3)]
  state = it.get_state()
  expected = [_tags(next(it)) for _ in range(6)]  # Crosses into the second epoch.
  it.close()
  resumed = iter(make())
  resumed.set_state(state)
  assert [_tags(next(resumed)) for _ in range(6)] == expected
  resumed.close()
  assert head != expected[:3]


@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_disjoint_and_cover_each_epoch(count):
  source = TaggedSlices([7, 5, 9, 4])  # 25 slices.
  per_process = (25 // count) // (6 // count)
  shards = []
  for index in range(count):
    ds = data.train_pipeline(source, image_size=8, batch_size=6, seed=4, augment=False,
                             shard_options=grain.sharding.ShardOptions(index, count))
    shards.append(_epoch_tags(ds, 2 * per_process))
  for epoch in range(2):
    parts = [set(s[epoch * len(s) // 2:(epoch + 1) * len(s) // 2]) for s in shards]
    assert all(len(p) == per_process * (6 // count) for p in parts)
    for a in range(count):
      for b in range(a + 1, count):
        assert not parts[a] & parts[b]
    union = set().union(*parts)
    assert len(union) == count * per_process * (6 // count) >= 25 - count - 2


def test_middle_fraction_keeps_the_centre_of_each_scan():
  rows = data.select_slices(np.array([10, 3]), middle_fraction=0.5)
  assert rows.tolist() == [[0, 2], [0, 3], [0, 4], [0, 5], [0, 6], [1, 0], [1, 1]]
  source = TaggedSlices([10, 3])
  assert data.steps_per_epoch(source, 2, middle_fraction=0.5) == 3
  ds = data.train_pipeline(source, image_size=8, batch_size=2, augment=False, middle_fraction=0.5)
  tags = _epoch_tags(ds, 3)  # 6 of the 7 kept slices: the remainder of an epoch is dropped.
  assert len(set(tags)) == 6 and set(tags) <= {tuple(r) for r in rows.tolist()}


def test_eval_in_order_padded_and_masked():
  source = TaggedSlices([3, 4])
  batches = list(data.eval_pipeline(source, image_size=8, batch_size=3))
  assert len(batches) == data.eval_steps(source, 3) == 3
  scan = np.concatenate([b["scan_index"] for b in batches])
  slice_ = np.concatenate([b["slice_index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [True] * 7 + [False] * 2
  assert list(zip(scan[:7], slice_[:7])) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
  assert [t for b in batches for t in _tags(b)][:7] == list(zip(scan[:7], slice_[:7]))
  assert batches[0]["label"].dtype == np.int32 and batches[0]["image"].shape == (3, 8, 8, 3)


def test_bad_slices_are_skipped_in_training_and_masked_in_eval(bad_slices):
  source = TaggedSlices([4, 4], bad={(1, 2)})
  with pytest.warns(data.DataWarning, match=re.escape("/fake/s1/2.jpg")):
    tags = _epoch_tags(data.train_pipeline(source, image_size=8, batch_size=7, seed=0,
                                           augment=False, num_epochs=1, read_threads=1), 1)
  assert sorted(tags) == sorted((s, i) for s in range(2) for i in range(4) if (s, i) != (1, 2))
  # One epoch reads each of the 8 slices once: 7 good, 1 bad.
  assert data.bad_slice_summary() == "1 bad slice reads in 1 files (7 good): /fake/s1/2.jpg"
  with pytest.warns(data.DataWarning):
    batch = next(iter(data.eval_pipeline(source, image_size=8, batch_size=8)))
  assert batch["mask"].tolist() == [True] * 6 + [False] + [True]
  assert dict(bad_slices.paths) == {"/fake/s1/2.jpg": 2}  # Counted again, named once.
  assert data.bad_slice_summary().startswith("2 bad slice reads in 1 files")


def test_bad_slice_summary_counts_all_and_names_the_first_ten(bad_slices):
  assert data.bad_slice_summary() == "no bad slices (0 read)"
  bad_slices.ok(5)
  for i in range(12):
    bad_slices.bad(data.SliceError(Path(f"/fake/s{i}/0.jpg"), "corrupt"), quiet=True)
  bad_slices.bad(data.SliceError(Path("/fake/s0/0.jpg"), "corrupt"), quiet=True)
  named = ", ".join(f"/fake/s{i}/0.jpg" for i in range(10))
  assert data.bad_slice_summary() == f"13 bad slice reads in 12 files (5 good): {named}"


def test_all_broken_data_stops_instead_of_spinning():
  source = TaggedSlices([200, 200], bad={"all"})
  with pytest.warns(data.DataWarning), pytest.raises(Exception, match="more than half"):
    next(iter(data.train_pipeline(source, image_size=8, batch_size=4, read_threads=1)))


def test_too_few_slices_for_one_batch_is_an_error():
  with pytest.raises(data.ScanError, match="no full batch"):
    data.train_pipeline(TaggedSlices([2, 1]), image_size=8, batch_size=4)


def test_raw_folders_decode_resize_and_label(tmp_path):
  for label, name in ((1, "covid"), (0, "non-covid")):
    write_image_scan(tmp_path / name / f"scan_{label}", numbered_slices(4, size=16))
  refs = [data.ScanRef(f"scan_{l}", tmp_path / n / f"scan_{l}", l, "train")
          for l, n in ((1, "covid"), (0, "non-covid"))]
  batches = list(data.eval_pipeline(refs, image_size=8, batch_size=8))
  assert len(batches) == 1
  b = batches[0]
  assert b["image"].shape == (8, 8, 8, 3) and b["label"].tolist() == [1] * 4 + [0] * 4
  assert [int(round(im.mean())) for im in b["image"][:4]] == [10, 30, 50, 70]


def test_to_global_batch_on_a_data_mesh():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = {"image": np.zeros((4, 8, 8, 3), np.uint8), "label": np.arange(4, dtype=np.int32)}
  out = data.to_global_batch(batch, sharding)
  assert isinstance(out["label"], jax.Array) and out["label"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  assert out["image"].shape == (4 * jax.process_count(), 8, 8, 3)


def test_resume_is_exact_where_bad_slices_shift_the_batches():
  source = TaggedSlices([9, 8, 7], bad={(0, 3), (1, 5), (2, 0)})
  make = lambda: data.train_pipeline(source, image_size=8, batch_size=4, seed=5, augment=False,
                                     read_threads=2)
  with pytest.warns(data.DataWarning):
    it = iter(make())
    for _ in range(3):
      next(it)
    state = it.get_state()
    expected = [_tags(next(it)) for _ in range(9)]  # Crosses two epoch boundaries.
    resumed = iter(make())
    resumed.set_state(state)
    assert [_tags(next(resumed)) for _ in range(9)] == expected
  bad = {(0, 3), (1, 5), (2, 0)}
  assert all(len(tags) == 4 and not set(tags) & bad for tags in expected)
  per_epoch = 24 - 3  # The good slices of an epoch, each exactly once.
  stream = [t for tags in expected for t in tags]
  start = 3 * 4 % per_epoch
  assert sorted(stream[per_epoch - start:2 * per_epoch - start]) == sorted(
      (s, i) for s, n in enumerate(source.num_slices) for i in range(n) if (s, i) not in bad)


def test_augmented_batches_flip_like_keras_and_rotate_with_fill():
  source = TaggedSlices([16, 16], size=16)
  plain = _train_images(source, augment=False)
  flipped = _train_images(source, rotation_factor=0.0)
  mirrored = [np.array_equal(a, p[:, ::-1]) for a, p in zip(flipped, plain)]
  unchanged = [np.array_equal(a, p) for a, p in zip(flipped, plain)]
  assert all(m or u for m, u in zip(mirrored, unchanged))
  assert 4 < sum(mirrored) < 28  # Each slice mirrored with probability 1/2.
  bright = TaggedSlices([16, 16], size=16)
  bright.load = lambda scan, slice_: np.full((16, 16), 200, np.uint8)
  rotated = _train_images(bright, rotation_factor=0.2)
  corners = rotated[:, [0, 0, -1, -1], [0, -1, 0, -1]]
  assert rotated[:, 8, 8].min() == 200 and (corners == 0).mean() > 0.3  # Filled with 0.


def _train_images(source, **kwargs):
  ds = data.train_pipeline(source, image_size=16, batch_size=8, seed=7, num_epochs=1, **kwargs)
  return np.concatenate([batch["image"][..., 0] for batch in ds])


def test_single_warp_flip_and_rotate_matches_flip_then_rotate():
  from resdense_jax.data import augment
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 40), dtype=np.uint8)
  for angle in (0.4, -1.0):
    reference = augment.rotate(np.ascontiguousarray(image[:, ::-1]), angle).astype(int)
    out = np.empty_like(image)
    ours = augment.flip_and_rotate(image, True, angle, out=out)
    assert ours is out and np.abs(ours.astype(int) - reference).max() <= 1
    assert np.mean(ours != reference) < 0.01
  batch = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
  rgb = augment.grey_to_rgb(batch)
  assert rgb.shape == (3, 5, 4, 3) and all(np.array_equal(rgb[..., c], batch) for c in range(3))
