"""Data parallel from the first line: the same run on a 2-device mesh (2 CPU devices) equals the 1-device run."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parent

RUN = """
import sys
sys.path.insert(0, {tests!r})
import jax
from demo_configs import tiny_collection, tiny_config
from resdense_jax import train
assert len(jax.devices()) == {devices}, jax.devices()
config = tiny_config()
config.data.root = {root!r}
config.phases[1].epochs = 1
train.train_and_evaluate(config, {workdir!r})
"""


def _run(tmp_path: pathlib.Path, devices: int, root: pathlib.Path) -> list[dict]:
  workdir = tmp_path / f"run_{devices}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  code = RUN.format(tests=str(TESTS), devices=devices, root=str(root), workdir=str(workdir))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_device_mesh_equals_one_device(tmp_path):
  sys.path.insert(0, str(TESTS))
  from demo_configs import tiny_collection  # pylint: disable=g-import-not-at-top
  root = tiny_collection(tmp_path / "ct")
  one, two = _run(tmp_path, 1, root), _run(tmp_path, 2, root)
  assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) == 2
  for a, b in zip(one, two):
    # Batches are split over the devices; BatchNorm statistics and the loss still cover the global batch.
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=1e-4)
    assert b["val_slice_accuracy"] == a["val_slice_accuracy"]
    np.testing.assert_allclose(b["val_scan_auc"], a["val_scan_auc"], atol=1e-6)
