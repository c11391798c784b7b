"""Where a training run's slices come from: the raw COV19-CT-DB folders (split by scan), a prepared TFDS copy,
or a synthetic collection written into the workdir; and the un-augmented batches PreciseBN reads."""

from __future__ import annotations

import pathlib

import jax
from jax.experimental import multihost_utils

from resdense_jax.data import synthetic
from resdense_jax.data.discover import discover
from resdense_jax.data.pipeline import RawScans, train_pipeline
from resdense_jax.data.prepare import PreparedData
from resdense_jax.data.scans import ReadOptions
from resdense_jax.models.build import plain


def resolve_data_root(config, workdir: pathlib.Path) -> pathlib.Path:
  """The collection's root: config.data.root, or the synthetic collection generated into the workdir
  (by process 0; with several processes the workdir must be shared, as orbax's checkpoints need anyway)."""
  if config.data.synthetic:
    root = workdir / "synthetic_ct"
    if jax.process_index() == 0 and not (root / ".complete").exists():
      synthetic.write_collection(root, num_scans=plain(config.data.synthetic_scans),
                                 slice_size=config.data.synthetic_slice_size,
                                 num_slices=tuple(config.data.synthetic_num_slices), seed=config.seed,
                                 lesion_fraction=float(config.data.get("synthetic_lesion_fraction", 1.0)))
      (root / ".complete").write_text("written by resdense_jax.train\n")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("resdense_jax synthetic collection written")
    return root
  if not config.data.root:
    raise ValueError(
        "no data: set --config.data.root=/path/to/COV19-CT-DB (folders train/{covid,non-covid}/<scan>/*.jpg and "
        "validation/...). COV19-CT-DB is distributed by the MIA-COV19D / ECCV-AIMIA organisers on request "
        "(https://mlearn.lincoln.ac.uk/), or run --config=configs/demo.py to train on a synthetic collection.")
  root = pathlib.Path(config.data.root).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(
        f"{root}: no such folder. Point --config.data.root at the COV19-CT-DB root (with train/ and "
        "validation/ inside); the database is distributed by the MIA-COV19D organisers on request.")
  return root


def data_sources(config, workdir: pathlib.Path):
  """(train, validation) slice sources: a prepared TFDS copy (config.data.prepared_dir) or the raw scan folders."""
  options = ReadOptions.from_config(config.data)
  if config.data.get("prepared_dir"):
    if options.finds_lungs:
      raise ValueError(f"{config.data.prepared_dir}: config.data.lung_crop / drop_lungless_slices need the raw "
                       "scans (prepared slices are already resized, without their lung boxes); train from "
                       "--config.data.root instead of prepared_dir, or turn the options off")
    if options.resize != "squash":
      raise ValueError(f"{config.data.prepared_dir}: config.data.resize={options.resize!r} needs the raw scans "
                       "(`python -m resdense_jax.data.prepare` stores every slice already squashed to the input "
                       "size); train from --config.data.root instead of prepared_dir, or use resize='squash'")
    # Written by `python -m resdense_jax.data.prepare`, which already split by scan.
    return tuple(PreparedData(config.data.prepared_dir, split, image_size=config.data.image_size)
                 for split in ("train", "validation"))
  collection = discover(resolve_data_root(config, workdir), val_fraction=config.data.val_fraction,
                        seed=config.seed)
  return RawScans(collection.train, options=options), RawScans(collection.validation, options=options)


def precise_bn_batches(train_source, config, step: int):
  """Un-augmented, shuffled training batches for PreciseBN: the inputs look like evaluation's (no rotation
  corners), and they are drawn afresh from (seed, step), so a resumed run draws the same."""
  return iter(train_pipeline(train_source, image_size=config.data.image_size,
                             batch_size=config.train.batch_size, seed=config.seed + 1 + step,
                             num_epochs=None, augment=False, middle_fraction=config.data.middle_fraction,
                             num_workers=0))
