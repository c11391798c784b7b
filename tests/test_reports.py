"""Training reports: PNGs from a real (tiny) run, numbers checked against its metrics.jsonl and scikit-learn."""

import json

import numpy as np
import pytest
from PIL import Image

from resdense_jax import reports
from test_predict_fixtures import trained_workdir


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
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {r["phase_name"] for r in records} == {"head", "finetune"}  # both phases appear in the curves
  best = next(r for r in records if r["step"] == report["best_step"])
  assert report["best_val_scan_macro_f1"] == best["val_scan_macro_f1"]
  assert report["best_val_scan_macro_f1"] == max(r["val_scan_macro_f1"] for r in records)
  # Re-running the best checkpoint over the validation scans reproduces the training engine's evaluation.
  assert report["confusion_matrix_values"] == best["val_scan_confusion_matrix"]
  assert report["auc"] == pytest.approx(best["val_scan_auc"], abs=1e-9, nan_ok=True)
  rows = report["validation_predictions"].read_text().splitlines()
  assert rows[0] == "scan_id,path,n_slices,p_covid,label" and len(rows) - 1 == best["val_num_scans"]


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
