"""Training and evaluating by scan (issue 13): the pieces `train.train_and_evaluate` uses when
config.model.scan_head is "attention" or "transformer" (models/scan_heads.py).

Training: each step takes B = config.train.batch_size scans x K = config.data.slices_per_scan slices
(data/scan_batches.py), so the step sees B*K slices; the train step itself is `train.train_step` unchanged
(the ScanModel returns one logit per scan; the loss is the configured one, binary cross-entropy by default,
against the scan's label). Phases, freezing rules, frozen BatchNorms, EMA, remat, FSDP, checkpoints and the
grain iterator state work as for slices; the mesh shards the batch by scan. PreciseBN re-estimates the
BatchNorm statistics on slice batches (the slice model: the BatchNorms live in the backbones only).

Evaluation and prediction run every slice of a scan: the slice branches go over all slices in batches of
config.eval.batch_size (one compiled shape, the last batch padded and masked), giving each slice's pooled
fused feature; then the scan head runs once over the scan's whole feature sequence, padded to the next
multiple of config.eval.scan_length_bucket and masked (padding changes nothing), so any scan length is exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from resdense_jax import data, evaluate, losses, metrics
from resdense_jax.data import scan_batches
from resdense_jax.models import scan_heads
from resdense_jax.sharding import data_sharded, replicated

DEFAULT_BUCKET = 64


def uses_scan_head(config) -> bool:
  """True when config.model.scan_head is a scan-level head (not the paper's "mean")."""
  return scan_heads.check_scan_head(config.model.get("scan_head", "mean")) != "mean"


def create_model(config, *, frozen_bn=()) -> scan_heads.ScanModel:
  return scan_heads.create_scan_model(config.model, frozen_bn=frozen_bn)


def steps_per_epoch(train_source, config) -> int:
  """Full global batches of config.train.batch_size scans per epoch."""
  steps = scan_batches.steps_per_epoch(train_source, config.train.batch_size, config.data.middle_fraction)
  if steps < 1:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} scans: more than the training scans; an "
                     "epoch would hold no full batch")
  return steps


def initialized(rng: jax.Array, model: scan_heads.ScanModel, image_size: int) -> dict:
  """Fresh {"params", "batch_stats"}: the slice model's (same names) and params["scan_head"]."""
  x = jnp.zeros((1, 2, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))({"params": rng}, x)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def abstract_params(model: scan_heads.ScanModel, image_size: int) -> Any:
  """The parameter shapes (jax.ShapeDtypeStruct), nothing computed."""
  x = jax.ShapeDtypeStruct((1, 2, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)["params"]


def train_pipeline(train_source, config):
  """The endless B scans x K slices batches of the training run (grain; checkpointable)."""
  return scan_batches.scan_train_pipeline(
      train_source, image_size=config.data.image_size, batch_size=config.train.batch_size,
      slices_per_scan=int(config.data.get("slices_per_scan", 16)), seed=config.seed,
      max_stride=int(config.data.get("slice_stride", 0)), augment=config.data.augment,
      rotation_factor=config.data.rotation_factor, middle_fraction=config.data.middle_fraction,
      num_workers=config.data.num_workers)


def scan_phase(phase, config):
  """A train.Phase whose model is the ScanModel over the phase's slice model (its frozen BatchNorms)."""
  return dataclasses.replace(phase, model=create_model(config, frozen_bn=phase.model.frozen_bn))


def slice_model(model):
  """The per-slice ResDenseNet of a ScanModel (PreciseBN's batches are slices); a ResDenseNet itself."""
  return getattr(model, "slices", model)


def check_options(config) -> None:
  """Options the scan heads do not support yet, refused before anything runs."""
  if int(config.train.get("cache_frozen_features", 0)):
    raise ValueError("config.train.cache_frozen_features is not supported with config.model.scan_head="
                     f"{config.model.scan_head!r} yet (the feature cache holds backbone maps of single slices)")
  if config.eval.get("aggregation", "mean") != "mean":
    raise ValueError(f"config.eval.aggregation={config.eval.aggregation!r}: a scan head gives one score per scan, "
                     "there is nothing to vote over; leave it at 'mean'")


# ------------------------------------------------------------------------------------------------ evaluation


def features_step(variables: dict, images: jax.Array, *, model, tta: str = "none") -> jax.Array:
  """[N, C] pooled fused features of raw RGB slices (inference); tta="flip": the mean with the mirror's."""
  views = [model.apply(variables, view, train=False, method="slice_features")
           for view in evaluate.tta_views(images, tta)]
  return views[0] if len(views) == 1 else sum(views) / len(views)


def compile_features_step(model, mesh: Mesh, *, variables_shardings: Any = None, tta: str = "none"):
  step = functools.partial(features_step, model=model, tta=evaluate.check_tta(tta))
  shardings = replicated(mesh) if variables_shardings is None else variables_shardings
  return jax.jit(step, in_shardings=(shardings, data_sharded(mesh)), out_shardings=replicated(mesh))


def pool_step(variables: dict, features: jax.Array, mask: jax.Array, *, model) -> dict:
  """{"p_covid": [B], "weights": [B, L], "slice_probs": [B, L]} of features [B, L, C] (inference)."""
  out = model.apply(variables, features, mask, method="pool")
  slice_logits = out["slice_logits"]
  batch, length = slice_logits.shape[:2]
  slice_probs = losses.covid_probability(slice_logits.reshape(batch * length, -1)).reshape(batch, length)
  return {"p_covid": losses.covid_probability(out["logits"]), "weights": out["weights"],
          "slice_probs": slice_probs}


def compile_pool_step(model):
  return jax.jit(functools.partial(pool_step, model=model))


def bucket_length(count: int, bucket: int) -> int:
  """`count` rounded up to a multiple of `bucket` (at least one bucket)."""
  bucket = max(int(bucket), 1)
  return max(1, -(-int(count) // bucket)) * bucket


def pool_scan(pool_fn: Callable, variables: dict, features: np.ndarray, bucket: int = DEFAULT_BUCKET):
  """(P(COVID), attention weights [n], slice probabilities [n]) of one scan's slice features [n, C]: the
  scan head once over the whole scan, padded to bucket_length(n) and masked."""
  features = np.asarray(features, np.float32)
  n = len(features)
  if n == 0:
    raise ValueError("a scan needs at least one slice")
  length = bucket_length(n, bucket)
  padded = np.zeros((1, length, features.shape[-1]), np.float32)
  padded[0, :n] = features
  mask = np.zeros((1, length), bool)
  mask[0, :n] = True
  out = pool_fn(variables, padded, mask)
  return (float(np.asarray(out["p_covid"])[0]), np.asarray(out["weights"], np.float32)[0, :n],
          np.asarray(out["slice_probs"], np.float32)[0, :n])




def predict_scans(features_fn: Callable, pool_fn: Callable, variables: dict, source, config, batch_sharding
                  ) -> dict[str, Any]:
  """{"p_covid": [scans], "weights": [per-scan arrays], "slice_probs": [...], "slice_index": [...]} of every
  scan of `source` (a data.RawScans / PreparedData), every slice of the evaluation's middle fraction."""
  dataset = data.eval_pipeline(source, image_size=config.data.image_size, batch_size=config.eval.batch_size,
                               middle_fraction=config.eval.middle_fraction, num_workers=config.data.num_workers)
  total = data.eval_steps(source, config.eval.batch_size, config.eval.middle_fraction)
  slices = evaluate.predict_slices(features_fn, variables, dataset, batch_sharding, total=total, desc="eval scans")
  features, scan_index = np.asarray(slices["prob"], np.float32), np.asarray(slices["scan_index"], np.int64)
  bucket = int(config.eval.get("scan_length_bucket", DEFAULT_BUCKET))
  result = {"p_covid": [], "weights": [], "slice_probs": [], "slice_index": []}
  for scan in range(len(source.scans)):
    rows = np.flatnonzero(scan_index == scan)
    if not len(rows):
      raise ValueError(f"{source.scans[scan].path}: no slice of this scan could be evaluated")
    p_covid, weights, slice_probs = pool_scan(pool_fn, variables, features[rows], bucket)
    result["p_covid"].append(p_covid)
    result["weights"].append(weights)
    result["slice_probs"].append(slice_probs)
    result["slice_index"].append(np.asarray(slices["slice_index"])[rows])
  result["p_covid"] = np.asarray(result["p_covid"], np.float64)
  return result


def evaluate_scans(features_fn: Callable, pool_fn: Callable, variables: dict, scans: Sequence, config,
                   batch_sharding) -> dict:
  """evaluate.evaluate's metrics for a scan head: the scan score is the head's P(COVID) of the whole scan;
  slice_accuracy from each slice's own probability (ScanModel.pool's slice_logits)."""
  source = scans if isinstance(scans, (data.RawScans, data.PreparedData)) else data.RawScans(
      list(scans), progress=False, options=data.ReadOptions.from_config(config.data))
  labels = [s.label for s in source.scans]
  if not labels or any(label is None for label in labels):
    raise ValueError("evaluation needs labelled validation scans")
  out = predict_scans(features_fn, pool_fn, variables, source, config, batch_sharding)
  slice_labels = np.concatenate([np.full(len(p), label) for p, label in zip(out["slice_probs"], labels)])
  return metrics.scored_scan_metrics(out["p_covid"], np.asarray(labels), np.concatenate(out["slice_probs"]),
                                     slice_labels, threshold=config.eval.threshold)


class Evaluator:
  """What the training loop calls as `eval_fn`: compiled once per run (inference ignores frozen BatchNorms)."""

  def __init__(self, model, mesh: Mesh, *, variables_shardings: Any = None, tta: str = "none"):
    self.features_fn = compile_features_step(model, mesh, variables_shardings=variables_shardings, tta=tta)
    self.pool_fn = compile_pool_step(model)

  def evaluate(self, variables: dict, scans, config, batch_sharding) -> dict:
    return evaluate_scans(self.features_fn, self.pool_fn, variables, scans, config, batch_sharding)


class ScanInference:
  """A scan head applied to whole scans of model inputs (Predictor): slices in fixed batches, head once."""

  def __init__(self, model, mesh: Mesh, *, batch_size: int, tta: str = "none", bucket: int = DEFAULT_BUCKET):
    self.model, self.batch_size, self.bucket = model, int(batch_size), int(bucket)
    self._sharding = data_sharded(mesh)
    self.features_fn = compile_features_step(model, mesh, tta=tta)
    self.pool_fn = compile_pool_step(model)

  def features(self, variables: dict, images: np.ndarray) -> np.ndarray:
    """[n, C] float32 features of uint8 [n, S, S, 3] model inputs, in padded batches of batch_size."""
    chunks = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      count = len(chunk)
      chunk = np.concatenate([chunk, np.zeros((self.batch_size - count, *chunk.shape[1:]), chunk.dtype)])
      out = self.features_fn(variables, data.to_global_batch({"image": chunk}, self._sharding)["image"])
      chunks.append(np.asarray(out, np.float32)[:count])
    return np.concatenate(chunks)

  def scan(self, variables: dict, images: np.ndarray, middle_fraction: float = 1.0):
    """(P(COVID), attention weights [n], slice probabilities [n]) of one scan's model inputs [n, S, S, 3]: the
    head once over the evaluation's middle slices (`middle_fraction`, as evaluation selects them; weight 0
    outside them, their probabilities from the head over all slices)."""
    features = self.features(variables, np.asarray(images))
    rows = data.pipeline.select_slices(np.asarray([len(features)]), middle_fraction)[:, 1]
    p_covid, kept, slice_probs = pool_scan(self.pool_fn, variables, features[rows], self.bucket)
    weights = np.zeros(len(features), np.float32)
    weights[rows] = kept
    if len(rows) < len(features):
      _, _, slice_probs = pool_scan(self.pool_fn, variables, features, self.bucket)
    return p_covid, weights, slice_probs
