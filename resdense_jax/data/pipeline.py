"""grain pipelines: shuffled augmented training slices and ordered, padded evaluation batches.

A source is either a list of `ScanRef` (raw scan folders, DICOM series, NIfTI volumes) or a
`PreparedData` (TFDS array_record). Both expose the same slice interface (`SliceSource`), so
the pipelines below do not care where pixels come from.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import sys
import threading
from pathlib import Path
from typing import Sequence

import cv2
import grain
import jax
import numpy as np
from absl import flags
from tqdm import tqdm

from resdense_jax.data import augment, lungs
from resdense_jax.data.scans import (ReadOptions, ScanError, ScanRef, ScanSlices, SliceError, SliceReader,
                                     read_slices, warn)

# Threads per process decoding and augmenting batches (cv2 releases the GIL).
READ_THREADS = 8
_LOG_EVERY = 100


class BadSlices:
  """Process-local count of slices skipped because they could not be decoded."""

  def __init__(self):
    self._lock = threading.Lock()
    self.paths: collections.Counter = collections.Counter()
    self.good = 0

  def __getstate__(self):  # Worker processes start their own counts.
    return {}

  def __setstate__(self, state):
    self.__init__()

  def bad(self, error: SliceError, *, guard: bool = False, quiet: bool = False) -> None:
    """Counts (and, the first time, names) a bad slice; with `guard`, stops a pipeline whose
    reads mostly fail instead of letting it spin on broken data."""
    with self._lock:
      first = str(error.path) not in self.paths
      self.paths[str(error.path)] += 1
      total = sum(self.paths.values())
      bad_ratio = total / max(total + self.good, 1)
    if first and not quiet:
      warn(f"{error}; slice skipped ({total} bad slice reads so far)")
    if guard and total >= _LOG_EVERY and bad_ratio > 0.5:
      raise ScanError(error.path, f"more than half of the slices read so far are unreadable "
                      f"({total} bad, {self.good} good); refusing to train on broken data")

  def ok(self, count: int = 1) -> None:
    self.good += count  # Racy increments only undercount; the ratio check is a coarse guard.

  def summary(self) -> str:
    total = sum(self.paths.values())
    if not total:
      return f"no bad slices ({self.good} read)"
    listed = ", ".join(list(self.paths)[:10])
    return f"{total} bad slice reads in {len(self.paths)} files ({self.good} good): {listed}"


BAD_SLICES = BadSlices()


def bad_slice_summary() -> str:
  """What this process skipped so far (worker processes log their own warnings)."""
  return BAD_SLICES.summary()


def kept_slices(count: int, box: lungs.LungBox | None, options: ReadOptions) -> np.ndarray:
  """Slice indices the reading path keeps of a scan of `count` slices: all, or with drop_lungless_slices the
  first to the last slice showing lung (all when none does; slices in between stay)."""
  span = box.lung_range() if options.drop_lungless_slices and box is not None else None
  return np.arange(*(span or (0, count)))


def read_scan_slices(item, options: ReadOptions | None = None) -> ScanSlices:
  """The one reading path for a whole scan (Predictor, explain): the slices `RawScans.load` gives one at a time
  for the same scan and options, in order, before resizing (`ScanSlices.model_inputs` resizes them as
  `model_slice` does). Every slice decoded by `SliceReader`; unreadable ones skipped with a warning; the
  lungless ends dropped and the rest cropped to the scan's lung box where `options` say so.

  `item`: a scan path, ScanRef or data.Scan (its slices taken as they are).
  """
  options = options or ReadOptions()
  reader = SliceReader(item, window=options.window)
  slices, skipped = read_slices(reader)
  box = lungs.scan_lung_box(reader, options.lung_crop_margin, slices) if options.finds_lungs else None
  indices = [int(i) for i in kept_slices(len(reader), box, options) if i in slices]
  crop_box = box if options.lung_crop else None
  return ScanSlices(scan_id=reader.scan_id, path=reader.path, label=reader.label,
                    slices=[lungs.crop(slices[i], crop_box) for i in indices],
                    indices=np.asarray(indices, np.int64), box=box, skipped=skipped, kind=reader.scan_kind,
                    names=tuple(reader.slice_name(i) for i in indices), resize=options.resize)


class RawScans:
  """Slices of raw scans (image folders, DICOM series, NIfTI volumes, or data.Scan in memory) as a
  `SliceSource`, read by the one reading path (`data.scans.SliceReader`, `ReadOptions`).

  With `options.lung_crop` / `drop_lungless_slices` every scan's lung box is found here, once, before any
  batch (threads; `data.lungs`), so worker processes receive the boxes with the source and `num_slices` already
  counts only the slices kept. `load` then gives slice i of those kept, cropped to its scan's box.
  """

  def __init__(self, scans: Sequence, *, options: ReadOptions | None = None, progress: bool = True,
               threads: int = READ_THREADS):
    items = list(scans)
    if not items:
      raise ScanError(Path("."), "empty list of scans given to the pipeline")
    self.options = options or ReadOptions()
    self.image_size = None
    self.readers = [SliceReader(item, window=self.options.window)
                    for item in tqdm(items, desc="indexing scans", disable=not progress or len(items) < 200)]
    self.scans = [item if isinstance(item, ScanRef) else
                  ScanRef(scan_id=r.scan_id, path=Path(r.path or r.scan_id), label=r.label, split="")
                  for item, r in zip(items, self.readers)]
    self.boxes: list = [None] * len(items)
    if self.options.finds_lungs:
      with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        found = pool.map(lambda r: lungs.scan_lung_box(r, self.options.lung_crop_margin), self.readers)
        self.boxes = list(tqdm(found, total=len(items), desc="finding lungs",
                               disable=not progress or len(items) < 20))
    self._kept = [kept_slices(len(r), box, self.options) for r, box in zip(self.readers, self.boxes)]
    self.num_slices = np.asarray([len(k) for k in self._kept], np.int64)

  def load(self, scan_index: int, slice_index: int) -> np.ndarray:
    """uint8 `[h, w]`: kept slice `slice_index` of the scan, cropped to its lung box when lung_crop is on;
    raises SliceError for an unreadable slice."""
    image = self.readers[scan_index].read(int(self._kept[scan_index][slice_index]))
    return lungs.crop(image, self.boxes[scan_index]) if self.options.lung_crop else image

  def slice_position(self, scan_index: int, slice_index: int) -> int:
    """Where kept slice `slice_index` sits in its scan (differs with drop_lungless_slices)."""
    return int(self._kept[scan_index][slice_index])


def resize_mode(source) -> str:
  """How `model_slice` makes the source's slices square: its ReadOptions.resize (RawScans); "squash" for
  sources without options (PreparedData: its slices are square at the input size already, the same in both
  modes)."""
  options = getattr(source, "options", None)
  return getattr(options, "resize", "squash")


def model_slice(source, scan_index: int, slice_index: int, image_size: int, *,
                out: np.ndarray | None = None) -> np.ndarray:
  """A slice as the model sees it before augmentation: read by the source (decoded, cropped) and resized to
  `image_size` (into `out`) the source's way (`resize_mode`: squash or pad). The training and evaluation
  batches both read through here; `Predictor.predict` through `data.read_scan_slices(...).model_inputs`, which
  resizes the same slices the same way (the mode travels in `ScanSlices.resize`). explain resizes
  `read_scan_slices(...).slices` itself (`Predictor.model_inputs`) and must pass the mode too."""
  return augment.resize(source.load(scan_index, slice_index), image_size, out=out, mode=resize_mode(source))


def as_slice_source(source):
  """`list[ScanRef]` -> RawScans; PreparedData and RawScans pass through."""
  if hasattr(source, "load") and hasattr(source, "num_slices"):
    return source
  return RawScans(list(source))


def select_slices(num_slices: np.ndarray, middle_fraction: float = 1.0) -> np.ndarray:
  """(scan_index, slice_index) int32 rows, keeping the middle fraction of every scan."""
  if not 0.0 < middle_fraction <= 1.0:
    raise ValueError(f"middle_fraction must be in (0, 1], got {middle_fraction}")
  rows = []
  for scan_index, n in enumerate(np.asarray(num_slices)):
    keep = max(1, int(round(n * middle_fraction))) if n else 0
    start = (int(n) - keep) // 2
    rows.extend((scan_index, start + i) for i in range(keep))
  return np.asarray(rows, np.int32).reshape(-1, 2)


def _process_share(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} processes")
  return batch_size // process_count


def steps_per_epoch(source, batch_size: int, middle_fraction: float = 1.0) -> int:
  """Full training batches per epoch (each process sees batch_size // process_count a step)."""
  source = as_slice_source(source)
  count = len(select_slices(source.num_slices, middle_fraction))
  processes = jax.process_count()
  return (count // processes) // _process_share(batch_size, processes)


def eval_steps(source, batch_size: int, middle_fraction: float = 1.0) -> int:
  """Batches `eval_pipeline` yields (the last one padded)."""
  source = as_slice_source(source)
  count = len(select_slices(source.num_slices, middle_fraction))
  return -(-count // batch_size)


class _ShuffledBatches(grain.MapDataset):
  """Batches of (scan, slice) rows, epoch after epoch, each epoch a fresh permutation of
  `records` from `seed`; batches run on across epoch boundaries and, with `num_epochs`, the
  last one may be short (the rebatching drops it).

  The permutation is the same on every process and is cut into global batches of
  batch_size * shard_count rows; process `shard_index` takes block `shard_index` of each. So
  a global batch holds the same rows, in the same order, however many processes share it.
  One numpy permutation per epoch instead of grain's `shuffle`, whose per-record
  index_shuffle cost more than decoding the slice.

  With `scan_labels` (balanced sampling) an epoch holds as many rows as before, drawn by
  scan instead of permuted: each class gets an equal share of the rows, the scans of a class
  are visited equally often (every scan of the minority class at least once), the slice of
  each visit uniformly from its scan, and the rows are shuffled; all from (seed, epoch), so
  a restored iterator continues exactly as today's.
  """

  def __init__(self, records: np.ndarray, *, batch_size: int, seed: int, shard_index: int,
               shard_count: int, num_epochs: int | None, scan_labels: np.ndarray | None = None):
    super().__init__()
    self._records, self._batch_size, self._seed = records, batch_size, seed
    self._scans = None if scan_labels is None else _ScansByClass(records, scan_labels)
    self._shard_index, self._shard_count = shard_index, shard_count
    self._global_batch = batch_size * shard_count
    self._per_epoch = len(records) - len(records) % shard_count
    self._total = None if num_epochs is None else self._per_epoch * num_epochs
    self._length = sys.maxsize if self._total is None else -(-self._total // self._global_batch)
    self._epochs = {}  # The last few epochs' rows, by epoch.

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return (f"_ShuffledBatches(records={len(self._records)}, batch_size={self._batch_size}, "
            f"shard={self._shard_index}/{self._shard_count})")

  def _epoch_rows(self, epoch: int) -> np.ndarray:
    rows = self._epochs.get(epoch)
    if rows is None:
      rng = np.random.default_rng([self._seed & 0xFFFFFFFFFFFFFFFF, epoch])
      if self._scans is None:
        order = rng.permutation(len(self._records))
        rows = self._records[order[:self._per_epoch]]
      else:
        rows = self._scans.draw(self._per_epoch, rng)
      recent = {e: r for e, r in self._epochs.items() if e >= epoch - 2}
      self._epochs = {**recent, epoch: rows}  # Swapped whole: safe under grain's threads.
    return rows

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    start = index * self._global_batch + self._shard_index * self._batch_size
    stop = start + self._batch_size
    if self._total is not None:
      stop = min(stop, self._total)
      start = min(start, stop)
    if start == stop:
      return self._records[:0]
    parts = []
    for epoch in range(start // self._per_epoch, (stop - 1) // self._per_epoch + 1):
      offset = epoch * self._per_epoch
      parts.append(self._epoch_rows(epoch)[max(start - offset, 0):stop - offset])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _ScansByClass:
  """The training rows grouped by scan and the scans by class, for balanced sampling."""

  def __init__(self, records: np.ndarray, scan_labels: np.ndarray):
    order = np.argsort(records[:, 0], kind="stable")
    self.rows = records[order]  # Each scan's rows contiguous.
    scans, self.starts, self.counts = np.unique(self.rows[:, 0], return_index=True, return_counts=True)
    labels = np.asarray(scan_labels)[scans]
    self.classes = np.unique(labels)
    # Positions (into scans / starts / counts) of each class's scans.
    self.members = [np.flatnonzero(labels == c) for c in self.classes]

  def draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows: an equal share per class (the remainder to random classes), each class's scans visited
    in rounds (every scan once per round, in a random order), a uniform slice of the scan per visit, shuffled."""
    share = np.full(len(self.classes), count // len(self.classes))
    share[rng.permutation(len(self.classes))[:count % len(self.classes)]] += 1
    parts = []
    for members, n in zip(self.members, share):
      rounds = -(-n // len(members))
      visits = rng.permuted(np.tile(members, (rounds, 1)), axis=1).reshape(-1)[:n]
      parts.append(self.rows[self.starts[visits] + rng.integers(0, self.counts[visits])])
    rows = np.concatenate(parts)
    return rows[rng.permutation(len(rows))]


_CV2_SINGLE_THREADED_IN = None  # pid of the process where OpenCV was made single-threaded.


def _single_threaded_cv2() -> None:
  """One OpenCV thread per grain thread/worker process (parallelism comes from grain;
  OpenCV's own pool would oversubscribe the cores)."""
  global _CV2_SINGLE_THREADED_IN
  if _CV2_SINGLE_THREADED_IN != os.getpid():
    cv2.setNumThreads(1)
    _CV2_SINGLE_THREADED_IN = os.getpid()


class _TrainBatch(grain.transforms.RandomMap):
  """[k, 2] (scan, slice) rows -> {"image": uint8 grey [k', S, S], "label": int32 [k']} of
  the k' <= k rows that decode (None if none does).

  A whole batch per call: grain's per-element overhead (futures, state, stats) was larger
  than decoding and augmenting a slice. Flip and rotation are drawn for every row, bad or
  not, so a bad slice does not shift the augmentation of the others.
  """

  def __init__(self, source, labels: np.ndarray, image_size: int, augment_: bool,
               rotation_factor: float, shard_index: int = 0, shard_count: int = 1):
    self.source, self.labels = source, labels
    self.shard_index, self.shard_count = shard_index, shard_count
    self.image_size, self.augment, self.rotation_factor = image_size, augment_, rotation_factor
    self.counts = BadSlices()  # This pipeline's own, for the broken-data guard.

  def random_map(self, rows, rng: np.random.Generator):
    _single_threaded_cv2()
    size = self.image_size
    # Drawn for the whole global batch (every process draws the same), this process keeping its
    # block: processes' augmentations are not correlated, and do not depend on their number.
    flips, angles = augment.draw_flips_and_angles(rng, len(rows) * self.shard_count,
                                                  self.rotation_factor)
    block = slice(self.shard_index * len(rows), (self.shard_index + 1) * len(rows))
    flips, angles = flips[block], angles[block]
    grey = np.empty((len(rows), size, size), np.uint8)
    kept = []
    for i, (scan_index, slice_index) in enumerate(rows.tolist()):
      out = grey[len(kept)]
      try:
        image = model_slice(self.source, scan_index, slice_index, size, out=None if self.augment else out)
      except SliceError as error:
        BAD_SLICES.bad(error, quiet=True)
        self.counts.bad(error, guard=True)
        continue
      if self.augment:
        augment.flip_and_rotate(image, flips[i], angles[i], out=out)
      kept.append(i)
    BAD_SLICES.ok(len(kept))
    self.counts.ok(len(kept))
    if not kept:
      return None
    return {"image": grey[:len(kept)], "label": self.labels[rows[kept, 0]]}


class _EvalBatch(grain.transforms.Map):
  """[k, 2] padded (scan, slice) rows -> the eval batch; padding and bad slices have mask False."""

  def __init__(self, source, labels: np.ndarray, image_size: int):
    self.source, self.labels, self.image_size = source, labels, image_size
    self.counts = BadSlices()

  def map(self, rows):
    _single_threaded_cv2()
    size = self.image_size
    grey = np.zeros((len(rows), size, size), np.uint8)
    mask = rows[:, 0] >= 0
    for i, (scan_index, slice_index) in enumerate(rows.tolist()):
      if scan_index < 0:
        continue
      try:
        model_slice(self.source, scan_index, slice_index, size, out=grey[i])
      except SliceError as error:
        BAD_SLICES.bad(error, quiet=True)
        self.counts.bad(error)
        mask[i] = False
    scan_index = np.maximum(rows[:, 0], 0).astype(np.int32)
    return {"image": grey,
            "label": np.where(rows[:, 0] >= 0, self.labels[scan_index], -1).astype(np.int32),
            "scan_index": scan_index,
            "slice_index": np.maximum(rows[:, 1], 0).astype(np.int32), "mask": mask}


def _labels(source, *, required: bool) -> np.ndarray:
  labels = [ref.label for ref in source.scans]
  if required:
    unlabelled = [ref for ref in source.scans if ref.label is None]
    if unlabelled:
      raise ScanError(unlabelled[0].path, f"training scan without a label "
                      f"({len(unlabelled)} unlabelled scans given to train_pipeline)")
  return np.asarray([-1 if label is None else label for label in labels], np.int32)


class _GreyToRgb(grain.transforms.Map):
  """Grey batches become RGB last, in the consuming process: grain worker processes hand
  batches over in fresh shared memory, whose page faults cost more than the conversion, so
  they send a third of the bytes."""

  def map(self, batch):
    return {**batch, "image": augment.grey_to_rgb(batch["image"])}


def _read_options(threads: int) -> grain.ReadOptions:
  # Elements are whole batches: a couple per thread keeps every thread busy.
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, 2 * threads))


def _maybe_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app
      flags.FLAGS.mark_as_parsed()  # (notebooks, pytest) they would still be unparsed.
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def train_pipeline(source, *, image_size: int = 256, batch_size: int = 32, seed: int = 0,
                   num_epochs: int | None = None, augment: bool = True,
                   rotation_factor: float = 0.2, middle_fraction: float = 1.0,
                   num_workers: int = 0, shard_by_process: bool = True,
                   read_threads: int = READ_THREADS,
                   shard_options: grain.sharding.ShardOptions | None = None,
                   balanced: bool = False) -> grain.IterDataset:
  """Augmented training batches {"image": uint8 [B, S, S, 3], "label": int32 [B]}.

  One record per (scan, slice) of the (middle fraction of the) training scans, shuffled afresh
  every epoch from `seed` and batched (remainder dropped); each batch's slices are decoded,
  resized to `image_size`, randomly flipped horizontally and rotated up to
  +-rotation_factor * 2 pi (constant fill) in one map call, and turned RGB at the end. With several JAX processes each gets a disjoint 1/process_count of every epoch's
  permutation and batches of batch_size // process_count. Iterators support
  get_state()/set_state() for exact resumption. Unreadable slices are skipped and counted.

  Args:
    shard_options: overrides the per-process sharding (tests simulate processes with it).
    balanced: balanced sampling by scan (config.data.balanced_sampling): each epoch's rows are
      drawn so that every class is equally likely (see _ShuffledBatches), same epoch length.
  """
  source = as_slice_source(source)
  labels = _labels(source, required=True)
  records = select_slices(source.num_slices, middle_fraction)
  if shard_options is None:
    shard_options = (grain.sharding.ShardByJaxProcess(drop_remainder=True) if shard_by_process
                     else grain.sharding.NoSharding())
  count = shard_options.shard_count
  per_process_batch = _process_share(batch_size, count)
  usable = len(records) - len(records) % count
  if usable // count < per_process_batch:
    raise ScanError(Path(getattr(source, "root", ".")),
                    f"only {len(records)} training slices for batches of {batch_size}: "
                    "an epoch would hold no full batch")
  # Batch the record rows first and read/decode/augment a whole batch per map call; batches
  # short of bad slices are topped up from the next ones by the rebatching (whose state
  # holds its position inside a batch, so resumption stays exact).
  if balanced and len(np.unique(labels[np.unique(records[:, 0])])) < 2:
    raise ScanError(Path(getattr(source, "root", ".")),
                    f"balanced sampling needs training scans of two classes, found only class "
                    f"{labels[records[0, 0]]}; turn config.data.balanced_sampling off")
  ds = _ShuffledBatches(records, batch_size=per_process_batch, seed=seed,
                        shard_index=shard_options.shard_index, shard_count=count,
                        num_epochs=num_epochs, scan_labels=labels if balanced else None)
  ds = ds.random_map(_TrainBatch(source, labels, image_size, augment, rotation_factor,
                                 shard_options.shard_index, count),
                     seed=(seed + 1) % 2 ** 32)
  ds = ds.to_iter_dataset(_read_options(read_threads))
  ds = grain.experimental.RebatchIterDataset(ds, per_process_batch, drop_remainder=True)
  return _maybe_workers(ds, num_workers).map(_GreyToRgb())


def eval_pipeline(source, *, image_size: int = 256, batch_size: int = 32,
                  middle_fraction: float = 1.0, num_workers: int = 0,
                  read_threads: int = READ_THREADS) -> grain.IterDataset:
  """Every slice of every scan in order: {"image", "label", "scan_index", "slice_index", "mask"}.

  `scan_index` indexes the source's scan list; the last batch is padded with mask False
  (as are slices that could not be decoded). Labels are -1 for unlabelled scans.
  """
  source = as_slice_source(source)
  labels = _labels(source, required=False)
  records = select_slices(source.num_slices, middle_fraction)
  if not len(records):
    raise ScanError(Path("."), "no slices to evaluate")
  padding = -len(records) % batch_size
  records = np.concatenate([records, np.full((padding, 2), -1, np.int32)])
  batches = records.reshape(-1, batch_size, 2)  # Whole batches of rows: one map call each.
  ds = grain.MapDataset.source(batches).map(_EvalBatch(source, labels, image_size))
  ds = ds.to_iter_dataset(_read_options(read_threads))
  return _maybe_workers(ds, num_workers).map(_GreyToRgb())


def to_global_batch(batch, sharding):
  """Process-local numpy batch -> dict of global jax.Arrays laid out by `sharding`.

  `sharding` is one jax.sharding.Sharding for every key (batch axis first) or a dict per key.
  """
  def one(key, value):
    spec = sharding[key] if isinstance(sharding, dict) else sharding
    return jax.make_array_from_process_local_data(spec, np.asarray(value))

  return {key: one(key, value) for key, value in batch.items()}
