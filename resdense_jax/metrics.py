"""Scan-level aggregation of slice probabilities, and the classification metrics (NumPy, host side).

Labels: 1 = COVID (the positive class), 0 = non-COVID. A prediction is positive when its score is above the
threshold (Keras's `binary_accuracy` convention: 0.5 counts as negative).
"""

from __future__ import annotations

import numpy as np

AGGREGATIONS = ("mean", "vote")


def aggregate_scans(slice_probs: np.ndarray, scan_index: np.ndarray, num_scans: int, *,
                    rule: str = "mean") -> np.ndarray:
  """Scan scores from slice probabilities.

  rule "mean": the mean slice probability (the paper's rule).
  rule "vote": round each slice to 0/1, then average (the authors' code): the fraction of COVID slices.
  A scan without any slice gets NaN (caller's error: the evaluation must see every scan).
  """
  slice_probs = np.asarray(slice_probs, np.float64)
  scan_index = np.asarray(scan_index, np.int64)
  if rule == "mean":
    values = slice_probs
  elif rule == "vote":
    values = (slice_probs > 0.5).astype(np.float64)
  else:
    raise ValueError(f"unknown scan aggregation rule {rule!r}; choose one of {AGGREGATIONS}")
  sums = np.bincount(scan_index, weights=values, minlength=num_scans)
  counts = np.bincount(scan_index, minlength=num_scans)
  with np.errstate(invalid="ignore", divide="ignore"):
    return sums / counts


def confusion_matrix(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
  """[[TN, FP], [FN, TP]], as sklearn.metrics.confusion_matrix(labels=[0, 1])."""
  labels = np.asarray(labels, np.int64)
  preds = np.asarray(preds, np.int64)
  cm = np.zeros((2, 2), np.int64)
  np.add.at(cm, (labels, preds), 1)
  return cm


def _safe_div(a: float, b: float) -> float:
  """a / b, 0 when b is 0 (sklearn's zero_division=0)."""
  return float(a) / float(b) if b else 0.0


def f1_per_class(cm: np.ndarray) -> tuple[float, float]:
  """(F1 of non-COVID, F1 of COVID) from a 2x2 confusion matrix."""
  (tn, fp), (fn, tp) = cm
  f1_covid = _safe_div(2 * tp, 2 * tp + fp + fn)
  f1_noncovid = _safe_div(2 * tn, 2 * tn + fn + fp)
  return f1_noncovid, f1_covid


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); NaN with a single class."""
  labels = np.asarray(labels, np.int64)
  scores = np.asarray(scores, np.float64)
  n_pos = int((labels == 1).sum())
  n_neg = int((labels == 0).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  # Average rank (1-based) over each run of tied scores.
  starts = np.flatnonzero(np.r_[True, np.diff(sorted_scores) != 0])
  ends = np.r_[starts[1:], len(scores)]
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + 1 + e) / 2.0
  u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def classification_metrics(labels: np.ndarray, scores: np.ndarray, *, threshold: float = 0.5) -> dict:
  """Per-class F1, macro F1, accuracy, precision/recall of COVID, ROC AUC and the confusion matrix."""
  labels = np.asarray(labels, np.int64)
  scores = np.asarray(scores, np.float64)
  preds = (scores > threshold).astype(np.int64)
  cm = confusion_matrix(labels, preds)
  (tn, fp), (fn, tp) = cm
  f1_noncovid, f1_covid = f1_per_class(cm)
  return {
      "macro_f1": (f1_covid + f1_noncovid) / 2.0,
      "f1_covid": f1_covid,
      "f1_noncovid": f1_noncovid,
      "accuracy": _safe_div(tp + tn, cm.sum()),
      "precision": _safe_div(tp, tp + fp),
      "recall": _safe_div(tp, tp + fn),
      "auc": roc_auc(labels, scores),
      "confusion_matrix": cm.tolist(),
  }


def best_threshold(labels: np.ndarray, scores: np.ndarray, *, prefer: float = 0.5) -> tuple[float, float]:
  """(threshold, macro-F1 there): the threshold maximising macro-F1 of `score > threshold`.

  Every split of the sorted distinct scores into "non-COVID below, COVID above" is tried (the only
  thresholds that give different predictions). The threshold returned for a split is the midpoint of the gap
  between the highest score it calls non-COVID and the lowest it calls COVID (the middle of the gap, not a
  score that sits on its edge); the outermost splits use the midpoints towards 0 and 1. When several splits
  reach the same macro-F1 (within 1e-12), the one whose threshold is nearest `prefer` wins (the configured
  threshold, 0.5), and of two equally near the lower one. Macro-F1 as `classification_metrics` computes it
  (both classes, 0 where a class has no true and no predicted scan).
  """
  labels = np.asarray(labels, np.int64)
  scores = np.asarray(scores, np.float64)
  if not len(scores) or not np.isfinite(scores).all():
    raise ValueError(f"the threshold search needs finite scores, got {len(scores)} scores")
  distinct, inverse = np.unique(scores, return_inverse=True)
  # Split k (0..K) calls the k lowest distinct scores non-COVID: fn / tn count those scores' labels.
  fn = np.r_[0, np.cumsum(np.bincount(inverse, weights=labels == 1, minlength=len(distinct)))]
  tn = np.r_[0, np.cumsum(np.bincount(inverse, weights=labels == 0, minlength=len(distinct)))]
  tp, fp = fn[-1] - fn, tn[-1] - tn
  with np.errstate(invalid="ignore", divide="ignore"):
    f1_covid = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    f1_noncovid = np.where(2 * tn + fn + fp > 0, 2 * tn / (2 * tn + fn + fp), 0.0)
  macro = (f1_covid + f1_noncovid) / 2.0
  lower = np.r_[0.0 if distinct[0] > 0 else np.nextafter(distinct[0], -np.inf), distinct]
  upper = np.r_[distinct, max(1.0, distinct[-1])]
  thresholds = (lower + upper) / 2.0
  # A midpoint must stay in [lower, upper): rounding can land it on `upper` for adjacent floats.
  thresholds = np.where(thresholds >= upper, lower, thresholds)
  candidates = np.flatnonzero(macro >= macro.max() - 1e-12)
  distance = np.abs(thresholds[candidates] - prefer)
  best = candidates[np.flatnonzero(distance == distance.min())[0]]  # ascending: the lower of two
  return float(thresholds[best]), float(macro[best])


def scan_and_slice_metrics(slice_probs: np.ndarray, slice_labels: np.ndarray, scan_index: np.ndarray,
                           scan_labels: np.ndarray, *, rule: str = "mean", threshold: float = 0.5) -> dict:
  """Everything reported after an evaluation: "scan_*" metrics on aggregated scores, and slice accuracy."""
  scan_scores = aggregate_scans(slice_probs, scan_index, len(scan_labels), rule=rule)
  if np.isnan(scan_scores).any():
    missing = np.flatnonzero(np.isnan(scan_scores))
    raise ValueError(f"{len(missing)} scans got no slice in the evaluation (first: scan index {missing[0]})")
  return scored_scan_metrics(scan_scores, scan_labels, slice_probs, slice_labels, threshold=threshold)


def scored_scan_metrics(scan_scores: np.ndarray, scan_labels: np.ndarray, slice_probs: np.ndarray,
                        slice_labels: np.ndarray, *, threshold: float = 0.5) -> dict:
  """The keys of `scan_and_slice_metrics` from scan scores given directly (a scan head's, or aggregated)."""
  scan_labels = np.asarray(scan_labels, np.int64)
  scan_scores = np.asarray(scan_scores, np.float64)
  result = {f"scan_{k}": v for k, v in classification_metrics(scan_labels, scan_scores, threshold=threshold).items()}
  # The threshold a user may prefer to the configured one (predict --threshold=best reads the best checkpoint's).
  result["scan_best_threshold"], result["scan_best_threshold_macro_f1"] = best_threshold(
      scan_labels, scan_scores, prefer=threshold)
  slice_preds = (np.asarray(slice_probs) > 0.5).astype(np.int64)
  result["slice_accuracy"] = float((slice_preds == np.asarray(slice_labels, np.int64)).mean())
  result["num_scans"] = int(len(scan_labels))
  result["num_slices"] = int(len(slice_probs))
  return result
