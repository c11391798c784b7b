"""Scan-level evaluation: every slice of every scan through the model, aggregated per scan.

The eval pipeline yields padded batches in scan order with `scan_index` / `mask`; the slice probabilities
are gathered on the host and handed to `metrics.scan_and_slice_metrics` (mean slice probability by default,
the paper's rule; or the authors' vote rule), with the threshold and middle fraction from `config.eval`.
Every evaluation also searches the threshold that maximises the scan macro-F1 (`metrics.best_threshold`).

Test-time augmentation (`config.eval.tta`, `predict --tta`): "flip" makes each slice's probability the mean
of the model's probability on the slice and on its left-right mirror, the flip the training augmentation
draws (Keras RandomFlip("horizontal"), data/augment.py), applied to the resized model input.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from resdense_jax import data, metrics

TTA_MODES = ("none", "flip")


def check_tta(tta: str | None) -> str:
  """A test-time augmentation mode ("none" for None), or a ValueError naming the choices."""
  tta = tta or "none"
  if tta not in TTA_MODES:
    raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {TTA_MODES}")
  return tta


def tta_views(images: jax.Array, tta: str) -> list[jax.Array]:
  """The [B, H, W, C] batches whose slice probabilities are averaged: the images, and for "flip" their
  left-right mirrors."""
  if check_tta(tta) == "flip":
    return [images, jnp.flip(images, axis=2)]
  return [images]


def process_rows(batch: np.ndarray) -> np.ndarray:
  """This process's rows [p*B/P, (p+1)*B/P) of a global batch every process holds whole.

  The eval pipeline does not shard: each process reads the same padded batches, contributes its slice
  to the global array, and reads the (replicated) probabilities of the whole batch back.
  """
  count, index = jax.process_count(), jax.process_index()
  if len(batch) % count:
    raise ValueError(f"eval batch of {len(batch)} rows is not divisible by the {count} processes")
  share = len(batch) // count
  return batch[index * share:(index + 1) * share]


def predict_slices(eval_fn: Callable, variables: dict, dataset, batch_sharding, *, total: int | None = None,
                   desc: str = "eval") -> dict[str, np.ndarray]:
  """{"prob", "label", "scan_index", "slice_index"} of every real (unpadded) slice of `dataset`.

  `dataset` yields whole global batches on every process (eval_pipeline); the returned arrays are the
  same on every process.
  """
  outputs = {"prob": [], "label": [], "scan_index": [], "slice_index": []}
  for batch in tqdm.tqdm(dataset, total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True):
    images = data.to_global_batch({"image": process_rows(batch["image"])}, batch_sharding)["image"]
    probs = eval_fn(variables, images)
    if not (probs.is_fully_addressable or probs.is_fully_replicated):
      probs = multihost_utils.process_allgather(probs, tiled=True)
    mask = np.asarray(batch["mask"], bool)
    outputs["prob"].append(np.asarray(probs, np.float32)[mask])
    for key in ("label", "scan_index", "slice_index"):
      outputs[key].append(np.asarray(batch[key])[mask])
  return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outputs.items()}


def evaluate(eval_fn: Callable, variables: dict, scans: Sequence, config, batch_sharding) -> dict:
  """Scan-level metrics ("scan_macro_f1", ...) and "slice_accuracy" on the labelled `scans`.

  `scans`: a list of ScanRefs, a data.RawScans over them (indexed once, reused every evaluation) or a
  data.PreparedData split.
  """
  prepared = (data.RawScans, data.PreparedData)
  if isinstance(scans, prepared):
    source = scans
  else:  # read as training reads (config.data.lung_crop, drop_lungless_slices)
    source = data.RawScans(list(scans), progress=False, options=data.ReadOptions.from_config(config.data))
  refs = source.scans
  if not refs:
    raise ValueError("evaluation needs at least one labelled validation scan")
  unlabelled = [s.scan_id for s in refs if s.label is None]
  if unlabelled:
    raise ValueError(f"validation scans without a label, e.g. {unlabelled[0]}")
  dataset = data.eval_pipeline(source, image_size=config.data.image_size, batch_size=config.eval.batch_size,
                               middle_fraction=config.eval.middle_fraction, num_workers=config.data.num_workers)
  total = data.eval_steps(source, config.eval.batch_size, config.eval.middle_fraction)
  slices = predict_slices(eval_fn, variables, dataset, batch_sharding, total=total)
  return metrics.scan_and_slice_metrics(slices["prob"], slices["label"], slices["scan_index"],
                                        np.asarray([s.label for s in refs]), rule=config.eval.aggregation,
                                        threshold=config.eval.threshold)
