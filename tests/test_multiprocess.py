"""Data parallel over processes and devices: 2 JAX processes (1 CPU device each, gloo collectives) and
1 process with 2 CPU devices, each against 1 process with 1 device.

Evaluation of the same weights gives the same metrics on every process. Training runs end to end in a shared
workdir (orbax writes one checkpoint from all processes; process 0 alone writes metrics.jsonl) and follows the
1-device trajectory: each process takes its block of every global batch and of its augmentation draws. The
final checkpoints' variables (params and batch_stats) are compared: 2 processes against 1 process with 2 devices
bitwise, 2 devices against 1 device to float32 rounding of the reductions.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import flax.traverse_util
import jax
import numpy as np
import pytest

import trees
from resdense_jax import metric_writer

pytestmark = pytest.mark.slow  # whole training runs in subprocesses

TESTS = pathlib.Path(__file__).resolve().parent
# A guard against a hung collective, not a timing check: four JAX processes share the cores.
TIMEOUT_S = 600
TWO_PROCESSES, TWO_DEVICES, ONE_DEVICE = "2 processes", "1 process x 2 devices", "1 device"

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
from resdense_jax.data import sources
assert jax.process_count() == {num_processes}, jax.process_count()
assert len(jax.devices()) == {num_processes} * {devices}, jax.devices()
config = tiny_config()
config.data.root = {root!r}
config.phases[1].epochs = 1
# Evaluation of fixed (freshly initialised) weights: eval batches split over the processes and devices.
mesh = train.create_mesh()
model = train.create_model(config.model)
variables = train.initialized(jax.random.key(config.seed, impl="rbg"), model, config.data.image_size)
variables = jax.device_put(variables, train.replicated(mesh))
_, val_source = sources.data_sources(config, None)
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
  # LLVM's optimisation level 0 for all: compiling is most of each run's time (a third less CPU with it), and
  # every run compiles the same way, so the layouts stay comparable.
  flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
  return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _wait_all(procs: dict[str, subprocess.Popen]) -> None:
  """Waits for all `procs`; if one fails or the deadline passes, the rest are killed (no hung collective)."""
  deadline = time.monotonic() + TIMEOUT_S
  while any(p.poll() is None for p in procs.values()):
    failed = any(p.poll() not in (None, 0) for p in procs.values())
    if failed or time.monotonic() > deadline:
      for p in procs.values():
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.2)
  outputs = {name: p.communicate(timeout=30)[0] for name, p in procs.items()}
  for name, p in procs.items():
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{outputs[name][-3000:]}"


def _code(root, workdir, result, *, devices=1, num_processes=1, process_id=0, coordinator="") -> str:
  return RUN.format(tests=str(TESTS), root=str(root), workdir=str(workdir), result=str(result), devices=devices,
                    num_processes=num_processes, process_id=process_id, coordinator=coordinator)


def _metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _final_variables(workdir: pathlib.Path) -> tuple[dict, set[tuple[str, ...]]]:
  """({"params", "batch_stats"} of the run's last checkpoint as numpy, the paths of its noise-only biases).

  Noise-only: the bias of a Conv2D followed by its BatchNormalization (every conv of a ResNet backbone). The
  BatchNorm subtracts the batch mean, so the bias's gradient is zero in exact arithmetic; its value after
  training is float32 rounding noise that Adam's normalised step has made into updates.
  """
  from resdense_jax import checkpoints  # pylint: disable=g-import-not-at-top
  model, variables, _ = checkpoints.load_for_inference(workdir / "checkpoints" / str(_steps(workdir)[-1]))
  noise_only = set()
  for backbone, layers in model.keras_layers().items():
    batch_norms = {layer.name for layer in layers if layer.class_name == "BatchNormalization"}
    for layer in layers:  # Keras names a conv's BatchNorm after it: conv2_block1_1_conv -> conv2_block1_1_bn
      if layer.class_name == "Conv2D" and layer.name.removesuffix("_conv") + "_bn" in batch_norms:
        noise_only.update(("params", backbone, *path[1:]) for path in layer.weights if path[-1] == "bias")
  return jax.tree.map(np.asarray, variables), noise_only


def _split(variables: dict, paths: set[tuple[str, ...]]) -> tuple[dict, dict]:
  """(the variables at `paths`, the others), each a nested dict."""
  flat = flax.traverse_util.flatten_dict(variables)
  assert paths <= flat.keys()
  return (flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if k in paths}),
          flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in paths}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The three layouts trained at once: {layout: {"workdir", "results" (one per process)}}."""
  sys.path.insert(0, str(TESTS))
  from demo_configs import tiny_collection  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("multiprocess")
  root = tiny_collection(tmp / "ct")
  layouts = {TWO_PROCESSES: (2, 1), TWO_DEVICES: (1, 2), ONE_DEVICE: (1, 1)}  # (processes, devices each)
  coordinator = f"127.0.0.1:{_free_port()}"
  out, procs = {}, {}
  for index, (name, (num_processes, devices)) in enumerate(layouts.items()):
    workdir = tmp / f"run{index}"
    out[name] = {"workdir": workdir, "results": [tmp / f"result{index}_{p}.json" for p in range(num_processes)]}
    for p, result in enumerate(out[name]["results"]):
      procs[f"{name}, process {p}"] = _launch(_code(root, workdir, result, devices=devices,
                                                    num_processes=num_processes, process_id=p,
                                                    coordinator=coordinator), devices)
  _wait_all(procs)  # all four processes run concurrently
  for run in out.values():
    run["results"] = [json.loads(path.read_text()) for path in run["results"]]
  return out


def test_fixed_weights_evaluate_equal_everywhere(runs):
  reference = runs[ONE_DEVICE]["results"][0]["fixed_weights"]
  for name in (TWO_PROCESSES, TWO_DEVICES):
    for p, result in enumerate(runs[name]["results"]):
      # The best threshold is a midpoint of two scan means: cross-device sums move it by float32 rounding.
      got = dict(result["fixed_weights"])
      want = dict(reference)
      assert got.pop("scan_best_threshold") == pytest.approx(want.pop("scan_best_threshold"), rel=1e-6)
      assert got == want, f"{name}, process {p}"
  assert 0.0 < reference["slice_accuracy"] < 1.0  # a real mix of right and wrong


@pytest.mark.parametrize("layout", [TWO_PROCESSES, TWO_DEVICES])
def test_training_metrics_equal_one_device(runs, layout):
  results, workdir = runs[layout]["results"], runs[layout]["workdir"]
  reference = runs[ONE_DEVICE]["results"][0]["trained"]
  # Each process computed its own record (train loss from the replicated step output, evaluation gathered
  # back); they agree.
  untimed = [{k: v for k, v in r["trained"].items() if k not in metric_writer.TIMING_FIELDS} for r in results]
  assert all(u == untimed[0] for u in untimed)
  assert results[0]["trained"].keys() == reference.keys()
  ours, theirs = _metrics(workdir), _metrics(runs[ONE_DEVICE]["workdir"])  # written once, by process 0
  assert [r["step"] for r in ours] == [r["step"] for r in theirs] and len(ours) == 2
  assert ours[-1] == {k: v for k, v in results[0]["trained"].items() if not k.startswith("best_")}
  # Each process takes its block of every global batch and of its augmentation draws, so the global batches
  # (rows, order, flips, angles) and hence training equal the one-device run's.
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(a["val_scan_auc"], b["val_scan_auc"], atol=1e-6)
    assert a["val_slice_accuracy"] == pytest.approx(b["val_slice_accuracy"], abs=1e-6)
  assert _steps(workdir) == _steps(runs[ONE_DEVICE]["workdir"])


def test_two_processes_train_the_same_weights_as_two_devices(runs):
  # The same 2-device SPMD program; a cross-device sum of two operands does not depend on their order, so the
  # final variables agree bitwise (measured so). Any difference in which rows or augmentations a process
  # feeds, or in how its gradients are combined, shows here even where 4 validation scans' metrics do not.
  ours, _ = _final_variables(runs[TWO_PROCESSES]["workdir"])
  theirs, _ = _final_variables(runs[TWO_DEVICES]["workdir"])
  trees.assert_trees_equal(ours, theirs)


def test_two_devices_train_the_same_weights_as_one_device(runs):
  ours, _ = _final_variables(runs[TWO_DEVICES]["workdir"])
  reference, noise_only = _final_variables(runs[ONE_DEVICE]["workdir"])
  assert set(reference) == {"params", "batch_stats"} and reference["batch_stats"]
  trees.assert_same_structure(ours, reference)
  assert len(noise_only) == 17  # every conv of the tiny ResNet; DenseNet's convs have no bias
  ours_noise, ours_rest = _split(ours, noise_only)
  reference_noise, reference_rest = _split(reference, noise_only)
  # Two devices reduce the batch means (loss, gradients, BatchNorm statistics) in another order: one step's
  # gradients differ by float32 rounding (up to 5.8e-6 of the largest gradient, measured), and Adam's
  # normalised step (lr * m / (sqrt(v) + eps)) passes that on in full where a gradient is near zero.
  # Measured after the run's 6 steps: all but 58 of the 15,839 entries here within rtol 1e-5 + atol 1e-7;
  # beyond rtol 1e-5 the largest excess is 3.2e-5 (one kernel entry), the next 3e-6 (a BatchNorm bias).
  # atol 1e-4 is a tenth of one Adam step at lr 1e-3: a wrong batch or gradient moves weights by whole steps.
  trees.assert_trees_close(ours_rest, reference_rest, rtol=1e-5, atol=1e-4)
  leaves = list(zip(jax.tree.leaves(ours_rest), jax.tree.leaves(reference_rest)))  # same structure, checked
  outside = sum(int(np.sum(np.abs(a - b) > 1e-5 * np.abs(b) + 1e-7)) for a, b in leaves)
  total = sum(b.size for _, b in leaves)
  assert outside <= 0.01 * total, f"{outside} of {total} entries differ by more than rtol 1e-5 + atol 1e-7"
  # The noise-only biases (values up to 1e-4, differences up to 1.6e-4 measured) can only be bounded: within
  # one Adam step.
  trees.assert_trees_close(ours_noise, reference_noise, rtol=0, atol=1e-3)
