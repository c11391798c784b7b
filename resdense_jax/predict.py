"""Predicting COVID-19 from CT scans with a trained Res-Dense Net.

    python -m resdense_jax.predict --checkpoint=runs/resdense --input=/data/COV19-CT-DB/test \
        --out=predictions.csv --per_slice=slices.csv --submission=submission/

`--input` is one scan (a folder of slice images, a folder holding one DICOM series, or a NIfTI file), a
folder of such scans, a COV19-CT-DB split (`<split>/{covid,non-covid}/<scan>/` or `test/<scan>/`) or a whole
COV19-CT-DB root. Every slice goes through the model exactly as the evaluation step does (resize to the
checkpoint's image size, grey to RGB, `train.eval_step`), and a scan's score is its slices' probabilities
aggregated by the checkpoint's rule (`config.eval.aggregation`, the paper's mean by default) over the middle
fraction of slices the evaluation uses (`config.eval.middle_fraction`); a scan is COVID when its score is above
`config.eval.threshold`. `--aggregation` and `--threshold` override them; `--threshold=best` takes the threshold
that maximised the validation scan macro-F1 when the loaded checkpoint was evaluated (recorded in its meta).
`--tta=flip` (default: the checkpoint's `config.eval.tta`, "none" unless set) makes each slice's probability
the mean over the slice and its left-right mirror (the training augmentation's flip; evaluate.py).

Library use:

    predictor = Predictor.from_checkpoint("runs/resdense")
    p_covid, slice_probs = predictor.predict_scan("/data/scan_folder")
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import re
import sys
import tempfile
from typing import Iterable, Sequence

import jax
import numpy as np
import tqdm
from absl import flags

from resdense_jax import (checkpoints, compilation_cache, cpu_flags, data, evaluate, metrics, scan_train, sharding,
                          train)
from resdense_jax.data import augment, dicom, pipeline, scans
from resdense_jax.data.discover import SPLIT_NAMES, scans_in

CSV_COLUMNS = ("scan_id", "path", "n_slices", "p_covid", "label")
PER_SLICE_COLUMNS = ("scan_id", "path", "slice_index", "p_covid")
SUBMISSION_FILES = {1: "covid.csv", 0: "non-covid.csv"}
_CLASS_FOLDERS = {"covid": 1, "noncovid": 0}


# ------------------------------------------------------------------------------------------------ results


@dataclasses.dataclass
class ScanPrediction:
  """One scan's prediction. `label` is the predicted class (1 COVID, 0 non-COVID); `true_label` the known
  class from a labelled collection folder (None otherwise). `slice_probs` covers every slice read;
  `slice_indices` gives each one's position in the scan (None: 0, 1, ...; they differ where slices did not
  decode or were dropped as lungless)."""
  scan_id: str
  path: pathlib.Path
  p_covid: float
  label: int
  slice_probs: np.ndarray
  true_label: int | None = None
  slice_indices: np.ndarray | None = None
  # A scan head's (config.model.scan_head attention / transformer) attention weight of each slice; None: mean.
  slice_weights: np.ndarray | None = None

  @property
  def n_slices(self) -> int:
    return int(len(self.slice_probs))


@dataclasses.dataclass
class Failure:
  """An input that could not be read, and why."""
  path: pathlib.Path
  message: str


# ------------------------------------------------------------------------------------------------ inputs


def _visible_children(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted((p for p in folder.iterdir() if not p.name.startswith((".", "_"))),
                key=lambda p: scans.natural_key(p.name))


def _is_scan_folder(folder: pathlib.Path) -> bool:
  """Slice images or DICOM files directly inside: one scan, not a folder of scans."""
  return any(p.is_file() and (scans.is_image(p) or dicom.is_dicom_file(p)) for p in folder.iterdir())


def _class_label(name: str) -> int | None:
  return _CLASS_FOLDERS.get(re.sub(r"[\s_\-]", "", name.lower()))


def _labelled_folder_scans(folder: pathlib.Path, split: str):
  """Scans of `<folder>/{covid,non-covid}/` (whichever class folders are there), labelled."""
  refs = []
  for child in _visible_children(folder):
    label = _class_label(child.name) if child.is_dir() else None
    if label is not None:
      refs.extend(scans_in(child, label=label, split=split))
  return refs


def find_scans(path: str | os.PathLike) -> list:
  """The scans (data.ScanRef) `path` stands for: one scan, a folder of scans, a split or a collection root."""
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise scans.ScanError(path, "no such scan, folder of scans or COV19-CT-DB folder")
  if path.is_file() or _is_scan_folder(path):
    scan_id = re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)
    return [scans.ScanRef(scan_id=scan_id, path=path, label=None, split="")]
  children = [p for p in _visible_children(path) if p.is_dir()]
  splits = [p for p in children if p.name.lower() in SPLIT_NAMES]
  if splits:  # a COV19-CT-DB root: every split, labelled where the class folders say so
    refs = []
    for split_dir in splits:
      split = SPLIT_NAMES[split_dir.name.lower()]
      labelled = _labelled_folder_scans(split_dir, split)
      refs.extend(labelled or scans_in(split_dir, label=None, split=split))
  elif any(_class_label(p.name) is not None for p in children):
    refs = _labelled_folder_scans(path, path.name)
  else:
    refs = scans_in(path, label=None, split=path.name)
  if not refs:
    raise scans.ScanError(path, "no scans found: expected slice images, DICOM files, NIfTI volumes, "
                          "folders of them, or a COV19-CT-DB split")
  return refs


# --------------------------------------------------------------------------------------------- predictor


class Predictor:
  """A trained Res-Dense Net applied to whole scans, exactly as the evaluation step applies it.

  Attributes:
    model, variables, config: as `checkpoints.load_for_inference` returns them.
    aggregation: "mean" (the paper) or "vote" (the authors' code); threshold: COVID when score > threshold.
    tta: "none" or "flip" (slice probability: mean over the slice and its mirror); default config.eval.tta.
    threshold_source: where the threshold came from, for the summary.
  """

  def __init__(self, model, variables: dict, config, *, aggregation: str | None = None,
               threshold: float | str | None = None, batch_size: int | None = None, tta: str | None = None):
    self.model, self.config = model, config
    self.aggregation = aggregation or config.eval.aggregation
    if self.aggregation not in metrics.AGGREGATIONS:
      raise ValueError(f"unknown aggregation {self.aggregation!r}; choose one of {metrics.AGGREGATIONS}")
    if threshold == "best":
      raise ValueError("threshold='best' is read from a checkpoint's meta: use "
                       "Predictor.from_checkpoint(checkpoint_dir, threshold='best')")
    self.threshold = float(config.eval.threshold if threshold is None else threshold)
    self.threshold_source = "the checkpoint's config.eval.threshold" if threshold is None else "given"
    self.tta = evaluate.check_tta(tta or config.eval.get("tta", "none"))
    self.image_size = int(config.data.image_size)
    self.middle_fraction = float(config.eval.middle_fraction)
    # The training run's reading path: decoding, lung crop, lungless slices (data.read_scan_slices).
    self.read_options = data.ReadOptions.from_config(config.data)
    self.batch_size = int(batch_size or config.eval.batch_size)
    mesh = sharding.create_mesh()
    if self.batch_size % mesh.size:
      raise ValueError(f"batch size {self.batch_size} must divide evenly over the {mesh.size} devices")
    self._sharding = sharding.data_sharded(mesh)
    self.variables = jax.device_put(variables, sharding.replicated(mesh))
    self._eval_fn = train.compile_eval_step(model, mesh, tta=self.tta)
    # A scan head scores the whole scan once from all its slices' features (scan_train.ScanInference).
    self.scan_inference = (scan_train.ScanInference(
        scan_train.create_model(config), mesh, batch_size=self.batch_size, tta=self.tta,
        bucket=int(config.eval.get("scan_length_bucket", scan_train.DEFAULT_BUCKET)))
        if scan_train.uses_scan_head(config) else None)

  @classmethod
  def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, **overrides) -> "Predictor":
    """From a workdir, its checkpoints/ folder (the best step) or one step folder.

    `threshold="best"`: the threshold that maximised the validation scan macro-F1 at that checkpoint's
    evaluation (a ValueError naming the step folder when the checkpoint records none).
    """
    best = None
    if overrides.get("threshold") == "best":
      best = checkpoints.load_threshold(checkpoint_dir)
      overrides["threshold"] = best[0]
    model, variables, config = checkpoints.load_for_inference(checkpoint_dir)
    predictor = cls(model, variables, config, **overrides)
    if best is not None:
      predictor.threshold_source = f"best on validation (scan macro-F1 {best[1]:.4f} there)"
    return predictor

  def model_inputs(self, slices) -> np.ndarray:
    """uint8 [h, w] slices (sizes may differ) -> uint8 [n, S, S, 3], the eval pipeline's resize (the run's
    config.data.resize) and grey-to-RGB."""
    mode = self.read_options.resize
    return np.stack([augment.grey_to_rgb(augment.resize(s, self.image_size, mode=mode)) for s in slices])

  def read(self, scan_or_ref) -> data.ScanSlices:
    """A scan (path, data.ScanRef, data.Scan, or data.ScanSlices as read) through the training run's reading
    path: the slices the eval pipeline would feed, before resizing (data.read_scan_slices)."""
    if isinstance(scan_or_ref, data.ScanSlices):
      return scan_or_ref
    return data.read_scan_slices(scan_or_ref, self.read_options)

  def slice_probabilities(self, slices: np.ndarray) -> np.ndarray:
    """P(COVID) of every slice of uint8 [n, h, w] `slices`, float32 [n]."""
    slices = np.asarray(slices)
    if slices.ndim != 3 or slices.dtype != np.uint8 or not len(slices):
      raise ValueError(f"slices must be uint8 [n, h, w] with n >= 1, got {slices.dtype} {slices.shape}")
    probs = []
    for start in range(0, len(slices), self.batch_size):
      images = self.model_inputs(slices[start:start + self.batch_size])
      count = len(images)
      # Padded to one batch shape so the step compiles once.
      images = np.concatenate([images, np.zeros((self.batch_size - count, *images.shape[1:]), np.uint8)])
      out = self._eval_fn(self.variables, data.to_global_batch({"image": images}, self._sharding)["image"])
      probs.append(np.asarray(out, np.float32)[:count])
    return np.concatenate(probs)

  def scan_score(self, slice_probs: np.ndarray) -> float:
    """The scan's score from all its slice probabilities: the evaluation's middle slices and rule."""
    rows = pipeline.select_slices(np.asarray([len(slice_probs)]), self.middle_fraction)
    kept = np.asarray(slice_probs)[rows[:, 1]]
    return float(metrics.aggregate_scans(kept, np.zeros(len(kept), np.int64), 1, rule=self.aggregation)[0])

  def predict_scan(self, scan_or_path) -> tuple[float, np.ndarray]:
    """(P(COVID) of the scan, P(COVID) of each slice read) for a scan path, data.ScanRef, data.Scan or
    data.ScanSlices."""
    scan = self.read(scan_or_path)
    if self.scan_inference is not None:
      p_covid, _, slice_probs = self.scan_head_scores(scan)
      return p_covid, slice_probs
    slice_probs = self.slice_probabilities(scan.model_inputs(self.image_size))
    return self.scan_score(slice_probs), slice_probs

  def predict(self, scan_or_ref) -> ScanPrediction:
    """A ScanPrediction for a data.Scan, data.ScanRef or path (raises when it cannot be read)."""
    scan = self.read(scan_or_ref)
    weights = None
    if self.scan_inference is not None:
      p_covid, weights, slice_probs = self.scan_head_scores(scan)
    else:
      p_covid, slice_probs = self.predict_scan(scan)
    return ScanPrediction(scan_id=scan.scan_id, path=pathlib.Path(scan.path or scan.scan_id),
                          p_covid=p_covid, label=int(p_covid > self.threshold), slice_probs=slice_probs,
                          true_label=scan.label, slice_indices=scan.indices, slice_weights=weights)

  def scan_head_scores(self, scan_or_path) -> tuple[float, np.ndarray, np.ndarray]:
    """With a scan head: (P(COVID) of the scan, attention weight of each slice, P(COVID) of each slice alone
    (attention) or in context (transformer)), the head once over the evaluation's middle slices."""
    if self.scan_inference is None:
      raise ValueError("scan_head_scores: this checkpoint's config.model.scan_head is 'mean' (no scan head)")
    scan = self.read(scan_or_path)
    return self.scan_inference.scan(self.variables, self.model_inputs(scan.slices), self.middle_fraction)

  def predict_many(self, inputs: Iterable, *, progress: bool = True
                   ) -> tuple[list[ScanPrediction], list[Failure]]:
    """Predicts every input (Scan, ScanRef or path); one that cannot be read is reported, not fatal."""
    inputs = list(inputs)
    predictions, failures = [], []
    for item in tqdm.tqdm(inputs, desc="predict", unit="scan", disable=not progress, dynamic_ncols=True):
      try:
        predictions.append(self.predict(item))
      except Exception as error:  # pylint: disable=broad-except  (one bad scan must not stop the others)
        path = pathlib.Path(getattr(item, "path", None) or str(item))
        message = str(error) if str(error).startswith(str(path)) else f"{path}: {error}"
        failures.append(Failure(path, f"{message} [{type(error).__name__}]"))
        tqdm.tqdm.write(f"cannot read {failures[-1].message}", file=sys.stderr)
    return predictions, failures



# ------------------------------------------------------------------------------------------------ outputs


def _write_atomic(path: pathlib.Path, rows: Sequence[Sequence], header: Sequence[str] | None) -> pathlib.Path:
  """CSV written to a temporary file beside `path`, then renamed over it."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", newline="") as f:
      writer = csv.writer(f)
      if header:
        writer.writerow(header)
      writer.writerows(rows)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def write_predictions(predictions: Sequence[ScanPrediction], path) -> pathlib.Path:
  """`scan_id,path,n_slices,p_covid,label` (label: predicted, 1 COVID, 0 non-COVID)."""
  return _write_atomic(path, _rows(predictions), CSV_COLUMNS)


def _rows(predictions: Sequence[ScanPrediction]) -> list[tuple]:
  return [(p.scan_id, str(p.path), p.n_slices, repr(float(p.p_covid)), p.label) for p in predictions]


def write_per_slice(predictions: Sequence[ScanPrediction], path) -> pathlib.Path:
  """`scan_id,path,slice_index,p_covid`, slices in body-axis order; with a scan head (attention weights) also
  `attention_weight`, the share of the scan's score each slice carries."""
  weighted = any(p.slice_weights is not None for p in predictions)
  rows = []
  for p in predictions:
    indices = range(len(p.slice_probs)) if p.slice_indices is None else p.slice_indices
    weights = p.slice_weights if p.slice_weights is not None else [float("nan")] * len(p.slice_probs)
    for i, prob, weight in zip(indices, p.slice_probs, weights):
      row = (p.scan_id, str(p.path), int(i), repr(float(prob)))
      rows.append(row + (repr(float(weight)),) if weighted else row)
  return _write_atomic(path, rows, PER_SLICE_COLUMNS + (("attention_weight",) if weighted else ()))


def write_submission(predictions: Sequence[ScanPrediction], folder) -> dict[int, pathlib.Path]:
  """The challenge's format: `covid.csv` and `non-covid.csv`, each listing its scan ids, one per line."""
  ids = [p.scan_id for p in predictions]
  duplicated = sorted({i for i in ids if ids.count(i) > 1})
  if duplicated:
    raise ValueError(f"scan ids occur more than once ({', '.join(duplicated[:5])}); a submission lists each "
                     "scan id once: predict one split (e.g. test/) at a time")
  folder = pathlib.Path(folder)
  return {label: _write_atomic(folder / name, [(p.scan_id,) for p in predictions if p.label == label], None)
          for label, name in SUBMISSION_FILES.items()}


def summary(predictions: Sequence[ScanPrediction], failures: Sequence[Failure], predictor: Predictor) -> str:
  """A few lines: counts per predicted class, failures, and metrics where the true classes are known."""
  covid = sum(p.label for p in predictions)
  lines = [f"predicted {len(predictions)} scans ({covid} COVID, {len(predictions) - covid} non-COVID; "
           f"{predictor.aggregation} of slice probabilities > {predictor.threshold:g})",
           f"threshold {predictor.threshold:g}: {predictor.threshold_source}; test-time augmentation: {predictor.tta}"]
  if failures:
    lines.append(f"{len(failures)} inputs could not be read:")
    lines.extend(f"  {f.message}" for f in failures)
  known = [p for p in predictions if p.true_label is not None]
  if known:
    result = metrics.classification_metrics(np.asarray([p.true_label for p in known]),
                                            np.asarray([p.p_covid for p in known]), threshold=predictor.threshold)
    lines.append(f"on the {len(known)} labelled scans: macro-F1 {result['macro_f1']:.4f}, "
                 f"accuracy {result['accuracy']:.4f}, AUC {result['auc']:.4f}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI


def parse_flags(argv: Sequence[str]):
  """A fresh absl FlagValues parsed from argv (argv[0] is the program), so main() also runs in-process."""
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, "A training workdir, its checkpoints/ folder, or one step folder.",
                      flag_values=fv)
  flags.DEFINE_string("input", None, "A scan (slice-image folder, DICOM series folder, NIfTI file), a folder of "
                      "scans, a COV19-CT-DB split or root.", flag_values=fv)
  flags.DEFINE_string("out", None, "CSV with one row per scan (scan_id,path,n_slices,p_covid,label); "
                      "default: printed to stdout.", flag_values=fv)
  flags.DEFINE_string("per_slice", None, "CSV with every slice's probability (scan_id,path,slice_index,p_covid).",
                      flag_values=fv)
  flags.DEFINE_string("submission", None, "Folder for the challenge submission: covid.csv and non-covid.csv.",
                      flag_values=fv)
  flags.DEFINE_enum("aggregation", None, ["mean", "vote"], "Scan rule; default: the checkpoint's config.eval.",
                    flag_values=fv)
  flags.DEFINE_string("threshold", None, "COVID when the scan score is above this number; 'best': the threshold "
                      "that maximised validation scan macro-F1 at the checkpoint's evaluation; default: the "
                      "checkpoint's config.eval.threshold.", flag_values=fv)
  flags.DEFINE_enum("tta", None, list(evaluate.TTA_MODES), "Test-time augmentation: flip = mean slice probability "
                    "over the slice and its left-right mirror; default: the checkpoint's config.eval.tta.",
                    flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Slices per forward pass; default: config.eval.batch_size.",
                       flag_values=fv)
  flags.DEFINE_boolean("progress", True, "Show a progress bar over the scans.", flag_values=fv)
  flags.DEFINE_boolean("cpu_ynnpack", False, "XLA's YNNPACK convolution fusions on CPU (default off: Eigen's "
                       "convolutions, faster on the machines measured; resdense_jax/cpu_flags.py).", flag_values=fv)
  flags.DEFINE_string("compilation_cache_dir", compilation_cache.DEFAULT_DIR, "Persistent XLA compilation "
                      "cache (a second run reads its compiled programs back); empty: off.", flag_values=fv)
  flags.mark_flags_as_required(["checkpoint", "input"], flag_values=fv)
  extra = fv(list(argv))[1:]
  if extra:
    raise flags.Error(f"unexpected arguments: {' '.join(extra)}")
  threshold_flag(fv.threshold)  # a malformed --threshold is a usage error
  return fv


def threshold_flag(value: str | None) -> float | str | None:
  """--threshold's value: None (the checkpoint's), "best", or a number."""
  if value is None or value == "best":
    return value
  try:
    return float(value)
  except ValueError:
    raise flags.Error(f"--threshold must be a number or 'best', got {value!r}") from None


def main(argv: Sequence[str]) -> int:
  """The command line; returns the exit status (1 when nothing could be read)."""
  try:
    fl = parse_flags(argv)
  except flags.Error as error:
    print(f"error: {error}\nusage: python -m resdense_jax.predict --checkpoint=DIR --input=PATH "
          "[--out=FILE.csv] [--per_slice=FILE.csv] [--submission=DIR] [--aggregation=mean|vote] "
          "[--threshold=T|best] [--tta=none|flip]", file=sys.stderr)
    return 2
  try:
    refs = find_scans(fl.input)
  except (OSError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  cpu_flags.set_ynnpack(fl.cpu_ynnpack)  # before anything starts a JAX backend
  compilation_cache.enable(fl.compilation_cache_dir)
  try:
    predictor = Predictor.from_checkpoint(fl.checkpoint, aggregation=fl.aggregation,
                                          threshold=threshold_flag(fl.threshold), batch_size=fl.batch_size,
                                          tta=fl.tta)
  except ValueError as error:  # e.g. --threshold=best on a checkpoint that records no threshold
    print(f"error: {error}", file=sys.stderr)
    return 1
  predictions, failures = predictor.predict_many(refs, progress=fl.progress)
  print(summary(predictions, failures, predictor), file=sys.stderr)
  if not predictions:
    print(f"error: none of the {len(refs)} inputs under {fl.input} could be read", file=sys.stderr)
    return 1
  if fl.out:
    print(f"wrote {write_predictions(predictions, fl.out)}", file=sys.stderr)
  else:
    writer = csv.writer(sys.stdout)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(_rows(predictions))
  if fl.per_slice:
    print(f"wrote {write_per_slice(predictions, fl.per_slice)}", file=sys.stderr)
  if fl.submission:
    files = write_submission(predictions, fl.submission)
    print(f"wrote {files[1]} and {files[0]}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
