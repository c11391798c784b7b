"""Data parallel over processes and devices: 2 JAX processes (1 CPU device each, gloo collectives) against
1 process with 1 device.

Evaluation of the same weights gives the same metrics on every process. Training runs end to end in a shared
workdir (orbax writes one checkpoint from all processes; process 0 alone writes metrics.jsonl) and follows the
1-device trajectory: each process takes its block of every global batch and of its augmentation draws.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parent
TIMEOUT_S = 300

RUN = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
if {num_processes} > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # before initialize
  jax.distributed.initialize(coordinator_address={coordinator!r}, num_processes={num_processes},
                             process_id={process_id})
from demo_configs import tiny_config
from resdense_jax import evaluate, train
assert jax.process_count() == {num_processes} and len(jax.devices()) == {num_processes}, jax.devices()
config = tiny_config()
config.data.root = {root!r}
config.phases[1].epochs = 1
# Evaluation of fixed (freshly initialised) weights: eval batches split over the processes.
mesh = train.create_mesh()
model = train.create_model(config.model)
variables = train.initialized(jax.random.key(config.seed, impl="rbg"), model, config.data.image_size)
variables = jax.device_put(variables, train.replicated(mesh))
_, val_source = train.data_sources(config, None)
fixed = evaluate.evaluate(train.compile_eval_step(model, mesh), variables, val_source, config,
                          train.data_sharded(mesh))
record = train.train_and_evaluate(config, {workdir!r})
with open({result!r}, "w") as f:
  json.dump({{"fixed_weights": fixed, "trained": record}}, f)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(code: str, devices: int) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _wait_all(procs: list[subprocess.Popen]) -> list[str]:
  """Outputs of all `procs`; if one fails or the deadline passes, the rest are killed (no hung collective)."""
  deadline = time.monotonic() + TIMEOUT_S
  while any(p.poll() is None for p in procs):
    failed = any(p.poll() not in (None, 0) for p in procs)
    if failed or time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.2)
  outputs = [p.communicate(timeout=30)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-3000:]}"
  return outputs


def _code(root, workdir, result, *, num_processes=1, process_id=0, coordinator="") -> str:
  return RUN.format(tests=str(TESTS), root=str(root), workdir=str(workdir), result=str(result),
                    num_processes=num_processes, process_id=process_id, coordinator=coordinator)


def _metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_device(tmp_path):
  sys.path.insert(0, str(TESTS))
  from demo_configs import tiny_collection  # pylint: disable=g-import-not-at-top
  root = tiny_collection(tmp_path / "ct")
  coordinator = f"127.0.0.1:{_free_port()}"
  multi, single = tmp_path / "multi", tmp_path / "single"
  results = [tmp_path / f"result_{i}.json" for i in range(2)]
  procs = [_launch(_code(root, multi, results[i], num_processes=2, process_id=i, coordinator=coordinator), 1)
           for i in range(2)]
  procs.append(_launch(_code(root, single, tmp_path / "result_single.json"), 1))
  _wait_all(procs)

  per_process = [json.loads(r.read_text()) for r in results]
  reference = json.loads((tmp_path / "result_single.json").read_text())
  # The same weights evaluate to the same metrics, on every process.
  assert per_process[0]["fixed_weights"] == per_process[1]["fixed_weights"] == reference["fixed_weights"]
  assert 0.0 < reference["fixed_weights"]["slice_accuracy"] < 1.0  # a real mix of right and wrong
  # Training: each process computed its own record (train loss from the replicated step output,
  # evaluation gathered back); they agree.
  assert per_process[0]["trained"] == per_process[1]["trained"]
  assert per_process[0]["trained"].keys() == reference["trained"].keys()

  ours, theirs = _metrics(multi), _metrics(single)  # metrics.jsonl: written once, by process 0
  assert [r["step"] for r in ours] == [r["step"] for r in theirs] and len(ours) == 2
  assert ours[-1] == {k: v for k, v in per_process[0]["trained"].items() if not k.startswith("best_")}
  # Each process takes its block of every global batch and of its augmentation draws, so the global batches
  # (rows, order, flips, angles) and hence training equal the one-process run's.
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(a["val_scan_auc"], b["val_scan_auc"], atol=1e-6)
    assert a["val_slice_accuracy"] == pytest.approx(b["val_slice_accuracy"], abs=1e-6)
  assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == \
      sorted(p.name for p in (single / "checkpoints").iterdir() if p.name.isdigit())
