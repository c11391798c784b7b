"""Training reports: PNGs from a real (tiny) run, numbers checked against its metrics.jsonl and scikit-learn."""

import csv

import numpy as np
import pytest
from PIL import Image

from resdense_jax import checkpoints, data, predict, reports
from test_predict_fixtures import checkpoint_steps, read_records, trained_workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def report(workdir, tmp_path_factory):
  return reports.write_training_report(workdir, out_dir=tmp_path_factory.mktemp("report"))


def test_report_pngs_exist_and_decode(report):
  for name in ("training_curves", "confusion_matrix", "roc_curve"):
    with Image.open(report[name]) as image:
      image.load()
      assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 300, name


def test_report_matches_the_recorded_evaluation(workdir, report):
  records = read_records(workdir)
  assert {r["phase_name"] for r in records.values()} == {"head", "finetune", "overshoot"}  # all in the curves
  best_step, latest_step = checkpoint_steps(workdir)
  assert report["best_step"] == best_step != latest_step
  best, latest = records[best_step], records[latest_step]
  assert report["best_val_scan_macro_f1"] == best["val_scan_macro_f1"]
  assert report["best_val_scan_macro_f1"] == max(r["val_scan_macro_f1"] for r in records.values())
  # Re-running the best checkpoint over the validation scans reproduces the training engine's evaluation
  # of that step (the latest step's differs, so this also shows which checkpoint the report ran).
  assert report["confusion_matrix_values"] == best["val_scan_confusion_matrix"]
  assert latest["val_scan_confusion_matrix"] != best["val_scan_confusion_matrix"]
  assert report["auc"] == pytest.approx(best["val_scan_auc"], abs=1e-9, nan_ok=True)
  rows = report["validation_predictions"].read_text().splitlines()
  assert rows[0] == "scan_id,path,n_slices,p_covid,label" and len(rows) - 1 == best["val_num_scans"]


def test_report_predictions_are_the_best_steps(workdir, report):
  """validation_predictions.csv: what the best step's own variables predict, scan by scan."""
  best_step, _ = checkpoint_steps(workdir)
  best = predict.Predictor(*checkpoints.load_for_inference(workdir / "checkpoints" / str(best_step)))
  with open(report["validation_predictions"], newline="") as f:
    rows = {r["scan_id"]: r for r in csv.DictReader(f)}
  scans = data.discover(workdir / "synthetic_ct").validation
  assert sorted(rows) == sorted(ref.scan_id for ref in scans)
  labels = []
  for ref in scans:
    p_covid, slice_probs = best.predict_scan(ref.path)
    row = rows[ref.scan_id]
    assert float(row["p_covid"]) == pytest.approx(p_covid, abs=1e-6), ref.scan_id
    assert int(row["n_slices"]) == len(slice_probs)
    assert int(row["label"]) == int(p_covid > best.threshold)
    labels.append(int(row["label"]))
  assert set(labels) == {0, 1}  # the report's confusion matrix has both predicted columns filled


def test_roc_curve_matches_sklearn():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 40)
  scores = np.round(rng.random(40), 1)  # ties
  fpr, tpr, thresholds = reports.roc_curve(labels, scores)
  want_fpr, want_tpr, want_thresholds = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, want_fpr)
  np.testing.assert_allclose(tpr, want_tpr)
  np.testing.assert_allclose(thresholds[1:], want_thresholds[1:])
  with pytest.raises(ValueError, match="both classes"):
    reports.roc_curve([1, 1], [0.2, 0.3])


def test_cli_prints_where_the_report_is(workdir, tmp_path, capsys):
  assert reports.main(["reports", f"--workdir={workdir}", f"--out={tmp_path}"]) == 0
  printed = capsys.readouterr().out
  assert f"training report in {tmp_path}" in printed and "best validation scan macro-F1" in printed
  assert (tmp_path / "roc_curve.png").is_file()
  assert reports.main(["reports", f"--workdir={tmp_path / 'nothing'}"]) == 1
