"""Shared by test_predict, test_explain and test_reports: one tiny training run, made once per test session.

The run goes through the real training engine (`train.train_and_evaluate`, configs/demo.py with tiny overrides:
two phases of one epoch, 32x32 synthetic slices, one-stage-pair backbones) so the checkpoint, config.json and
metrics.jsonl are exactly what a user's run leaves behind. Under pytest-xdist the test files may run in
different workers: the run is made under the session's shared temporary root, behind a file lock, and reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pathlib

import ml_collections
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IMAGE_SIZE = 32


def demo_config() -> ml_collections.ConfigDict:
  """configs/demo.py, shrunk to seconds: 10 training and 4 validation scans, 2 x 1 epoch."""
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.synthetic_scans = {"train": (5, 5), "validation": (2, 2), "test": 2}
  config.data.synthetic_slice_size = IMAGE_SIZE
  config.data.synthetic_num_slices = (5, 7)
  config.data.image_size = IMAGE_SIZE
  config.model.backbones = ("resnet50", "densenet121")
  # Two stages each: feature maps of IMAGE_SIZE / 8 = 4x4, enough for a visible CAM.
  config.model.backbone_kwargs = {
      "resnet50": {"stage_sizes": (1, 1), "filters": (4, 8), "stem_filters": 8},
      "densenet121": {"blocks": (1, 1), "growth_rate": 4, "stem_filters": 8},
  }
  config.model.fusion_filters = 16
  config.train.batch_size = 8
  config.train.async_checkpointing = False
  config.train.log_every_steps = 1000
  config.phases[0].epochs = 1
  config.phases[1].epochs = 1
  config.eval.batch_size = 16
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


def trained_workdir(tmp_path_factory) -> pathlib.Path:
  """The workdir of the tiny run (trained on first use in this pytest session)."""
  from resdense_jax import train  # pylint: disable=g-import-not-at-top

  if os.environ.get("RESDENSE_TEST_TINY_RUN"):  # reuse a finished run while iterating on these tests
    return pathlib.Path(os.environ["RESDENSE_TEST_TINY_RUN"])
  root = tmp_path_factory.getbasetemp()
  if root.name.startswith("popen-gw"):  # xdist: one folder shared by all workers of this session
    root = root.parent
  workdir = root / "resdense_tiny_run"
  with _locked(root / "resdense_tiny_run.lock"):
    if not (workdir / ".complete").exists():
      train.train_and_evaluate(demo_config(), workdir)
      (workdir / ".complete").write_text("done\n")
  return workdir


# Module-scoped fixtures of the prediction, explanation and report tests (imported by name there).
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(workdir):  # pylint: disable=redefined-outer-name
  from resdense_jax import predict  # pylint: disable=g-import-not-at-top
  return predict.Predictor.from_checkpoint(workdir)
