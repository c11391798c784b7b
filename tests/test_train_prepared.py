"""Training from a prepared TFDS copy (config.data.prepared_dir) is training from the folders it was made from."""

import json

import pytest
from demo_configs import tiny_collection, tiny_config

from resdense_jax import checkpoints, data, metric_writer, reports, train

import trees


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_and_evaluate_from_prepared_data_equals_the_folder_run(tmp_path):
  root = tiny_collection(tmp_path / "ct")
  # PNG: lossless, and the slices are already 32 px, so the prepared copy holds exactly the pixels the folder
  # pipeline decodes.
  prepared = data.prepare_dataset(root, tmp_path / "prepared", image_size=32, encoding="png", progress=False)
  config = tiny_config()
  config.phases[1].epochs = 1
  config.data.root = str(root)
  from_folders = train.train_and_evaluate(config, tmp_path / "folders")
  config.data.root = ""
  config.data.prepared_dir = str(tmp_path / "prepared")
  result = train.train_and_evaluate(config, tmp_path / "run")
  assert prepared.is_dir()

  # The prepared split is the folder split: same validation scans, by id and label.
  folders = data.discover(root).validation
  prepared_val = data.PreparedData(tmp_path / "prepared", "validation", image_size=32).scans
  assert sorted((s.scan_id, s.label) for s in prepared_val) == sorted((s.scan_id, s.label) for s in folders)
  # Same slices in the same order, so the same run: every metric and the final weights.
  records, reference = _records(tmp_path / "run"), _records(tmp_path / "folders")
  assert [r["phase"] for r in records] == [0, 1] and [r["step"] for r in records] == [r["step"] for r in reference]
  for got, want in zip(records, reference):
    assert got.keys() == want.keys()
    for key, value in want.items():
      if key in metric_writer.TIMING_FIELDS:
        continue
      assert got[key] == (pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value), key
  assert result["best_step"] == from_folders["best_step"]
  _, ours, _ = checkpoints.load_for_inference(tmp_path / "run" / "checkpoints" / str(result["step"]))
  _, theirs, _ = checkpoints.load_for_inference(tmp_path / "folders" / "checkpoints" / str(result["step"]))
  trees.assert_trees_close(ours, theirs, rtol=1e-5, atol=1e-6)
  # Reports find the validation scans through the prepared copy's record of their folders.
  predictions = reports.validation_predictions(tmp_path / "run")
  assert sorted(p.scan_id for p in predictions) == sorted(s.scan_id for s in folders)
