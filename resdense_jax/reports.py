"""Training reports: PNG plots of a finished (or running) training workdir.

    python -m resdense_jax.reports --workdir=runs/demo

reads `<workdir>/metrics.jsonl` (one record per evaluation, written by `train.train_and_evaluate`) and the best
checkpoint, and writes into `<workdir>/report/`:

  training_curves.png        training loss and validation scan macro-F1 per epoch, each phase shaded
  confusion_matrix.png       the best checkpoint on the validation scans
  roc_curve.png              the same, as a ROC curve with its AUC
  validation_predictions.csv the best checkpoint's per-scan probabilities behind both (predict.py's format)

The training loop records the confusion matrix but not per-scan scores, so the best checkpoint is run again over
the validation scans of the run's config (same data root, split and seed), through `predict.Predictor`, which
computes exactly what the evaluation step computes; the confusion matrix is checked against the recorded one.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Sequence

import numpy as np
from absl import flags

from resdense_jax import checkpoints, data, metrics, plotting, predict
from resdense_jax.data import sources

REPORT_DIR = "report"
PHASE_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


# --------------------------------------------------------------------------------------------------- data


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The evaluation records of `<workdir>/metrics.jsonl`, in step order."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: missing; train.train_and_evaluate writes it after each evaluation")
  records = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: not a JSON record ({error})") from error
  if not records:
    raise ValueError(f"{path}: no evaluation records yet")
  return sorted(records, key=lambda r: r["step"])


def best_step(workdir: str | os.PathLike, metric: str = "val_scan_macro_f1") -> int:
  """The step of the best checkpoint, as the checkpoint manager (and load_for_inference) picks it."""
  return checkpoints.best_step(pathlib.Path(workdir) / "checkpoints", metric)


def validation_predictions(workdir: str | os.PathLike, predictor=None) -> list:
  """predict.ScanPrediction of the best checkpoint for each validation scan of the run's config."""
  workdir = pathlib.Path(workdir)
  predictor = predictor or predict.Predictor.from_checkpoint(workdir)
  config = predictor.config
  if config.data.get("prepared_dir"):
    # The prepared copy records each scan's original folder; the predictor reads the scans from there.
    root = pathlib.Path(config.data.prepared_dir)
    scans = data.PreparedData(root, "validation", image_size=config.data.image_size).scans
  else:
    root = sources.resolve_data_root(config, workdir)
    scans = data.discover(root, val_fraction=config.data.val_fraction, seed=config.seed).validation
  if not scans:
    raise ValueError(f"{root}: no validation scans")
  predictions, failures = predictor.predict_many(scans, progress=True)
  if failures:
    raise ValueError(f"{len(failures)} validation scans could not be read, e.g. {failures[0].message}")
  return predictions


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(false positive rate, true positive rate, thresholds), one point per distinct score, from (0, 0).

  A scan counts as positive at threshold t when its score is >= t (sklearn.metrics.roc_curve's convention).
  """
  labels = np.asarray(labels, np.int64)
  scores = np.asarray(scores, np.float64)
  positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
  if not positives or not negatives:
    raise ValueError(f"a ROC curve needs both classes, got {positives} COVID and {negatives} non-COVID scans")
  order = np.argsort(-scores, kind="mergesort")
  scores, labels = scores[order], labels[order]
  last_of_run = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
  tp = np.cumsum(labels == 1)[last_of_run]
  fp = np.cumsum(labels == 0)[last_of_run]
  fpr = np.r_[0.0, fp / negatives]
  tpr = np.r_[0.0, tp / positives]
  return fpr, tpr, np.r_[np.inf, scores[last_of_run]]


# ---------------------------------------------------------------------------------------------- plotting


def _shade_phases(ax, records: Sequence[dict]) -> None:
  """Each phase's epochs as a shaded band labelled with the phase name; epoch e spans (e - 1, e]."""
  phases: dict[int, list] = {}
  for r in records:
    phases.setdefault(int(r.get("phase", 0)), []).append(r)
  for index, members in sorted(phases.items()):
    first, last = min(r["epoch"] for r in members), max(r["epoch"] for r in members)
    name = members[0].get("phase_name", f"phase {index}")
    ax.axvspan(first - 1, last, color=PHASE_COLOURS[index % len(PHASE_COLOURS)], alpha=0.12,
               label=f"phase {index + 1}: {name}")
    if index:
      ax.axvline(first - 1, color="grey", linestyle="--", linewidth=0.8)


def plot_training_curves(records: Sequence[dict], path, *, best: int | None = None,
                         metric: str = "val_scan_macro_f1") -> pathlib.Path:
  """Training loss (top) and validation scan macro-F1 (bottom) per epoch, phases shaded, best marked."""
  plt = plotting.pyplot()
  epochs = np.asarray([r["epoch"] for r in records], np.float64)
  fig, (ax_loss, ax_f1) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True, dpi=110)
  _shade_phases(ax_loss, records)
  ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", color="black", label="training loss")
  ax_loss.set_ylabel("loss (mean over the epoch)")
  ax_loss.set_title("Training loss per epoch")
  ax_loss.grid(alpha=0.3)
  ax_loss.legend(loc="best", fontsize=8, framealpha=0.9)
  _shade_phases(ax_f1, records)
  values = [r.get(metric, np.nan) for r in records]
  ax_f1.plot(epochs, values, "o-", color="tab:blue", label=f"validation {metric.removeprefix('val_')}")
  best_records = [r for r in records if r["step"] == best]
  if best_records:
    b = best_records[0]
    ax_f1.plot([b["epoch"]], [b[metric]], marker="*", markersize=16, color="gold", markeredgecolor="black",
               linestyle="none", label=f"best checkpoint: {b[metric]:.3f} (step {b['step']})")
  ax_f1.set_ylim(-0.02, 1.02)
  ax_f1.set_xlabel("epoch")
  ax_f1.set_ylabel("scan macro-F1")
  ax_f1.set_title("Validation scan macro-F1 per epoch")
  ax_f1.grid(alpha=0.3)
  ax_f1.legend(loc="best", fontsize=8, framealpha=0.9)
  ax_f1.set_xlim(0, max(epochs.max(), 1) + 0.2)
  ax_f1.xaxis.get_major_locator().set_params(integer=True)
  return plotting.save_figure(fig, path)


def plot_confusion_matrix(cm, path, *, title: str) -> pathlib.Path:
  """2x2 confusion matrix [[TN, FP], [FN, TP]] with counts and row percentages."""
  plt = plotting.pyplot()
  cm = np.asarray(cm, np.int64)
  fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=110)
  image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
  bar = fig.colorbar(image, ax=ax, label="scans")
  bar.ax.yaxis.get_major_locator().set_params(integer=True)
  names = ["non-COVID", "COVID"]
  ax.set_xticks([0, 1], [f"predicted\n{n}" for n in names])
  ax.set_yticks([0, 1], [f"true\n{n}" for n in names])
  rows = np.maximum(cm.sum(axis=1, keepdims=True), 1)
  for i in range(2):
    for j in range(2):
      dark = cm[i, j] > cm.max() / 2
      ax.text(j, i, f"{cm[i, j]}\n({100 * cm[i, j] / rows[i, 0]:.0f}%)", ha="center", va="center",
              color="white" if dark else "black", fontsize=12)
  ax.set_title(title, fontsize=10)
  return plotting.save_figure(fig, path)


def plot_roc(labels, scores, path, *, title: str, threshold: float | None = None) -> pathlib.Path:
  """ROC curve of scan scores, with the AUC, the chance diagonal and the operating point at `threshold`."""
  plt = plotting.pyplot()
  fpr, tpr, _ = roc_curve(labels, scores)
  auc = metrics.roc_auc(np.asarray(labels), np.asarray(scores))
  fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
  ax.plot(fpr, tpr, "o-", drawstyle="default", color="tab:red", markersize=3, label=f"model (AUC {auc:.3f})")
  ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
  if threshold is not None:
    labels_, predicted = np.asarray(labels), np.asarray(scores) > threshold
    point = (predicted[labels_ == 0].mean(), predicted[labels_ == 1].mean())
    ax.plot(*point, "s", color="black", markersize=8, label=f"operating point (score > {threshold:g})")
  ax.set_xlim(-0.02, 1.02)
  ax.set_ylim(-0.02, 1.02)
  ax.set_aspect("equal")
  ax.set_xlabel("false positive rate (1 - specificity)")
  ax.set_ylabel("true positive rate (sensitivity)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  return plotting.save_figure(fig, path)


# ------------------------------------------------------------------------------------------------- report


def write_training_report(workdir: str | os.PathLike, *, out_dir: str | os.PathLike | None = None) -> dict:
  """Writes the report PNGs (and the best checkpoint's validation predictions) for `workdir`.

  Returns {"training_curves", "confusion_matrix", "roc_curve", "validation_predictions": paths,
  "best_step": int, "best_val_scan_macro_f1": float (as recorded), "report_dir": path,
  "confusion_matrix_values": [[TN, FP], [FN, TP]] of the re-run, "auc": float}.
  """
  workdir = pathlib.Path(workdir)
  out = pathlib.Path(out_dir) if out_dir else workdir / REPORT_DIR
  records = read_metrics(workdir)
  predictor = predict.Predictor.from_checkpoint(workdir)
  metric = predictor.config.eval.get("best_metric", "val_scan_macro_f1")
  step = best_step(workdir, metric)
  best = next((r for r in records if r["step"] == step), None)
  if best is None:
    raise ValueError(f"{workdir}/metrics.jsonl has no record of the best checkpoint's step {step}")
  result = {"report_dir": out, "best_step": step, "best_epoch": best["epoch"],
            "best_phase": best.get("phase_name"), "best_" + metric: float(best[metric])}
  result["training_curves"] = plot_training_curves(records, out / "training_curves.png", best=step, metric=metric)

  predictions = validation_predictions(workdir, predictor)
  result["validation_predictions"] = predict.write_predictions(predictions, out / "validation_predictions.csv")
  labels = np.asarray([p.true_label for p in predictions], np.int64)
  scores = np.asarray([p.p_covid for p in predictions], np.float64)
  scan_metrics = metrics.classification_metrics(labels, scores, threshold=predictor.threshold)
  cm = scan_metrics["confusion_matrix"]
  recorded = best.get("val_scan_confusion_matrix")
  if recorded is not None and np.asarray(recorded).tolist() != cm:
    print(f"warning: the best checkpoint's confusion matrix on the validation scans now is {cm}, the training "
          f"run recorded {recorded} (has the data under the run's data root changed?)", file=sys.stderr)
  result["confusion_matrix_values"] = cm
  result["auc"] = scan_metrics["auc"]
  subtitle = f"best checkpoint (step {step}, epoch {best['epoch']}), {len(predictions)} validation scans"
  result["confusion_matrix"] = plot_confusion_matrix(
      cm, out / "confusion_matrix.png",
      title=f"Confusion matrix, scan macro-F1 {scan_metrics['macro_f1']:.3f}\n{subtitle}")
  result["roc_curve"] = plot_roc(labels, scores, out / "roc_curve.png", title=f"ROC curve\n{subtitle}",
                                 threshold=predictor.threshold)
  return result


def describe(result: dict, metric: str = "val_scan_macro_f1") -> str:
  """The lines `make demo` prints at its end."""
  names = ("training_curves", "confusion_matrix", "roc_curve", "validation_predictions")
  lines = [f"training report in {result['report_dir']}:"]
  lines += [f"  {pathlib.Path(result[name]).name}" for name in names]
  lines.append(f"best validation scan macro-F1 {result['best_' + metric]:.4f} at step {result['best_step']} "
               f"(epoch {result['best_epoch']}, phase {result['best_phase']}); validation AUC {result['auc']:.4f}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Training workdir (metrics.jsonl, checkpoints/).", flag_values=fv)
  flags.DEFINE_string("out", None, "Folder for the PNGs; default <workdir>/report.", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  try:
    extra = fv(list(argv))[1:]
    if extra:
      raise flags.Error(f"unexpected arguments: {' '.join(extra)}")
  except flags.Error as error:
    print(f"error: {error}\nusage: python -m resdense_jax.reports --workdir=DIR [--out=DIR]", file=sys.stderr)
    return 2
  try:
    result = write_training_report(fv.workdir, out_dir=fv.out)
  except (OSError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(describe(result))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
