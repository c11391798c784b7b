"""Smoke run of benchmarks/throughput.py: tiny backbones, one timed step, Keras on JAX. Never asserts a speed.

The benchmark runs as a user runs it (a subprocess, its own worker processes, a fresh XLA compilation cache),
with every row of an implementation in one process (--one_process) and XLA's optimisation level 0: both only
make the smoke quicker; they change no code path the table and JSON come from.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from data_fixtures import REAL_DICOM
from resdense_jax.data import synthetic

pytestmark = pytest.mark.slow  # trains in subprocesses, like the other slow tests

ROOT = pathlib.Path(__file__).resolve().parents[1]
SITUATIONS = ["phase1", "phase2", "all", "inference"]
LABELS = {"phase1": "phase 1 (backbones frozen)", "phase2": "phase 2 (first 10 layers frozen)",
          "all": "all trainable", "inference": "inference (eval step)"}
SCAN_SLICES = 8
STEPS = 1
# Measured figures every row has, all > 0 on any backend.
POSITIVE = ("images_per_s", "step_s_median", "first_step_cold_s", "compile_cold_s", "trace_cold_s",
            "first_step_warm_s", "gflop_per_step", "gflops", "peak_fraction", "matmul_peak_gflops",
            "host_peak_rss_mb", "keras_images_per_s", "keras_first_step_s", "keras_build_s", "ratio",
            "keras_gflops", "keras_peak_fraction", "keras_host_peak_rss_mb", "xla_temp_mb")
KEYS = set(POSITIVE) | {
    "situation", "backbones", "tiny", "size", "batch", "dtype", "fusion", "steps", "warmup", "backend",
    "device_kind", "num_devices", "jax_version", "keras_backend", "keras_version", "matmul_peak_gflops_float32",
    "freeze", "trainable_params", "frozen_params", "step_s", "device_peak_mb", "rss_scope", "keras_step_s",
    "keras_trainable_params", "keras_device_peak_mb", "keras_rss_scope", "compile_warm_s", "trace_warm_s",
    "cpu_ynnpack", "remat"}
MAIN_RUN_KEYS = {"situation", "backbones", "tiny", "size", "batch", "dtype", "backend", "device_kind",
                 "main_steps_per_epoch", "main_images_per_s", "data_wait_fraction", "main_wall_s", "main_prefetch"}
PREDICTOR_KEYS = {"predictor_images_per_s", "predictor_slices", "predictor_scan", "predictor_first_s",
                  "predictor_s", "scan_read_s"}


def _small_scan(folder: pathlib.Path) -> pathlib.Path:
  """The first slices of the real DICOM series (a synthetic series where ../shared/data is absent)."""
  folder.mkdir()
  if REAL_DICOM.is_dir():
    for path in sorted(REAL_DICOM.glob("*.dcm"))[:SCAN_SLICES]:
      shutil.copy(path, folder / path.name)
  else:
    scan, _ = synthetic.synthetic_scan(0, covid=True, num_slices=SCAN_SLICES, slice_size=64)
    synthetic.write_dicom_series(scan, folder)
  return folder


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """(stdout, JSON rows) of one tiny benchmark run."""
  folder = tmp_path_factory.mktemp("throughput")
  rows_file = folder / "rows.jsonl"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "KERAS_BACKEND": "jax",
         "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
  command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--tiny", "--size=32", "--batch=2",
             f"--steps={STEPS}", "--warmup=0", "--keras_backend=jax", "--predictor_repeats=1", "--one_process",
             f"--scan={_small_scan(folder / 'scan')}", f"--workdir={folder / 'work'}", f"--json={rows_file}",
             "--main_steps=1"]
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-5000:]
  return done.stdout, [json.loads(line) for line in rows_file.read_text().splitlines()]


def _table_rows(stdout: str) -> dict[str, list[str]]:
  """The Markdown table's body: {situation label: its cells}."""
  lines = [line for line in stdout.splitlines() if line.startswith("|")]
  header = [cell.strip() for cell in lines[0].strip("|").split("|")]
  assert lines[1].replace(" ", "").strip("|").split("|") == ["---"] * len(header)
  body = {}
  for line in lines[2:]:
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert len(cells) == len(header), line
    body[cells[0]] = cells[1:]
  return body


def test_table_has_the_four_situations_with_positive_numbers(smoke):
  stdout, _ = smoke
  body = _table_rows(stdout)
  assert list(body) == [LABELS[s] for s in SITUATIONS]
  for label, cells in body.items():
    # images/s, Keras images/s, ratio, "cold / warm", Keras first step, GFLOP/step, GFLOP/s, % peak, Keras % peak,
    # "RSS (Keras RSS)", XLA temp MB; the device column is "n/a (n/a)" on CPU.
    numbers = [*cells[:3], *cells[3].split(" / "), *cells[4:9], *cells[9].replace("(", "").replace(")", "").split()]
    assert len(numbers) == 12, (label, cells)
    for number in numbers:
      assert number != "n/a" and float(number) > 0, (label, cells)
    assert float(cells[10]) >= 0, (label, cells)  # XLA temp MB: under 0.5 MB rounds to 0 for the tiny model
    assert cells[11] == "n/a (n/a)", (label, cells)
  assert "Predictor, whole scan" in stdout and "Matmul peak" in stdout
  assert "of the step time waiting on the loader" in stdout and "YNNPACK convolutions off" in stdout


def test_json_rows_parse_with_the_expected_keys(smoke):
  _, rows = smoke
  assert [row["situation"] for row in rows] == SITUATIONS + ["main_run"]
  main_run = rows.pop()
  # The training loop's own figures, from its metrics.jsonl.
  assert set(main_run) == MAIN_RUN_KEYS and main_run["main_steps_per_epoch"] == 8  # 2 scans x 8 slices / 2
  assert main_run["main_images_per_s"] > 0 and 0.0 <= main_run["data_wait_fraction"] <= 1.0
  for row in rows:
    expected = KEYS | (PREDICTOR_KEYS if row["situation"] == "inference" else set())
    assert set(row) == expected, (row["situation"], sorted(set(row) ^ expected))
    for key in POSITIVE:
      assert isinstance(row[key], (int, float)) and row[key] > 0, (row["situation"], key, row[key])
    assert (row["backend"], row["keras_backend"], row["tiny"], row["size"], row["batch"]) == ("cpu", "jax", True,
                                                                                              32, 2)
    assert len(row["step_s"]) == len(row["keras_step_s"]) == STEPS
    assert row["device_peak_mb"] is None and row["keras_device_peak_mb"] is None  # the CPU backend reports none
    # Derived columns are what they say they are.
    assert row["images_per_s"] == pytest.approx(row["batch"] / row["step_s_median"])
    assert row["ratio"] == pytest.approx(row["images_per_s"] / row["keras_images_per_s"])
    assert row["gflops"] == pytest.approx(row["gflop_per_step"] / row["step_s_median"])
    assert row["peak_fraction"] == pytest.approx(row["gflops"] / row["matmul_peak_gflops"])
  inference = rows[-1]
  assert inference["predictor_slices"] == SCAN_SLICES and inference["predictor_images_per_s"] > 0
  assert len(inference["predictor_s"]) == 1


def test_both_implementations_train_the_same_parameters(smoke):
  """The Keras reference freezes the same layers: equal trainable counts, and phase 1 < phase 2 < all."""
  _, rows = smoke
  rows = [row for row in rows if row["situation"] != "main_run"]
  by = {row["situation"]: row for row in rows}
  for situation in ("phase1", "phase2", "all"):
    assert by[situation]["trainable_params"] == by[situation]["keras_trainable_params"], situation
  assert 0 < by["phase1"]["trainable_params"] < by["phase2"]["trainable_params"] < by["all"]["trainable_params"]
  assert by["all"]["frozen_params"] == 0
  totals = {row["trainable_params"] + row["frozen_params"] for row in rows}
  assert len(totals) == 1, totals  # one model in every row
  assert by["phase1"]["freeze"] == ["backbones"] and by["phase2"]["freeze"] == ["backbones:10"]
