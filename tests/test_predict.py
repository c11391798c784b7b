"""Prediction: every input form, the CSV / per-slice / submission formats, and equality with the eval step."""

import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest

import trees
from resdense_jax import checkpoints, data, evaluate, metrics, predict, train
from test_predict_fixtures import (REPO, SHARED_DATA, THRESHOLD, checkpoint_steps, demo_config,  # noqa: F401
                                   predictor, validation_scans, validation_scores, workdir)  # (fixtures)


@pytest.fixture(scope="module")
def collection(workdir):
  return data.discover(workdir / "synthetic_ct")


def _eval_step_slices(predictor, refs, middle_fraction):
  """The training engine's evaluation path: eval_pipeline -> compiled eval_step -> predict_slices."""
  config = predictor.config
  mesh = train.create_mesh()
  eval_fn = train.compile_eval_step(predictor.model, mesh)
  dataset = data.eval_pipeline(refs, image_size=config.data.image_size, batch_size=config.eval.batch_size,
                               middle_fraction=middle_fraction)
  return evaluate.predict_slices(eval_fn, predictor.variables, dataset, train.data_sharded(mesh))


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))


@pytest.mark.parametrize("middle_fraction", [1.0, 0.5])
def test_predict_scan_equals_eval_step(predictor, collection, middle_fraction):
  refs = collection.validation
  predictor.middle_fraction = middle_fraction
  try:
    got = [predictor.predict_scan(ref.path) for ref in refs]
  finally:
    predictor.middle_fraction = predictor.config.eval.middle_fraction
  slices = _eval_step_slices(predictor, refs, middle_fraction)
  want_scores = metrics.aggregate_scans(slices["prob"], slices["scan_index"], len(refs), rule="mean")
  for i, (p_covid, slice_probs) in enumerate(got):
    mine = slices["scan_index"] == i
    np.testing.assert_allclose(slice_probs[slices["slice_index"][mine]], slices["prob"][mine], rtol=0, atol=1e-6)
    assert p_covid == pytest.approx(want_scores[i], abs=1e-6)
  if middle_fraction < 1:  # the middle slices only: fewer than all
    assert len(slices["prob"]) < sum(len(s) for _, s in got)


def _covid_ids(scores: dict, threshold: float) -> set:
  return {scan_id for scan_id, p in scores.items() if p > threshold}


def _other_threshold(scores: dict) -> float:
  """A threshold other than 0.5 that labels the scans differently, both classes still predicted: halfway
  between the two neighbouring scores with the widest gap (so no score sits near it)."""
  ranked = sorted(scores.values(), reverse=True)
  default_count = len(_covid_ids(scores, THRESHOLD))
  gap, count = max((ranked[c - 1] - ranked[c], c) for c in range(1, len(ranked)) if c != default_count)
  assert gap > 1e-3, f"no clear gap between the validation scores {ranked}"
  threshold = (ranked[count - 1] + ranked[count]) / 2
  assert 0 < len(_covid_ids(scores, threshold)) < len(scores)
  assert _covid_ids(scores, threshold) != _covid_ids(scores, THRESHOLD)
  return threshold


def test_threshold_decides_the_predictor_labels(predictor, validation_scans, validation_scores):
  other = _other_threshold(validation_scores)
  at_other = predict.Predictor(predictor.model, predictor.variables, predictor.config, threshold=other)
  for p, threshold in [(predictor, THRESHOLD), (at_other, other)]:
    assert p.threshold == threshold
    results = {ref.scan_id: p.predict(ref) for ref in validation_scans}
    assert {i for i, r in results.items() if r.label == 1} == _covid_ids(validation_scores, threshold), threshold
    assert {i: r.p_covid for i, r in results.items()} == pytest.approx(validation_scores, abs=1e-6)
    assert all(r.true_label == ref.label for ref, r in zip(validation_scans, results.values()))


def test_vote_aggregation(predictor, collection):
  vote = predict.Predictor(predictor.model, predictor.variables, predictor.config, aggregation="vote")
  result = vote.predict(collection.validation[0])
  _, slice_probs = predictor.predict_scan(collection.validation[0].path)
  assert result.p_covid == pytest.approx(np.mean(slice_probs > 0.5))
  with pytest.raises(ValueError, match="aggregation"):
    predict.Predictor(predictor.model, predictor.variables, predictor.config, aggregation="median")


def test_the_best_checkpoint_is_loaded_not_the_latest(workdir, predictor):
  best, latest = checkpoint_steps(workdir)
  assert best != latest
  _, best_variables, _ = checkpoints.load_for_inference(workdir / "checkpoints" / str(best))
  _, latest_variables, _ = checkpoints.load_for_inference(workdir / "checkpoints" / str(latest))
  trees.assert_trees_equal(predictor.variables, best_variables)  # Predictor.from_checkpoint(workdir)
  _, from_folder, _ = checkpoints.load_for_inference(workdir / "checkpoints")
  trees.assert_trees_equal(from_folder, best_variables)
  # ... and the two steps differ, so the checks above could tell the latest from the best.
  trees.assert_same_structure(latest_variables, best_variables)
  with pytest.raises(AssertionError):
    trees.assert_trees_equal(latest_variables, best_variables)


def test_find_scans_every_layout(workdir, tmp_path):
  root = workdir / "synthetic_ct"
  counts = demo_config().data.synthetic_scans  # {split: (COVID, non-COVID) or unlabelled count}
  everything = predict.find_scans(root)  # COV19-CT-DB root: all splits
  assert len(everything) == sum(counts["train"]) + sum(counts["validation"]) + counts["test"]
  assert {r.split for r in everything} == {"train", "validation", "test"}
  assert sum(r.label == 1 for r in everything) == counts["train"][0] + counts["validation"][0]
  assert sum(r.label is None for r in everything) == counts["test"]
  split = predict.find_scans(root / "validation")  # a split with class folders
  assert sorted(r.label for r in split) == sorted([1] * counts["validation"][0] + [0] * counts["validation"][1])
  test_split = predict.find_scans(root / "test")  # an unlabelled split: a folder of scans
  assert [r.label for r in test_split] == [None, None] and len(test_split) == 2
  one = predict.find_scans(test_split[0].path)  # one image-folder scan
  assert [(r.scan_id, r.path) for r in one] == [(test_split[0].scan_id, test_split[0].path)]
  nifti = data.synthetic.write_nifti(data.read_scan(test_split[0].path), tmp_path / "x.nii.gz")
  assert [r.scan_id for r in predict.find_scans(nifti)] == ["x"]
  with pytest.raises(data.ScanError, match="no such"):
    predict.find_scans(tmp_path / "missing")


def _write_inputs(folder, workdir):
  """A folder of scans in every form: image folder, DICOM series, NIfTI file, plus a broken scan."""
  sources = sorted((workdir / "synthetic_ct" / "test").iterdir())
  scan = data.read_scan(sources[0])
  shutil.copytree(sources[0], folder / "image_scan")
  data.synthetic.write_dicom_series(scan, folder / "dicom_scan")
  data.synthetic.write_nifti(scan, folder / "nifti_scan.nii.gz", orientation="LPS")
  broken = folder / "broken_scan"
  broken.mkdir()
  for i in range(3):
    (broken / f"{i}.jpg").write_bytes(b"not a jpeg at all")
  return scan


def test_cli_every_input_form_and_formats(workdir, predictor, tmp_path, capsys):
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  scan = _write_inputs(inputs, workdir)
  out, per_slice, submission = tmp_path / "p.csv", tmp_path / "s.csv", tmp_path / "sub"
  rc = predict.main(["predict", f"--checkpoint={workdir}", f"--input={inputs}", f"--out={out}",
                     f"--per_slice={per_slice}", f"--submission={submission}", "--noprogress"])
  err = capsys.readouterr().err
  assert rc == 0
  # Reported by name and reason; the others are still predicted.
  assert "cannot read" in err and "broken_scan: none of its 3 slice images could be decoded" in err

  rows = _read_csv(out)
  assert tuple(rows[0]) == predict.CSV_COLUMNS
  by_id = {r[0]: r for r in rows[1:]}
  assert sorted(by_id) == ["dicom_scan", "image_scan", "nifti_scan"]
  want_p, want_slices = predictor.predict_scan(scan)
  for scan_id, row in by_id.items():
    assert int(row[2]) == len(scan.slices)
    # The DICOM / NIfTI round trip through Hounsfield units gives the same pixels, hence the same numbers.
    assert float(row[3]) == pytest.approx(want_p, abs=1e-6), scan_id
    assert int(row[4]) == int(float(row[3]) > predictor.threshold)
    assert (inputs / scan_id).exists() or (inputs / f"{scan_id}.nii.gz").exists()
    assert row[1].startswith(str(inputs))

  slice_rows = _read_csv(per_slice)
  assert tuple(slice_rows[0]) == predict.PER_SLICE_COLUMNS
  assert len(slice_rows) - 1 == 3 * len(scan.slices)
  image_rows = [r for r in slice_rows[1:] if r[0] == "image_scan"]
  assert [int(r[2]) for r in image_rows] == list(range(len(scan.slices)))
  np.testing.assert_allclose([float(r[3]) for r in image_rows], want_slices, atol=1e-6)

  covid = [r[0] for r in _read_csv(submission / "covid.csv")]
  noncovid = [r[0] for r in _read_csv(submission / "non-covid.csv")]
  assert sorted(covid + noncovid) == sorted(by_id)
  assert covid == [i for i in by_id if by_id[i][4] == "1"]  # (one scan in three forms: one list is empty)


def test_cli_threshold_labels_and_submission(workdir, validation_scores, tmp_path, capsys):
  """--threshold decides the CSV labels and the submission lists; both lists hold scans at either threshold."""
  other = _other_threshold(validation_scores)
  split = workdir / "synthetic_ct" / "validation"
  order = [ref.scan_id for ref in predict.find_scans(split)]  # the CLI's (and the submission's) order
  assert sorted(order) == sorted(validation_scores)
  for name, threshold, flags in [("default", THRESHOLD, []), ("other", other, [f"--threshold={other!r}"])]:
    out, submission = tmp_path / f"{name}.csv", tmp_path / f"{name}_submission"
    rc = predict.main(["predict", f"--checkpoint={workdir}", f"--input={split}",
                       f"--out={out}", f"--submission={submission}", "--noprogress", *flags])
    assert rc == 0, capsys.readouterr().err
    assert f"> {threshold:g})" in capsys.readouterr().err  # the summary names the threshold used
    rows = {r[0]: r for r in _read_csv(out)[1:]}
    assert {i: float(r[3]) for i, r in rows.items()} == pytest.approx(validation_scores, abs=1e-6)
    want_covid = _covid_ids(validation_scores, threshold)
    assert {i for i, r in rows.items() if r[4] == "1"} == want_covid, name
    assert {i for i, r in rows.items() if r[4] == "0"} == set(order) - want_covid, name
    covid = [r[0] for r in _read_csv(submission / "covid.csv")]
    noncovid = [r[0] for r in _read_csv(submission / "non-covid.csv")]
    assert covid and noncovid, name
    assert covid == [i for i in order if i in want_covid], name  # input order, one id per line
    assert noncovid == [i for i in order if i not in want_covid], name


def test_nothing_readable_exits_nonzero(workdir, tmp_path, capsys):
  broken = tmp_path / "only_broken"
  (broken / "a").mkdir(parents=True)
  (broken / "a" / "0.jpg").write_bytes(b"junk")
  rc = predict.main(["predict", f"--checkpoint={workdir}", f"--input={broken}", "--noprogress"])
  assert rc == 1
  assert "none of the 1 inputs" in capsys.readouterr().err
  assert predict.main(["predict", f"--checkpoint={workdir}", f"--input={tmp_path / 'nowhere'}"]) == 1
  assert predict.main(["predict", f"--checkpoint={workdir}"]) == 2  # --input missing


def test_duplicate_ids_refused_in_submission(tmp_path):
  p = predict.ScanPrediction("ct_scan_0", tmp_path, 0.7, 1, np.zeros(3))
  with pytest.raises(ValueError, match="more than once"):
    predict.write_submission([p, p], tmp_path / "sub")


@pytest.mark.filterwarnings("ignore:.*stray file among scans")  # ../shared/data/README.md
def test_real_series_through_the_command_line(workdir, predictor, tmp_path):
  """python -m resdense_jax.predict on ../shared/data: the real DICOM series and NIfTI volume."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real CT data not present at {SHARED_DATA}")
  out = tmp_path / "real.csv"
  proc = subprocess.run([sys.executable, "-m", "resdense_jax.predict", f"--checkpoint={workdir}",
                         f"--input={SHARED_DATA}", f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  rows = {r[0]: r for r in _read_csv(out)[1:]}
  assert int(rows["chest_ct_dicom"][2]) == 64
  assert int(rows["chest_ct_nifti"][2]) == 191  # 233 x 167 x 191, L-P-S: 191 axial slices
  refs = predict.find_scans(SHARED_DATA)
  assert sorted(rows) == sorted(ref.scan_id for ref in refs) == ["chest_ct_dicom", "chest_ct_nifti"]
  for ref in refs:  # the command line computes what the library computes in this process
    p_covid, slice_probs = predictor.predict_scan(ref.path)
    row = rows[ref.scan_id]
    assert row[1] == str(ref.path)
    assert int(row[2]) == len(slice_probs)
    assert float(row[3]) == pytest.approx(p_covid, abs=1e-6), ref.scan_id
    assert int(row[4]) == int(p_covid > predictor.threshold)
