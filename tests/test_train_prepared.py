"""Training from a prepared TFDS copy (config.data.prepared_dir) sees the same scans as training from folders."""

import json

from demo_configs import tiny_collection, tiny_config

from resdense_jax import data, reports, train


def test_train_and_evaluate_from_prepared_data(tmp_path):
  root = tiny_collection(tmp_path / "ct")
  prepared = data.prepare_dataset(root, tmp_path / "prepared", image_size=32, progress=False)
  config = tiny_config()
  config.data.prepared_dir = str(tmp_path / "prepared")
  config.phases[1].epochs = 1
  result = train.train_and_evaluate(config, tmp_path / "run")
  assert prepared.is_dir()
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["phase"] for r in records] == [0, 1]
  assert 0.0 <= result["best_val_scan_macro_f1"] <= 1.0
  # The prepared split is the folder split: same validation scans, by id and label.
  folders = data.discover(root).validation
  prepared_val = data.PreparedData(tmp_path / "prepared", "validation", image_size=32).scans
  assert sorted((s.scan_id, s.label) for s in prepared_val) == sorted((s.scan_id, s.label) for s in folders)
  # Reports find the validation scans through the prepared copy's record of their folders.
  predictions = reports.validation_predictions(tmp_path / "run")
  assert sorted(p.scan_id for p in predictions) == sorted(s.scan_id for s in folders)
