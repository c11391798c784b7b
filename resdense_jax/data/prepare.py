"""Prepared data: a scan collection as a TFDS dataset in array_record format, and reading it back.

    python -m resdense_jax.data.prepare --source=DIR --out=DIR [--image_size=256]

writes `<out>/cov19_ct_db/<image_size>px/1.0.0/`: one record per slice (the slice resized to
image_size x image_size and JPEG- or PNG-encoded, label, scan id, scan index, slice index,
split), in scan-then-slice order, plus per-scan metadata. No TensorFlow is involved: images
are encoded with OpenCV and stored as bytes. `PreparedData(out, split)` reads one split back
through `tfds.data_source` and is accepted as `source` by the grain pipelines.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from pathlib import Path

import cv2
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from tqdm import tqdm

from resdense_jax.data import augment
from resdense_jax.data.discover import discover
from resdense_jax.data.scans import (DEFAULT_WINDOW, ScanError, ScanRef, SliceError, read_scan,
                                     warn)

NAME = "cov19_ct_db"
SPLITS = ("train", "validation", "test")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
COV19-CT-DB cannot be downloaded by code. It is distributed on request by the organisers of
the MIA-COV19D challenge (AI-enabled Medical Image Analysis workshop, COVID-19 detection
from chest CT): register for the challenge and ask the organisers (D. Kollias et al.) for
access; they send a download link after you accept the data licence.

Unpack it so that the manual directory (--source) looks like:
  <source>/train/covid/<scan_id>/0.jpg, 1.jpg, ...
  <source>/train/non-covid/<scan_id>/...
  <source>/validation/covid/<scan_id>/...       (or val/; optional: else split by scan)
  <source>/validation/non-covid/<scan_id>/...
  <source>/test/<scan_id>/...                     (optional, unlabelled)
Class folder names are matched leniently (covid, non-covid, non_covid, noncovid, any case).
Your own scans work too: DICOM series folders or NIfTI volumes in the same layout.
"""


class Cov19CtDbConfig(tfds.core.BuilderConfig):
  """One prepared variant: slice size and encoding."""

  def __init__(self, *, image_size: int = 256, encoding: str = "jpeg", jpeg_quality: int = 95,
               window=DEFAULT_WINDOW, val_fraction: float = 0.25, seed: int = 0):
    if encoding not in ("jpeg", "png"):
      raise ValueError(f"encoding must be jpeg or png, got {encoding!r}")
    name = f"{image_size}px" + ("" if encoding == "jpeg" else f"_{encoding}")
    super().__init__(name=name, description=f"{image_size}x{image_size} {encoding} slices")
    self.image_size, self.encoding, self.jpeg_quality = image_size, encoding, jpeg_quality
    self.window, self.val_fraction, self.seed = tuple(window), val_fraction, seed


def _encode(image: np.ndarray, encoding: str, quality: int) -> bytes:
  if encoding == "jpeg":
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
  else:
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
  if not ok:
    raise RuntimeError(f"OpenCV could not encode a {image.shape} slice as {encoding}")
  return data.tobytes()


def _encode_scan(ref: ScanRef, image_size: int, encoding: str, quality: int, window):
  """Worker: one scan -> (encoded slices, skipped slice names, error message or None)."""
  try:
    scan = read_scan(ref.path, window=window)
  except ScanError as error:
    return [], (), str(error)
  encoded = [_encode(augment.resize(s, image_size), encoding, quality) for s in scan.slices]
  return encoded, scan.skipped, None


class Cov19CtDb(tfds.core.GeneratorBasedBuilder):
  """COV19-CT-DB (or any scan collection in its layout) as resized slices, one record each."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Resized grey slices, scan-ordered, with per-scan metadata."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # No fixed BUILDER_CONFIGS: every prepared variant is a Cov19CtDbConfig passed explicitly
  # (TFDS refuses a custom config named like a listed one).

  def __init__(self, *, num_workers: int = 1, progress: bool = True, **kwargs):
    self._num_workers, self._progress = num_workers, progress
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="Chest CT slices grouped by scan for COVID-19 classification.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_,
                                          doc=f"{self.builder_config.encoding}-encoded uint8 "
                                          f"grey slice, {size}x{size}"),
            "label": tfds.features.Scalar(np.int32, doc="1 COVID, 0 non-COVID, -1 unknown"),
            "scan_id": tfds.features.Text(),
            "scan_index": tfds.features.Scalar(np.int32, doc="index into metadata scans"),
            "slice_index": tfds.features.Scalar(np.int32, doc="position along the body axis"),
            "split": tfds.features.Text(),
        }),
        disable_shuffling=True,  # Keep scan-then-slice order so scans are contiguous runs.
        homepage="https://mlearn.lincoln.ac.uk/mia-cov19d/",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    collection = discover(dl_manager.manual_dir, val_fraction=config.val_fraction, seed=config.seed)
    self.info.metadata.update({"image_size": config.image_size, "encoding": config.encoding,
                               "window": list(config.window), "source": str(collection.root),
                               "scans": {}, "skipped_slices": {}, "skipped_scans": {}})
    return {split: self._generate_examples(split, collection.split(split))
            for split in SPLITS if collection.split(split)}

  def _scans(self, refs):
    """Encoded scans in order, read by a process pool when num_workers > 1."""
    config = self.builder_config
    args = (config.image_size, config.encoding, config.jpeg_quality, config.window)
    if self._num_workers <= 1:
      for ref in refs:
        yield _encode_scan(ref, *args)
      return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(self._num_workers, mp_context=context) as pool:
      yield from pool.map(_encode_scan, refs, *[[a] * len(refs) for a in args], chunksize=1)

  def _generate_examples(self, split: str, refs: list[ScanRef]):
    scans, skipped, failed = [], {}, {}
    stride = 2 ** 120 // max(len(refs), 1)  # Keys spread over TFDS's sort buckets, in order.
    scans_iter = self._scans(refs)
    if self._progress:
      scans_iter = tqdm(scans_iter, total=len(refs), desc=f"preparing {split} scans")
    for position, (ref, (encoded, bad, error)) in enumerate(zip(refs, scans_iter)):
      if error is not None:
        warn(f"{error}; scan left out of the prepared data")
        failed[str(ref.path)] = error
        continue
      if bad:
        skipped[str(ref.path)] = list(bad)
      scan_index = len(scans)
      scans.append({"scan_id": ref.scan_id, "label": -1 if ref.label is None else ref.label,
                    "path": str(ref.path), "num_slices": len(encoded)})
      label = -1 if ref.label is None else ref.label
      for slice_index, image in enumerate(encoded):
        yield position * stride + slice_index, {
            "image": image, "label": label, "scan_id": ref.scan_id, "scan_index": scan_index,
            "slice_index": slice_index, "split": split}
    self.info.metadata["scans"][split] = scans
    self.info.metadata["skipped_slices"][split] = skipped
    self.info.metadata["skipped_scans"][split] = failed
    if not scans:
      raise ScanError(Path(refs[0].path).parent if refs else Path("."),
                      f"no readable scans in split {split}")


def prepare_dataset(source, out, *, image_size: int = 256, encoding: str = "jpeg", jpeg_quality: int = 95,
            window=DEFAULT_WINDOW, val_fraction: float = 0.25, seed: int = 0, num_workers: int = 1,
            progress: bool = True) -> Path:
  """Builds the prepared dataset of collection `source` under `out`; returns its folder."""
  source, out = Path(source), Path(out)
  if not source.is_dir():
    raise ScanError(source, "source collection folder does not exist")
  config = Cov19CtDbConfig(image_size=image_size, encoding=encoding, jpeg_quality=jpeg_quality,
                           window=window, val_fraction=val_fraction, seed=seed)
  builder = Cov19CtDb(config=config, data_dir=str(out), file_format="array_record",
                      num_workers=num_workers, progress=progress)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(source), download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return Path(builder.data_dir)


def _config_dirs(data_dir: Path) -> dict[str, Path]:
  """Config name -> newest version folder of the prepared dataset under data_dir."""
  found = {}
  for config in sorted((data_dir / NAME).glob("*")):
    versions = sorted((v for v in config.glob("*") if (v / "dataset_info.json").exists()),
                      key=lambda v: tuple(int(x) for x in v.name.split(".") if x.isdigit()))
    if versions:
      found[config.name] = versions[-1]
  return found


def _variant(config_name: str) -> tuple[int, str]:
  """"256px" -> (256, "jpeg"), "256px_png" -> (256, "png"): the names Cov19CtDbConfig gives its variants."""
  size, _, encoding = config_name.partition("px")
  return int(size), encoding.lstrip("_") or "jpeg"


class PreparedData:
  """One split of a prepared dataset as a slice source for the grain pipelines.

  Attributes: scans (list[ScanRef], path = original scan path), num_slices (per scan),
  image_size, split, skipped (slice names left out per scan path).
  """

  def __init__(self, data_dir, split: str = "train", *, image_size: int | None = None,
               encoding: str | None = None):
    """`image_size` / `encoding` pick one prepared variant; either may be left out where only one fits."""
    self.data_dir, self.split = Path(data_dir), split
    configs = _config_dirs(self.data_dir)
    if not configs:
      raise ScanError(self.data_dir / NAME, "no prepared dataset here (run "
                      "python -m resdense_jax.data.prepare --source=... --out=...)")
    fitting = [name for name in configs if (image_size is None or _variant(name)[0] == image_size)
               and (encoding is None or _variant(name)[1] == encoding)]
    if len(fitting) != 1:
      wanted = ", ".join(f"{k} {v}" for k, v in (("image_size", image_size), ("encoding", encoding)) if v is not None)
      problem = "no prepared variant" if not fitting else "more than one prepared variant"
      raise ScanError(self.data_dir / NAME, f"{problem} with {wanted or 'no image_size or encoding given'}; "
                      f"found {', '.join(configs)}")
    self.config = fitting[0]
    builder = tfds.builder_from_directory(str(configs[self.config]))
    metadata = builder.info.metadata
    if split not in metadata["scans"]:
      raise ScanError(configs[self.config], f"prepared dataset has no split {split!r} "
                      f"(has {', '.join(metadata['scans'])})")
    self.image_size = int(metadata["image_size"])
    entries = metadata["scans"][split]
    self.scans = [ScanRef(scan_id=e["scan_id"], path=Path(e["path"]),
                          label=None if e["label"] < 0 else int(e["label"]), split=split)
                  for e in entries]
    self.num_slices = np.asarray([e["num_slices"] for e in entries], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(self.num_slices)[:-1]]).astype(np.int64)
    self.skipped = dict(metadata["skipped_slices"].get(split, {}))
    self._source = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None  # Reopened lazily in each worker process.
    return state

  def __len__(self) -> int:
    return int(self.num_slices.sum())

  @property
  def source(self):
    if self._source is None:
      self._source = tfds.data_source(f"{NAME}/{self.config}", data_dir=str(self.data_dir),
                                      split=self.split)
    return self._source

  def record(self, scan_index: int, slice_index: int) -> dict:
    return self.source[int(self.offsets[scan_index]) + slice_index]

  def load(self, scan_index: int, slice_index: int) -> np.ndarray:
    """uint8 `[image_size, image_size]` slice; SliceError if the stored bytes do not decode."""
    record = self.record(scan_index, slice_index)
    if record["scan_index"] != scan_index or record["slice_index"] != slice_index:
      raise ScanError(self.data_dir, f"prepared records out of order at scan {scan_index} "
                      f"slice {slice_index}: found {record['scan_index']}/{record['slice_index']}")
    image = cv2.imdecode(np.frombuffer(record["image"], np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
      raise SliceError(Path(self.scans[scan_index].path), f"prepared slice {slice_index} "
                       "does not decode")
    return image


def main(argv):
  del argv
  f = flags.FLAGS
  path = prepare_dataset(f.source, f.out, image_size=f.image_size, encoding=f.encoding,
                 jpeg_quality=f.jpeg_quality, val_fraction=f.val_fraction, seed=f.seed,
                 num_workers=f.num_workers)
  metadata = tfds.builder_from_directory(str(path)).info.metadata
  for split, scans in metadata["scans"].items():
    n_bad = sum(len(v) for v in metadata["skipped_slices"].get(split, {}).values())
    n_failed = len(metadata["skipped_scans"].get(split, {}))
    print(f"{split}: {len(scans)} scans, {sum(s['num_slices'] for s in scans)} slices, "
          f"{n_bad} bad slices skipped, {n_failed} unreadable scans left out")
  print(f"prepared dataset: {path}")


def _define_flags():
  flags.DEFINE_string("source", None, "Scan collection (COV19-CT-DB layout).", required=True)
  flags.DEFINE_string("out", None, "TFDS data_dir to write the prepared dataset to.", required=True)
  flags.DEFINE_integer("image_size", 256, "Slices are resized to image_size x image_size.")
  flags.DEFINE_enum("encoding", "jpeg", ["jpeg", "png"], "Slice encoding (png is lossless).")
  flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality for --encoding=jpeg.")
  flags.DEFINE_float("val_fraction", 0.25, "Validation share when there is no validation folder.")
  flags.DEFINE_integer("seed", 0, "Seed of the train/validation split by scan.")
  flags.DEFINE_integer("num_workers", 1, "Processes reading and encoding scans.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
