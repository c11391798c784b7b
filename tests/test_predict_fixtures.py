"""Shared by test_predict, test_explain and test_reports: one small training run, made once per test session.

The run goes through the real training engine (`train.train_and_evaluate`, configs/demo.py with small overrides)
so the checkpoints, config.json and metrics.jsonl are exactly what a user's run leaves behind. Under
pytest-xdist the test files may run in different workers: the run is made under the session's shared temporary
root, behind a file lock, and reused.

What the tests rely on, and `check_run` / `validation_scores` assert (a clear error, never a silent pass):
  * the model has learned enough that its validation scores fall on both sides of the threshold, so a
    threshold, a label and a submission file have something to decide;
  * the best checkpoint is not the latest: after the two phases of the paper's schedule a last phase at an
    absurd learning rate wrecks the model, so "the best checkpoint is used" can be told apart from "the latest".
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pathlib
import sys

import ml_collections
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IMAGE_SIZE = 32
FEATURE_STRIDE = 4  # one-stage backbones: the fused feature map is IMAGE_SIZE / 4 on a side
THRESHOLD = 0.5  # configs/common.py's config.eval.threshold
# The best checkpoint scores at least one validation scan this far above the threshold and one this far below.
CONFIDENCE = 0.05


def demo_config() -> ml_collections.ConfigDict:
  """configs/demo.py, shrunk to under a minute on 2 CPU cores: 120 training and 8 validation scans, 7 epochs."""
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  common = sys.modules["common"]  # configs/common.py, imported by demo.py
  config = module.get_config()
  config.data.synthetic_scans = {"train": (60, 60), "validation": (4, 4), "test": 2}
  # Rendered at 64 pixels and resized to 32 (as the demo renders 128 for 64): the resize averages the pixel
  # noise away, the planted opacities stay.
  config.data.synthetic_slice_size = 64
  config.data.synthetic_num_slices = (6, 8)
  config.data.image_size = IMAGE_SIZE
  # Without augmentation the scans separate in fewer steps (measured: the training scans' scores reach
  # 0.06-0.93 after 156 steps); augmentation has tests of its own.
  config.data.augment = False
  config.model.backbones = ("resnet50", "densenet121")
  config.model.backbone_kwargs = {
      "resnet50": {"stage_sizes": (1,), "filters": (16,), "stem_filters": 16},
      "densenet121": {"blocks": (2,), "growth_rate": 8, "stem_filters": 16},
  }
  config.model.fusion_filters = 32
  config.model.fusion_activation = "relu"
  config.model.dropout = 0.0
  config.train.batch_size = 32
  config.train.precise_bn_batches = 10
  config.train.async_checkpointing = False
  config.train.log_every_steps = 1000
  config.phases[0].epochs = 1  # head, backbones frozen
  config.phases[1].epochs = 5  # everything
  # Adam at 100x the demo's rate for one epoch: the latest checkpoint ends far worse than the best.
  config.phases.append(common.phase("overshoot", 1, (), optimizer="adam", learning_rate=0.1))
  config.eval.batch_size = 16
  assert config.eval.threshold == THRESHOLD
  return config


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def read_records(workdir: pathlib.Path) -> dict[int, dict]:
  """metrics.jsonl by step."""
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r for r in map(json.loads, filter(None, lines))}


def checkpoint_steps(workdir: pathlib.Path) -> tuple[int, int]:
  """(best step, latest step) of the run's checkpoints, as the checkpoint manager sees them."""
  from resdense_jax import checkpoints  # pylint: disable=g-import-not-at-top

  manager = checkpoints.create_manager(workdir / "checkpoints", async_save=False)
  try:
    return int(manager.best_step()), int(manager.latest_step())
  finally:
    manager.close()


def check_run(workdir: pathlib.Path) -> None:
  """Raises when the run lacks what the tests rely on: a best checkpoint better than the latest, and one
  that predicts both classes on the validation scans (as the training engine evaluated them)."""
  records = read_records(workdir)
  best, latest = checkpoint_steps(workdir)
  history = "; ".join(f"step {s} ({r['phase_name']}): macro-F1 {r['val_scan_macro_f1']:.3f} confusion "
                      f"{r['val_scan_confusion_matrix']}" for s, r in sorted(records.items()))
  problems = []
  if best == latest or not records[best]["val_scan_macro_f1"] > records[latest]["val_scan_macro_f1"]:
    problems.append(f"the best checkpoint (step {best}) is not better than the latest (step {latest})")
  (tn, fp), (fn, tp) = records[best]["val_scan_confusion_matrix"]
  if not (tn + fn and fp + tp):
    problems.append(f"the best checkpoint (step {best}) predicts one class for every validation scan")
  if problems:
    raise RuntimeError(f"{workdir}: the shared training run no longer serves the prediction tests: "
                       f"{' and '.join(problems)}. Evaluations: {history}. Retune demo_config() in {__file__}.")


def trained_workdir(tmp_path_factory) -> pathlib.Path:
  """The workdir of the shared run (trained on first use in this pytest session), checked by check_run."""
  from resdense_jax import train  # pylint: disable=g-import-not-at-top

  if os.environ.get("RESDENSE_TEST_TINY_RUN"):  # a run kept between sessions while iterating on these tests
    workdir = pathlib.Path(os.environ["RESDENSE_TEST_TINY_RUN"])
    lock = workdir.parent / f"{workdir.name}.lock"
  else:
    root = tmp_path_factory.getbasetemp()
    if root.name.startswith("popen-gw"):  # xdist: one folder shared by all workers of this session
      root = root.parent
    workdir, lock = root / "resdense_tiny_run", root / "resdense_tiny_run.lock"
  with _locked(lock):
    if not (workdir / ".complete").exists():
      train.train_and_evaluate(demo_config(), workdir)
      (workdir / ".complete").write_text("done\n")
  check_run(workdir)
  return workdir


# Module-scoped fixtures of the prediction, explanation and report tests (imported by name there).
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(workdir):  # pylint: disable=redefined-outer-name
  from resdense_jax import predict  # pylint: disable=g-import-not-at-top
  return predict.Predictor.from_checkpoint(workdir)


@pytest.fixture(scope="module")
def validation_scans(workdir):  # pylint: disable=redefined-outer-name
  """The run's validation ScanRefs, as the training engine split them."""
  from resdense_jax import data  # pylint: disable=g-import-not-at-top
  return data.discover(workdir / "synthetic_ct").validation


@pytest.fixture(scope="module")
def validation_scores(predictor, validation_scans):  # pylint: disable=redefined-outer-name
  """{scan_id: P(COVID)} of the validation scans under the best checkpoint, some on each side of the
  threshold by at least CONFIDENCE (else a clear error: the run no longer serves the threshold tests)."""
  scores = {ref.scan_id: predictor.predict_scan(ref.path)[0] for ref in validation_scans}
  if not (max(scores.values()) > THRESHOLD + CONFIDENCE and min(scores.values()) < THRESHOLD - CONFIDENCE):
    raise RuntimeError(f"the shared run's best checkpoint scores the validation scans {scores}: not on both "
                       f"sides of {THRESHOLD} by {CONFIDENCE}; retune demo_config() in {__file__}")
  return scores
