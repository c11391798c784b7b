"""Scan aggregation and every metric against scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics as skm

from resdense_jax import metrics


def _random_case(seed, n=40, ties=False):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, size=n)
  scores = np.clip(labels * 0.3 + rng.uniform(0, 0.7, size=n), 0, 1)
  if ties:
    scores = np.round(scores, 1)
  return labels, scores


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True), (3, False)])
def test_classification_metrics_equal_sklearn(seed, ties):
  labels, scores = _random_case(seed, ties=ties)
  preds = (scores > 0.5).astype(int)
  got = metrics.classification_metrics(labels, scores, threshold=0.5)
  f1 = skm.f1_score(labels, preds, average=None, labels=[0, 1], zero_division=0)
  assert got["f1_noncovid"] == pytest.approx(f1[0])
  assert got["f1_covid"] == pytest.approx(f1[1])
  assert got["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro", zero_division=0))
  assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
  assert got["precision"] == pytest.approx(skm.precision_score(labels, preds, zero_division=0))
  assert got["recall"] == pytest.approx(skm.recall_score(labels, preds, zero_division=0))
  assert got["auc"] == pytest.approx(skm.roc_auc_score(labels, scores))
  assert got["confusion_matrix"] == skm.confusion_matrix(labels, preds, labels=[0, 1]).tolist()


def test_degenerate_cases_match_sklearn_zero_division():
  labels = np.array([0, 0, 0, 0])
  scores = np.array([0.1, 0.2, 0.9, 0.3])
  got = metrics.classification_metrics(labels, scores)
  preds = (scores > 0.5).astype(int)
  assert got["f1_covid"] == skm.f1_score(labels, preds, zero_division=0)
  assert got["precision"] == skm.precision_score(labels, preds, zero_division=0)
  assert got["recall"] == skm.recall_score(labels, preds, zero_division=0)
  assert np.isnan(got["auc"])  # one class: undefined (sklearn raises)


def test_threshold_is_strict():
  got = metrics.classification_metrics(np.array([1, 0]), np.array([0.5, 0.2]))
  assert got["confusion_matrix"] == [[1, 0], [1, 0]]


def test_mean_and_vote_aggregation():
  rng = np.random.default_rng(0)
  scan_index = np.repeat(np.arange(6), [3, 5, 1, 4, 7, 2])
  probs = rng.uniform(size=len(scan_index))
  mean = metrics.aggregate_scans(probs, scan_index, 6, rule="mean")
  vote = metrics.aggregate_scans(probs, scan_index, 6, rule="vote")
  for i in range(6):
    assert mean[i] == pytest.approx(probs[scan_index == i].mean())
    assert vote[i] == pytest.approx((probs[scan_index == i] > 0.5).mean())
  with pytest.raises(ValueError, match="unknown scan aggregation"):
    metrics.aggregate_scans(probs, scan_index, 6, rule="max")


def test_scan_and_slice_metrics_end_to_end_against_sklearn():
  rng = np.random.default_rng(5)
  counts = rng.integers(2, 9, size=20)
  scan_labels = rng.integers(0, 2, size=20)
  scan_index = np.repeat(np.arange(20), counts)
  slice_labels = scan_labels[scan_index]
  probs = np.clip(slice_labels * 0.35 + rng.uniform(0, 0.65, size=len(scan_index)), 0, 1)
  got = metrics.scan_and_slice_metrics(probs, slice_labels, scan_index, scan_labels, rule="mean")
  scan_scores = np.array([probs[scan_index == i].mean() for i in range(20)])
  scan_preds = (scan_scores > 0.5).astype(int)
  assert got["scan_macro_f1"] == pytest.approx(skm.f1_score(scan_labels, scan_preds, average="macro"))
  assert got["scan_auc"] == pytest.approx(skm.roc_auc_score(scan_labels, scan_scores))
  assert got["slice_accuracy"] == pytest.approx(skm.accuracy_score(slice_labels, (probs > 0.5).astype(int)))
  assert got["num_scans"] == 20 and got["num_slices"] == len(probs)
  with pytest.raises(ValueError, match="got no slice"):
    metrics.scan_and_slice_metrics(probs[:3], slice_labels[:3], scan_index[:3], scan_labels)
