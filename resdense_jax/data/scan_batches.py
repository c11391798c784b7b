"""Training batches by scan (issue 13, config.model.scan_head != "mean"): B scans x K slices a step.

Each epoch is one permutation of the training scans from (seed, epoch), cut into global batches of
`batch_size` scans; process p takes block p of each (as the slice pipeline does), so a global batch is the
same whatever the number of processes. From each scan K slices are taken in order: a stride drawn in
[1, s_max] (s_max the largest that fits, or config.data.slice_stride if smaller) and a start drawn so that the K
slices fit; a scan with fewer than K slices gives all its slices in order, some repeated (drawn). Only the
middle fraction of each scan (config.data.middle_fraction) is drawn from. Every slice is resized and augmented
on its own (flip and rotation drawn per slice). The draws of a batch come from grain's per-batch generator for
the whole global batch, so the iterator's state (grain's own, checkpointed with the run) resumes exactly.

    {"image": uint8 [B, K, S, S, 3], "label": int32 [B]}
"""

from __future__ import annotations

from pathlib import Path

import os

import cv2
import grain
import numpy as np
from absl import flags

from resdense_jax.data import augment
from resdense_jax.data.pipeline import BAD_SLICES, as_slice_source, model_slice, select_slices
from resdense_jax.data.scans import ScanError, SliceError

_CV2_SINGLE_THREADED_IN = None  # pid of the process where OpenCV was made single-threaded


def _single_threaded_cv2() -> None:
  """One OpenCV thread per grain thread or worker (as the slice pipeline does)."""
  global _CV2_SINGLE_THREADED_IN
  if _CV2_SINGLE_THREADED_IN != os.getpid():
    cv2.setNumThreads(1)
    _CV2_SINGLE_THREADED_IN = os.getpid()


def _scan_labels(source) -> np.ndarray:
  unlabelled = [ref for ref in source.scans if ref.label is None]
  if unlabelled:
    raise ScanError(unlabelled[0].path, f"training scan without a label ({len(unlabelled)} unlabelled scans)")
  return np.asarray([ref.label for ref in source.scans], np.int32)


def slice_window(count: int, slices_per_scan: int, rng: np.random.Generator, max_stride: int = 0) -> np.ndarray:
  """K indices into a scan of `count` slices, in order: a random stride (at most `max_stride` when > 0) and a
  random start so that all K fit; fewer than K slices: all of them, in order, with drawn repeats."""
  k = int(slices_per_scan)
  if count < 1 or k < 1:
    raise ValueError(f"slice_window needs count >= 1 and slices_per_scan >= 1, got {count}, {k}")
  if count < k:
    extra = rng.integers(0, count, k - count)
    return np.sort(np.concatenate([np.arange(count), extra])).astype(np.int64)
  largest = (count - 1) // (k - 1) if k > 1 else 1
  if max_stride > 0:
    largest = min(largest, int(max_stride))
  stride = int(rng.integers(1, largest + 1))
  start = int(rng.integers(0, count - (k - 1) * stride))
  return start + stride * np.arange(k, dtype=np.int64)


def scan_ranges(source, middle_fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(scan index, first slice, slice count) of every scan with at least one slice in its middle fraction."""
  rows = select_slices(source.num_slices, middle_fraction)
  scans, first, counts = np.unique(rows[:, 0], return_index=True, return_counts=True)
  return scans.astype(np.int64), rows[first, 1].astype(np.int64), counts.astype(np.int64)


def steps_per_epoch(source, batch_size: int, middle_fraction: float = 1.0) -> int:
  """Full global batches of `batch_size` scans per epoch."""
  scans, _, _ = scan_ranges(as_slice_source(source), middle_fraction)
  return len(scans) // int(batch_size)


class _ScanEpochs(grain.MapDataset):
  """Element i: the scan positions (into scan_ranges) of global batch i, epoch after epoch."""

  def __init__(self, num_scans: int, batch_size: int, seed: int):
    super().__init__()
    self._num_scans, self._batch_size, self._seed = num_scans, batch_size, seed
    self._per_epoch = num_scans // batch_size

  def __len__(self) -> int:
    return 2 ** 62

  def __str__(self) -> str:
    return f"_ScanEpochs(scans={self._num_scans}, batch_size={self._batch_size})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, within = divmod(int(index), self._per_epoch)
    order = np.random.default_rng([self._seed & 0xFFFFFFFFFFFFFFFF, 13, epoch]).permutation(self._num_scans)
    return order[within * self._batch_size:(within + 1) * self._batch_size]


class _ScanBatch(grain.transforms.RandomMap):
  """Global batch positions -> this process's block of scans, K slices each, read and augmented."""

  def __init__(self, source, ranges, labels, *, slices_per_scan: int, max_stride: int, image_size: int,
               augment_: bool, rotation_factor: float, shard_index: int, shard_count: int):
    self.source, self.ranges, self.labels = source, ranges, labels
    self.k, self.max_stride, self.image_size = slices_per_scan, max_stride, image_size
    self.augment, self.rotation_factor = augment_, rotation_factor
    self.shard_index, self.shard_count = shard_index, shard_count

  def random_map(self, positions, rng: np.random.Generator):
    _single_threaded_cv2()
    scans, first, counts = self.ranges
    # Drawn for the whole global batch, then this process's block: independent of the number of processes.
    windows = [first[p] + slice_window(int(counts[p]), self.k, rng, self.max_stride) for p in positions]
    flips, angles = augment.draw_flips_and_angles(rng, len(positions) * self.k, self.rotation_factor)
    share = len(positions) // self.shard_count
    block = range(self.shard_index * share, (self.shard_index + 1) * share)
    size = self.image_size
    grey = np.zeros((share, self.k, size, size), np.uint8)
    for row, b in enumerate(block):
      scan_index = int(scans[positions[b]])
      for j, slice_index in enumerate(windows[b].tolist()):
        out = grey[row, j]
        try:
          image = model_slice(self.source, scan_index, slice_index, size, out=None if self.augment else out)
        except SliceError as error:  # left black (air); counted and named once
          BAD_SLICES.bad(error)
          continue
        if self.augment:
          augment.flip_and_rotate(image, flips[b * self.k + j], angles[b * self.k + j], out=out)
    BAD_SLICES.ok(share * self.k)
    labels = np.asarray([self.labels[int(scans[positions[b]])] for b in block], np.int32)
    return {"image": grey, "label": labels}


class _GreyToRgb(grain.transforms.Map):

  def map(self, batch):
    return {**batch, "image": augment.grey_to_rgb(batch["image"])}


def scan_train_pipeline(source, *, image_size: int, batch_size: int, slices_per_scan: int, seed: int = 0,
                        max_stride: int = 0, augment: bool = True, rotation_factor: float = 0.2,
                        middle_fraction: float = 1.0, num_workers: int = 0, shard_options=None,
                        read_threads: int = 8) -> grain.IterDataset:
  """Endless training batches of `batch_size` (global) scans x `slices_per_scan` slices (module docstring)."""
  source = as_slice_source(source)
  labels = _scan_labels(source)
  ranges = scan_ranges(source, middle_fraction)
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if batch_size % shard_options.shard_count:
    raise ValueError(f"batch_size {batch_size} (scans) is not divisible by the {shard_options.shard_count} "
                     "processes")
  if len(ranges[0]) < batch_size:
    raise ScanError(Path(getattr(source, "root", ".")),
                    f"only {len(ranges[0])} training scans for batches of {batch_size} scans")
  ds = _ScanEpochs(len(ranges[0]), batch_size, seed)
  ds = ds.random_map(_ScanBatch(source, ranges, labels, slices_per_scan=int(slices_per_scan),
                                max_stride=int(max_stride), image_size=image_size, augment_=augment,
                                rotation_factor=rotation_factor, shard_index=shard_options.shard_index,
                                shard_count=shard_options.shard_count), seed=(seed + 7) % 2 ** 32)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(2, 2 * read_threads)))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (unparsed outside absl.app)
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds.map(_GreyToRgb())
