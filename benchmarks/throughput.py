"""Training and inference throughput of Res-Dense Net, beside the same work in Keras 3 and the machine's matmul peak.

    python benchmarks/throughput.py [--size=256 --batch=8 --dtype=float32 --steps=10 --json=rows.jsonl]

Times the project's own compiled steps (`train.create_phase` / `compile_train_step` / `compile_eval_step`, as the
engine runs them) in the four situations a user meets:
  phase1      both backbones frozen (freeze rule "backbones"): the paper's head phase;
  phase2      the first N Keras layers of each backbone frozen ("backbones:N", N=100): the paper's fine-tuning;
  all         nothing frozen;
  inference   the eval step, and the whole `predict.Predictor` on a real scan folder (reading included).
Each step takes a host numpy batch (moved with `data.to_global_batch`, as the engine does) and is synchronised
with block_until_ready; images/s is the batch over the median step time after the warm-up steps.

The same work runs in Keras 3 (keras.applications backbones, random weights, the same preprocessing, fusion Conv2D,
Add, GlobalAveragePooling2D, Dropout, Dense, RMSprop 1e-4, BinaryCrossentropy(from_logits=True), the same layers
frozen, train_on_batch / predict_on_batch), on TensorFlow when it is installed and on JAX otherwise, in its own
process (KERAS_BACKEND is read when keras is first imported). `ratio` is project / Keras images/s.

Per row also:
  first step    trace + compile + first run of the step: `cold` with an empty persistent XLA compilation cache,
                `warm` in a fresh process reading the cache the cold process wrote (random weights come from
                numpy in the model's shapes: no init program is compiled, and none is part of the figure);
  GFLOP/s       XLA's cost analysis of the compiled step (flops of the per-device program) / median step time;
                `%peak` divides it by the GFLOP/s of a 2048x2048 matmul compiled by XLA, timed in the same run
                (float32, and the compute dtype when that is bfloat16); Keras's GFLOP/s uses the project's flops
                per image (the same layers);
  XLA temp MB   the compiled step's temporary buffers (activations kept for the backward pass, scratch), from
                `memory_analysis()`: what `--remat=blocks` (config.train.remat) reduces;
  peak RSS      the host resident-set high-water mark of the process that ran the row (by default one fresh
                process per row and implementation); `device MB` the backend's peak_bytes_in_use (None on CPU).

Then a real training loop (`train.train_and_evaluate` on a small synthetic collection of 512x512 JPEG slices,
phase 2's freezing, `--main_steps` steps per epoch) reports its own images/s and the share of step time it
waited for the loader (prefetch included).

Prints a Markdown table on stdout (progress on stderr) and, with --json=FILE, one JSON object per row.
`--tiny` cuts every backbone to its stem and a single stage of one block (two for ResNet V2; built from Keras's own blocks on the
Keras side), for smoke runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_SCAN = ROOT.parent / "shared" / "data" / "chest_ct_dicom"
SITUATIONS = ("phase1", "phase2", "all", "inference")
# Keras Applications' depths (keras/src/applications): blocks per stage / conv blocks per dense block.
KERAS_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3),
                "resnet50v2": (3, 4, 6, 3), "resnet101v2": (3, 4, 23, 3), "resnet152v2": (3, 8, 36, 3),
                "densenet121": (6, 12, 24, 16), "densenet169": (6, 12, 32, 32), "densenet201": (6, 12, 48, 32)}
KERAS_NAMES = {"resnet50": "ResNet50", "resnet101": "ResNet101", "resnet152": "ResNet152",
               "resnet50v2": "ResNet50V2", "resnet101v2": "ResNet101V2", "resnet152v2": "ResNet152V2",
               "densenet121": "DenseNet121", "densenet169": "DenseNet169", "densenet201": "DenseNet201"}
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN, TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MATMUL_SIZE = 2048


def _log(message: str) -> None:
  print(f"[throughput {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _is_resnet(backbone: str) -> bool:
  return backbone.startswith("resnet")


def _is_resnet_v2(backbone: str) -> bool:
  return _is_resnet(backbone) and backbone.endswith("v2")


def _depths(spec: dict) -> dict[str, tuple[int, ...]]:
  """Blocks per stage of every backbone: Keras's, or with --tiny a single stage of one block (two for ResNet V2,
  whose stage strides its last block and so needs two)."""
  if not spec["tiny"]:
    return {name: KERAS_DEPTHS[name] for name in spec["backbones"]}
  return {name: (2,) if _is_resnet_v2(name) else (1,) for name in spec["backbones"]}


def _project_kwargs(depth: tuple[int, ...], backbone: str) -> dict:
  """Constructor overrides of the project's backbone for these depths (Keras's widths: 64, 128, ... filters)."""
  if _is_resnet(backbone):
    return {"stage_sizes": tuple(depth), "filters": tuple(64 * 2**i for i in range(len(depth)))}
  return {"blocks": tuple(depth)}


def _freeze_rules(situation: str, spec: dict) -> tuple[str, ...]:
  return {"phase1": ("backbones",), "phase2": (f"backbones:{spec['freeze_first']}",), "all": ()}[situation]


def _peak_rss_mb() -> float:
  """This process's resident-set high-water mark (VmHWM; ru_maxrss where /proc is missing)."""
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _reset_peak_rss() -> bool:
  """Restarts the high-water mark at the current RSS (Linux: clear_refs 5), for rows sharing a process."""
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def _host_batch(spec: dict) -> tuple[np.ndarray, np.ndarray]:
  """The same random uint8 images and labels (half COVID) for both implementations."""
  rng = np.random.default_rng(0)
  size, batch = spec["size"], spec["batch"]
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  labels = (np.arange(batch) % 2).astype(np.int32)
  return images, labels


def _timed(fn, count: int) -> list[float]:
  times = []
  for _ in range(count):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


# ------------------------------------------------------------------------------------------- JAX workers


def _configure_jax_cache(cache_dir: str | None, *, cpu_ynnpack: bool | None = None) -> None:
  """The worker's JAX setup; `cpu_ynnpack` as the project's command lines apply it (None: XLA's default)."""
  if cpu_ynnpack is not None:
    from resdense_jax import cpu_flags  # pylint: disable=g-import-not-at-top  (before JAX starts a backend)

    cpu_flags.set_ynnpack(cpu_ynnpack)
  import jax  # pylint: disable=g-import-not-at-top  (only in worker processes: the parent never owns a device)

  if cache_dir:
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Every program, however small or quick to compile, goes into the cache (else a warm run recompiles).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  else:
    jax.config.update("jax_enable_compilation_cache", False)


def _device_peak_mb() -> float | None:
  import jax  # pylint: disable=g-import-not-at-top

  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def _flops(compiled) -> float | None:
  """Flops of one run of the compiled (per-device) program from XLA's cost analysis, where it gives them."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends do not implement it)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _temp_mb(compiled) -> float | None:
  """XLA's buffer assignment for the step: the activations and scratch it keeps (what remat reduces)."""
  try:
    return compiled.memory_analysis().temp_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return None


def matmul_peak(dtype_name: str) -> dict:
  """GFLOP/s of a 2048x2048 matmul compiled by XLA (median of 10), the machine's reachable peak.

  On fast devices one product takes well under a millisecond, so a chain of k dependent products runs per call
  (k chosen so that a call lasts ~20 ms) and dispatch does not dominate.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
  n = MATMUL_SIZE
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), dtype)
  b = jnp.asarray(rng.standard_normal((n, n)) / math.sqrt(n), dtype)

  def chain(a, b, k):
    if k == 1:
      return jnp.dot(a, b)

    def product(_, x):
      x = jnp.dot(x, b)
      # Rescaled to unit RMS (n^2 work beside the product's 2n^3), so a long chain neither overflows nor
      # sinks into denormals.
      return x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))).astype(x.dtype)

    return jax.lax.fori_loop(0, k, product, a)

  def seconds(k: int, samples: int) -> float:
    fn = jax.jit(chain, static_argnums=2).lower(a, b, k).compile()
    fn(a, b).block_until_ready()
    return statistics.median(_timed(lambda: fn(a, b).block_until_ready(), samples))

  k, samples = 1, 10
  single = seconds(1, samples)
  if single < 0.02:
    k = min(1000, math.ceil(0.02 / max(single, 1e-6)))
  median = single if k == 1 else seconds(k, samples)
  return {"dtype": dtype_name, "gflops": 2.0 * n**3 * k / median / 1e9, "chain": k, "seconds": median}


class ProjectRows:
  """The project's steps in one process: shared initial variables, one situation after another."""

  def __init__(self, spec: dict):
    import jax  # pylint: disable=g-import-not-at-top

    from resdense_jax import train  # pylint: disable=g-import-not-at-top

    sys.path.insert(0, str(ROOT / "configs"))
    import common  # pylint: disable=g-import-not-at-top

    self.spec = spec
    self.jax, self.train = jax, train
    config = common.get_base_config()
    config.seed = 0
    config.data.image_size = spec["size"]
    config.model.backbones = tuple(spec["backbones"])
    config.model.backbone_kwargs = {name: _project_kwargs(depth, name) for name, depth in _depths(spec).items()
                                    if depth != KERAS_DEPTHS[name]}
    config.model.fusion_filters = spec["fusion"]
    config.model.dtype = spec["dtype"]
    config.model.pretrained = "none"
    config.train.batch_size = config.eval.batch_size = spec["batch"]
    self.config = config
    self.mesh = train.create_mesh()
    if spec["batch"] % self.mesh.size:
      raise ValueError(f"--batch {spec['batch']} must divide evenly over the {self.mesh.size} devices")
    self.images, self.labels = _host_batch(spec)
    self._variables = None

  def variables(self) -> dict:
    """Random weights in the model's shapes, drawn once per process with numpy.

    The engine's `train.initialized` compiles an init program (seconds for a tiny model, more for the paper's)
    that no figure here is about; step times do not depend on the values. Kernels He-normal, BatchNorm scale 1,
    bias and moving mean 0, moving variance 1, so activations stay finite through ResNet101 in inference mode.
    """
    if self._variables is None:
      import flax  # pylint: disable=g-import-not-at-top

      _log(f"project: random weights for {'+'.join(self.spec['backbones'])}")
      jax, size = self.jax, self.spec["size"]
      model = self.train.create_model(self.config.model)
      shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32),
                                                 train=False))
      rng = np.random.default_rng(0)

      def draw(path, leaf):
        name = path[-1]
        if name == "kernel":
          values = rng.normal(0.0, math.sqrt(2.0 / math.prod(leaf.shape[:-1])), leaf.shape)
        elif name in ("scale", "var"):
          values = np.ones(leaf.shape)
        elif name == "p":
          values = np.full(leaf.shape, 3.0)  # GeM's initial exponent
        else:
          values = np.zeros(leaf.shape)
        return values.astype(leaf.dtype)

      flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
      variables = flax.traverse_util.unflatten_dict({path: draw(path, leaf) for path, leaf in flat.items()})
      self._variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return self._variables

  def row(self, situation: str, *, warm: bool) -> dict:
    """One situation: first step (trace, compile, run), then, unless `warm`, the timed steps."""
    from resdense_jax import data, losses, optim  # pylint: disable=g-import-not-at-top

    jax, train, spec = self.jax, self.train, self.spec
    variables = self.variables()
    sharding = train.data_sharded(self.mesh)
    result: dict[str, Any] = {"situation": situation}
    if situation == "inference":
      model = train.create_model(self.config.model)
      on_device = jax.device_put(variables, train.replicated(self.mesh))
      step = train.compile_eval_step(model, self.mesh)

      def run(fn, carry):
        images = data.to_global_batch({"image": self.images}, sharding)["image"]
        return carry, fn(on_device, images)

      carry, args = None, (on_device, data.to_global_batch({"image": self.images}, sharding)["image"])
      counts = {optim.TRAINABLE: 0, optim.FROZEN: sum(int(p.size) for p in jax.tree.leaves(variables["params"]))}
      what = "eval step"
    else:
      self.config.phases = [_phase(situation, _freeze_rules(situation, spec))]
      plan = train.plan_phases(self.config, 1)
      phase = train.create_phase(0, plan, self.config, variables["params"])
      counts = optim.count(phase.labels, variables["params"])
      # A copy: the step donates its state, and the next row starts from the same initial weights.
      state = jax.device_put(train.create_train_state(jax.random.PRNGKey(1), variables, phase),
                             train.replicated(self.mesh), may_alias=False)
      step = train.compile_train_step(phase, losses.get_loss(self.config.train.loss), self.mesh,
                                      remat=spec["remat"])

      def run(fn, carry):
        batch = data.to_global_batch({"image": self.images, "label": self.labels}, sharding)
        return fn(carry, batch)

      carry, args = state, (state, data.to_global_batch({"image": self.images, "label": self.labels}, sharding))
      what = f"train step, freeze {list(_freeze_rules(situation, spec)) or 'nothing'}"
    result["trainable_params"], result["frozen_params"] = counts[optim.TRAINABLE], counts[optim.FROZEN]
    cache = "warm" if warm else "cold"
    _log(f"project {situation}: tracing and compiling the {what} ({cache} compilation cache)")
    start = time.perf_counter()
    lowered = step.lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    del args
    carry, out = run(compiled, carry)
    jax.block_until_ready((carry, out))
    done = time.perf_counter()
    result.update({f"trace_{cache}_s": traced - start, f"compile_{cache}_s": compiled_at - traced,
                   f"first_step_{cache}_s": done - start})
    _log(f"project {situation}: first step {done - start:.2f} s (trace {traced - start:.2f} s, compile "
         f"{compiled_at - traced:.2f} s)")
    if warm:
      return result
    result["gflop_per_step"] = None if (flops := _flops(compiled)) is None else flops / 1e9
    result["xla_temp_mb"] = _temp_mb(compiled)

    def one_step():
      nonlocal carry
      carry, out = run(compiled, carry)
      jax.block_until_ready((carry, out))

    if spec["warmup"]:
      _log(f"project {situation}: {spec['warmup']} warm-up steps")
      _timed(one_step, spec["warmup"])
    _log(f"project {situation}: timing {spec['steps']} steps")
    times = _timed(one_step, spec["steps"])
    result.update(step_s=times, step_s_median=statistics.median(times),
                  images_per_s=spec["batch"] / statistics.median(times))
    if situation == "inference":
      result.update(self.predictor(model, variables))
    return result

  def predictor(self, model, variables) -> dict:
    """Slices per second of the whole Predictor (read, resize, batches, eval step, aggregation) on one scan."""
    from resdense_jax import data, predict  # pylint: disable=g-import-not-at-top

    scan_path = self.scan_path()
    start = time.perf_counter()
    scan = data.read_scan(scan_path)
    read_s = time.perf_counter() - start
    predictor = predict.Predictor(model, variables, self.config, batch_size=self.spec["batch"])
    _log(f"predictor: first scan ({len(scan.slices)} slices of {scan_path}, includes its compile)")
    start = time.perf_counter()
    predictor.predict_scan(scan_path)
    first_s = time.perf_counter() - start
    _log(f"predictor: timing {self.spec['predictor_repeats']} passes over the scan")
    times = _timed(lambda: predictor.predict_scan(scan_path), self.spec["predictor_repeats"])
    return {"predictor_scan": str(scan_path), "predictor_slices": int(len(scan.slices)),
            "predictor_first_s": first_s, "predictor_s": times, "scan_read_s": read_s,
            "predictor_images_per_s": len(scan.slices) / statistics.median(times)}

  def scan_path(self) -> pathlib.Path:
    """--scan, else the real DICOM series in ../shared/data, else a synthetic DICOM series (written once)."""
    if self.spec["scan"]:
      return pathlib.Path(self.spec["scan"])
    if SHARED_SCAN.is_dir():
      return SHARED_SCAN
    folder = pathlib.Path(self.spec["workdir"]) / "synthetic_dicom"
    if not folder.is_dir():
      from resdense_jax.data import synthetic  # pylint: disable=g-import-not-at-top

      _log(f"predictor: no real scan at {SHARED_SCAN}; writing a synthetic DICOM series to {folder}")
      scan, _ = synthetic.synthetic_scan(0, covid=True, num_slices=64, slice_size=512)
      partial = pathlib.Path(tempfile.mkdtemp(prefix=".synthetic_dicom.", dir=folder.parent))
      synthetic.write_dicom_series(scan, partial)
      os.replace(partial, folder)  # complete or absent, if a run is interrupted
    return folder


def _phase(name: str, freeze: tuple[str, ...]):
  sys.path.insert(0, str(ROOT / "configs"))
  import common  # pylint: disable=g-import-not-at-top

  return common.phase(name, 1, freeze, optimizer="rmsprop", learning_rate=1e-4)


def project_worker(spec: dict) -> dict:
  """Rows spec["situations"] of the project in this process; cold rows also time the matmul peak if asked."""
  _configure_jax_cache(spec["cache_dir"], cpu_ynnpack=spec["cpu_ynnpack"])
  import jax  # pylint: disable=g-import-not-at-top

  rows = ProjectRows(spec)
  out: dict[str, Any] = {"rows": [], "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                         "num_devices": jax.device_count(), "jax_version": jax.__version__}
  shared = len(spec["situations"]) > 1
  for situation in spec["situations"]:
    gc.collect()
    reset = shared and _reset_peak_rss()
    row = rows.row(situation, warm=spec["warm"])
    row["host_peak_rss_mb"] = _peak_rss_mb()
    row["rss_scope"] = ("row (high-water mark reset before it)" if reset else
                        "process (rows before it included)" if shared else "process (this row only)")
    row["device_peak_mb"] = _device_peak_mb()
    out["rows"].append(row)
  if spec.get("matmul"):
    _log(f"matmul peak: {MATMUL_SIZE}x{MATMUL_SIZE} products compiled by XLA")
    out["matmul"] = [matmul_peak(d) for d in dict.fromkeys(("float32", spec["dtype"]))]
  return out


def main_run_worker(spec: dict) -> dict:
  """A real `train_and_evaluate` (what `python -m resdense_jax.main` runs) on a small synthetic collection:
  phase 2's freezing, 2 epochs of spec["main_steps"] steps; the loop's own timing fields of its last epoch."""
  _configure_jax_cache(spec["cache_dir"], cpu_ynnpack=spec["cpu_ynnpack"])
  from resdense_jax import train  # pylint: disable=g-import-not-at-top

  config = ProjectRows(spec).config
  config.compilation_cache_dir = spec["cache_dir"]
  config.data.synthetic = True
  slices = 8
  scans = max(2, spec["main_steps"] * spec["batch"] // slices)  # at least one scan of each class
  config.data.synthetic_scans = {"train": (scans - scans // 2, scans // 2), "validation": (1, 1), "test": 0}
  config.data.synthetic_num_slices = (slices, slices)
  config.data.synthetic_slice_size = 512  # COV19-CT-DB's slices are 512x512 JPEGs: decoded and resized
  config.train.log_every_steps = 1000
  config.train.remat = spec["remat"]
  config.phases = [_phase("phase2", _freeze_rules("phase2", spec))]
  config.phases[0].epochs = 2
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="main_run_", dir=spec["workdir"]))
  _log(f"main run: train_and_evaluate on {scans} training and 2 validation synthetic scans of {slices} slices in "
       f"{workdir}")
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  last = records[-1]
  return {"rows": [{"situation": "main_run", "main_steps_per_epoch": scans * slices // spec["batch"],
                    "main_images_per_s": last["train_images_per_s"],
                    "data_wait_fraction": last["data_wait_fraction"], "main_wall_s": time.perf_counter() - start,
                    "main_prefetch": config.data.prefetch}]}


# ----------------------------------------------------------------------------------------------- Keras


@contextlib.contextmanager
def _numpy_initializers(keras):
  """Keras's JAX backend draws every initial weight with jax.random, compiling one program per weight shape
  (tests/keras_fixtures.py: a first ResNet50 build 20 s instead of 2-3 s on 2 cores); numpy draws the same
  distributions at once. Only the JAX backend needs it; only `keras_build_s` (never a timed step) changes."""
  if keras.backend.backend() != "jax":
    yield
    return
  from unittest import mock  # pylint: disable=g-import-not-at-top

  from keras.src.backend.jax import random as jax_random  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)

  def as_dtype(values, dtype):
    return np.asarray(values, dtype=np.dtype(dtype or keras.config.floatx()))

  def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
    del seed
    return as_dtype(rng.normal(mean, stddev, shape), dtype)

  def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
    del seed
    return as_dtype(rng.uniform(minval, maxval, shape), dtype)

  def truncated_normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
    del seed
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2.0
    while outside.any():  # Redraw beyond two standard deviations, as jax.random.truncated_normal cuts there.
      values[outside] = rng.standard_normal(int(outside.sum()))
      outside = np.abs(values) > 2.0
    return as_dtype(mean + stddev * values, dtype)

  with mock.patch.multiple(jax_random, normal=normal, uniform=uniform, truncated_normal=truncated_normal):
    yield


def _keras_backbone(keras, name: str, depth: tuple[int, ...], shape):
  """keras.applications.<name>(weights=None), or Keras's own blocks at other depths (--tiny)."""
  from keras.src.applications import densenet as keras_densenet  # pylint: disable=g-import-not-at-top
  from keras.src.applications import resnet as keras_resnet  # pylint: disable=g-import-not-at-top

  if tuple(depth) == KERAS_DEPTHS[name]:
    return getattr(keras.applications, KERAS_NAMES[name])(include_top=False, weights=None, input_shape=shape)
  if _is_resnet_v2(name):
    def stack_fn_v2(x):  # keras resnet_v2: every stage strides its last block, but the last stage
      for i, blocks in enumerate(depth):
        x = keras_resnet.stack_residual_blocks_v2(x, 64 * 2**i, blocks, stride1=1 if i == len(depth) - 1 else 2,
                                                  name=f"conv{i + 2}")
      return x
    return keras_resnet.ResNet(stack_fn_v2, preact=True, use_bias=True, include_top=False, weights=None,
                               input_shape=shape, name=name)
  if _is_resnet(name):
    def stack_fn(x):
      for i, blocks in enumerate(depth):
        x = keras_resnet.stack_residual_blocks_v1(x, 64 * 2**i, blocks, stride1=1 if i == 0 else 2,
                                                  name=f"conv{i + 2}")
      return x
    return keras_resnet.ResNet(stack_fn, preact=False, use_bias=True, include_top=False, weights=None,
                               input_shape=shape, name=name)
  # keras.applications' DenseNet fixes four dense blocks; the same stem, blocks and end for any number.
  layers = keras.layers
  inputs = layers.Input(shape=shape)
  x = layers.ZeroPadding2D(padding=((3, 3), (3, 3)))(inputs)
  x = layers.Conv2D(64, 7, strides=2, use_bias=False, name="conv1_conv")(x)
  x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name="conv1_bn")(x)
  x = layers.Activation("relu", name="conv1_relu")(x)
  x = layers.ZeroPadding2D(padding=((1, 1), (1, 1)))(x)
  x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
  for i, blocks in enumerate(depth):
    x = keras_densenet.dense_block(x, blocks, name=f"conv{i + 2}")
    if i < len(depth) - 1:
      x = keras_densenet.transition_block(x, 0.5, name=f"pool{i + 2}")
  x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name="bn")(x)
  x = layers.Activation("relu", name="relu")(x)
  return keras.Model(inputs, x, name=name)


def keras_model(keras, spec: dict):
  """The Res-Dense Net in Keras: per-backbone preprocessing, backbone, fusion Conv2D, Add, pooling, head."""
  shape = (spec["size"], spec["size"], 3)
  inputs = keras.Input(shape, name="image")
  branches, backbones = [], {}
  with _numpy_initializers(keras):
    for name, depth in _depths(spec).items():
      if _is_resnet_v2(name):  # tf: [-1, 1]
        x = inputs / 127.5 - 1.0
      elif _is_resnet(name):  # caffe: RGB -> BGR, minus the ImageNet means
        x = keras.ops.flip(inputs, axis=-1) - np.asarray(CAFFE_MEAN_BGR, np.float32)
      else:  # torch: [0, 1], then the ImageNet means and standard deviations
        x = (inputs / 255.0 - np.asarray(TORCH_MEAN, np.float32)) / np.asarray(TORCH_STD, np.float32)
      backbones[name] = _keras_backbone(keras, name, depth, shape)
      branches.append(keras.layers.Conv2D(spec["fusion"], 3, padding="same",
                                          name=f"{name}_fusion_conv")(backbones[name](x)))
    x = keras.layers.Add(name="add")(branches) if len(branches) > 1 else branches[0]
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    outputs = keras.layers.Dense(1, name="predictions")(x)
    model = keras.Model(inputs, outputs, name="resdense")
  return model, backbones


def keras_row(keras, spec: dict, situation: str) -> dict:
  """One situation in Keras, timed like the project's rows."""
  keras.backend.clear_session()
  _log(f"keras {situation}: building {'+'.join(spec['backbones'])} ({keras.backend.backend()} backend)")
  start = time.perf_counter()
  model, backbones = keras_model(keras, spec)
  if situation == "phase1":
    for backbone in backbones.values():
      backbone.trainable = False
  elif situation == "phase2":
    for backbone in backbones.values():
      for layer in backbone.layers[:spec["freeze_first"]]:
        layer.trainable = False
  build_s = time.perf_counter() - start
  images, labels = _host_batch(spec)
  x, y = images.astype(np.float32), labels.astype(np.float32)[:, None]
  if situation == "inference":
    step = lambda: model.predict_on_batch(x)  # noqa: E731
  else:
    model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=1e-4),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    step = lambda: model.train_on_batch(x, y)  # noqa: E731  (returns numpy: synchronised)
  trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights) if situation != "inference" else 0
  _log(f"keras {situation}: first step (trace + compile)")
  first_s = _timed(step, 1)[0]
  if spec["warmup"]:
    _timed(step, spec["warmup"])
  _log(f"keras {situation}: timing {spec['steps']} steps")
  times = _timed(step, spec["steps"])
  return {"situation": situation, "keras_build_s": build_s, "keras_first_step_s": first_s, "keras_step_s": times,
          "keras_images_per_s": spec["batch"] / statistics.median(times), "keras_trainable_params": trainable}


def _keras_device_peak_mb(keras) -> float | None:
  if keras.backend.backend() == "jax":
    return _device_peak_mb()
  if keras.backend.backend() == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    gpus = tf.config.list_logical_devices("GPU")
    return tf.config.experimental.get_memory_info(gpus[0].name)["peak"] / 2**20 if gpus else None
  return None


def keras_worker(spec: dict) -> dict:
  if os.environ.get("KERAS_BACKEND") == "jax":
    _configure_jax_cache(None)  # Keras compiles cold every time: no persistent cache
  import keras  # pylint: disable=g-import-not-at-top

  if spec["dtype"] == "bfloat16":
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # bf16 compute, float32 variables
  out: dict[str, Any] = {"rows": [], "keras_backend": keras.backend.backend(), "keras_version": keras.__version__}
  shared = len(spec["situations"]) > 1
  for situation in spec["situations"]:
    gc.collect()
    reset = shared and _reset_peak_rss()
    row = keras_row(keras, spec, situation)
    row["keras_host_peak_rss_mb"] = _peak_rss_mb()
    row["keras_rss_scope"] = ("row (high-water mark reset before it)" if reset else
                              "process (rows before it included)" if shared else "process (this row only)")
    row["keras_device_peak_mb"] = _keras_device_peak_mb(keras)
    out["rows"].append(row)
  return out


# ------------------------------------------------------------------------------------------ orchestration


def _run_worker(role: str, spec: dict, workdir: pathlib.Path, env: dict | None = None,
                python: str | None = None) -> dict:
  """Runs a worker in a fresh Python process (its output on our stderr) and returns what it wrote.

  `python`: the interpreter (default this one); the Keras worker needs only keras, numpy and a backend.
  """
  tag = f"{role}_{'_'.join(spec['situations'])}_{spec.get('warm', '')}_{time.time_ns()}"
  spec_file, out_file = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
  spec_file.write_text(json.dumps(spec))
  command = [python or sys.executable, str(pathlib.Path(__file__).resolve()), f"--_worker={role}", f"--_spec={spec_file}",
             f"--_out={out_file}"]
  completed = subprocess.run(command, env={**os.environ, **(env or {})}, stdout=sys.stderr, check=False)
  if completed.returncode != 0:
    raise RuntimeError(f"{role} worker for {spec['situations']} failed with exit status {completed.returncode} "
                       "(its output is above)")
  return json.loads(out_file.read_text())


def keras_backend_choice(requested: str, python: str | None = None) -> str | None:
  """auto: tensorflow when the Keras interpreter can import it, else jax."""
  if requested == "none":
    return None
  if requested == "auto":
    if not python:
      return "tensorflow" if importlib.util.find_spec("tensorflow") is not None else "jax"
    found = subprocess.run([python, "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('tensorflow') is None)"], check=False)
    return "tensorflow" if found.returncode == 0 else "jax"
  return requested


def measure(args) -> list[dict]:
  """Every row: project (cold, then warm from the cache the cold run wrote), Keras, the matmul peak."""
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="resdense_throughput_"))
  workdir.mkdir(parents=True, exist_ok=True)
  cache_dir = tempfile.mkdtemp(prefix="xla_cache_", dir=workdir)  # empty: the first compile of a step is cold
  spec = {"size": args.size, "batch": args.batch, "dtype": args.dtype, "backbones": args.backbones,
          "fusion": args.fusion, "tiny": args.tiny, "freeze_first": args.freeze_first, "steps": args.steps,
          "warmup": args.warmup, "scan": args.scan, "predictor_repeats": args.predictor_repeats,
          "workdir": str(workdir), "cache_dir": cache_dir, "remat": args.remat, "main_steps": args.main_steps,
          "cpu_ynnpack": args.cpu_ynnpack}
  groups = [list(args.situations)] if args.one_process else [[s] for s in args.situations]
  keras_backend = keras_backend_choice(args.keras_backend, args.keras_python or None)
  project, warm, keras_rows, info = {}, {}, {}, {}
  if not args.one_process:
    _log("matmul peak in its own process")
    info.update(_run_worker("project", {**spec, "situations": [], "warm": False, "matmul": True}, workdir))
  for index, group in enumerate(groups):
    out = _run_worker("project", {**spec, "situations": group, "warm": False,
                                  "matmul": args.one_process and index == 0}, workdir)
    info.update({k: v for k, v in out.items() if k != "rows"})
    project.update({row["situation"]: row for row in out["rows"]})
    if not args.no_warm:
      out = _run_worker("project", {**spec, "situations": group, "warm": True}, workdir)
      warm.update({row["situation"]: row for row in out["rows"]})
    if keras_backend:
      out = _run_worker("keras", {**spec, "situations": group}, workdir, env={"KERAS_BACKEND": keras_backend},
                        python=args.keras_python or None)
      info.update({k: v for k, v in out.items() if k != "rows"})
      keras_rows.update({row["situation"]: row for row in out["rows"]})
    for situation in group:  # What a long run has measured so far, in case it is stopped.
      mine, theirs = project[situation], keras_rows.get(situation, {})
      _log(f"{situation}: {mine['images_per_s']:.2f} images/s, first step {mine['first_step_cold_s']:.1f} s cold / "
           f"{_fmt(warm.get(situation, {}).get('first_step_warm_s'), '.1f')} s warm; Keras "
           f"{_fmt(theirs.get('keras_images_per_s'))} images/s, first step "
           f"{_fmt(theirs.get('keras_first_step_s'), '.1f')} s")
  main_run = None
  if args.main_steps:
    _log("main run: the training loop itself, for the time it waits on the loader")
    main_run = _run_worker("main_run", {**spec, "situations": ["main_run"]}, workdir)["rows"][0]
  peaks = {m["dtype"]: m["gflops"] for m in info.get("matmul", [])}
  peak = peaks.get(args.dtype)
  rows = []
  for situation in args.situations:
    row = {"situation": situation, "backbones": list(args.backbones), "tiny": args.tiny, "size": args.size,
           "batch": args.batch, "dtype": args.dtype, "fusion": args.fusion, "steps": args.steps,
           "warmup": args.warmup, "backend": info.get("backend"), "device_kind": info.get("device_kind"),
           "num_devices": info.get("num_devices"), "jax_version": info.get("jax_version"),
           "keras_backend": info.get("keras_backend"), "keras_version": info.get("keras_version"),
           "matmul_peak_gflops": peak, "matmul_peak_gflops_float32": peaks.get("float32"),
           "freeze": list(_freeze_rules(situation, spec)) if situation != "inference" else None,
           "cpu_ynnpack": args.cpu_ynnpack, "remat": args.remat}
    row.update(project[situation])
    row.update({k: v for k, v in warm.get(situation, {}).items() if "warm" in k})
    row.update({k: v for k, v in keras_rows.get(situation, {}).items() if k != "situation"})
    flops = row.get("gflop_per_step")
    row["gflops"] = flops / row["step_s_median"] if flops else None
    row["peak_fraction"] = row["gflops"] / peak if row["gflops"] and peak else None
    keras_ips = row.get("keras_images_per_s")
    row["ratio"] = row["images_per_s"] / keras_ips if keras_ips else None
    # Keras runs the same layers: the project's flops per image at Keras's rate.
    row["keras_gflops"] = flops / args.batch * keras_ips if flops and keras_ips else None
    row["keras_peak_fraction"] = row["keras_gflops"] / peak if row["keras_gflops"] and peak else None
    rows.append(row)
  if main_run:
    rows.append({**{k: rows[0][k] for k in ("backbones", "tiny", "size", "batch", "dtype", "backend",
                                            "device_kind")}, **main_run})
  return rows


LABELS = {"phase1": "phase 1 (backbones frozen)", "phase2": "phase 2 (first {n} layers frozen)",
          "all": "all trainable", "inference": "inference (eval step)"}


def _fmt(value, spec: str = ".2f") -> str:
  return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
  """The Markdown table: one line per situation, then the Predictor and the machine's matmul peak."""
  header = ("| situation | images/s | Keras images/s | ratio | first step cold / warm s | Keras first step s "
            "| GFLOP/step | GFLOP/s | % peak | Keras % peak | peak RSS MB (Keras) | XLA temp MB | device MB (Keras) |")
  lines = [header, "|" + " --- |" * header.count(" | ")  + " --- |"]
  main_runs = [r for r in rows if r["situation"] == "main_run"]
  rows = [r for r in rows if r["situation"] != "main_run"]
  for r in rows:
    label = LABELS[r["situation"]].format(n=r["freeze"][0].split(":")[1] if r["situation"] == "phase2" else "")
    lines.append(
        f"| {label} | {_fmt(r['images_per_s'])} | {_fmt(r.get('keras_images_per_s'))} | {_fmt(r['ratio'])} "
        f"| {_fmt(r.get('first_step_cold_s'), '.1f')} / {_fmt(r.get('first_step_warm_s'), '.1f')} "
        f"| {_fmt(r.get('keras_first_step_s'), '.1f')} | {_fmt(r.get('gflop_per_step'), '.3g')} "
        f"| {_fmt(r['gflops'], '.1f')} | {_fmt(r['peak_fraction'] and 100 * r['peak_fraction'], '.1f')} "
        f"| {_fmt(r['keras_peak_fraction'] and 100 * r['keras_peak_fraction'], '.1f')} "
        f"| {_fmt(r['host_peak_rss_mb'], '.0f')} ({_fmt(r.get('keras_host_peak_rss_mb'), '.0f')}) "
        f"| {_fmt(r.get('xla_temp_mb'), '.0f')} "
        f"| {_fmt(r['device_peak_mb'], '.0f')} ({_fmt(r.get('keras_device_peak_mb'), '.0f')}) |")
  first = rows[0]
  notes = [f"\n{'+'.join(first['backbones'])}{' (--tiny: one stage of one block, two for ResNet V2)' if first['tiny'] else ''}, "
           f"fusion {first['fusion']}, {first['size']}x{first['size']}, batch {first['batch']}, {first['dtype']}; "
           f"median of {first['steps']} steps after {first['warmup']} warm-up; jax {first['jax_version']} on "
           f"{first['num_devices']} x {first['device_kind']} ({first['backend']}"
           f"{'' if first['backend'] != 'cpu' else ', YNNPACK convolutions ' + ('on' if first['cpu_ynnpack'] else 'off')}"
           f", remat {first['remat']}); Keras "
           f"{first['keras_version'] or '-'} on {first['keras_backend'] or '-'}."]
  for r in rows:
    if r.get("predictor_images_per_s"):
      notes.append(f"Predictor, whole scan ({r['predictor_slices']} slices of {r['predictor_scan']}, reading "
                   f"{r['scan_read_s']:.2f} s included): {r['predictor_images_per_s']:.2f} images/s.")
  for r in main_runs:
    notes.append(f"Training loop (`train_and_evaluate`, phase-2 freezing, prefetch {r['main_prefetch']}, "
                 f"{r['main_steps_per_epoch']} steps per epoch, last epoch): {r['main_images_per_s']:.2f} images/s, "
                 f"{100 * r['data_wait_fraction']:.1f}% of the step time waiting on the loader.")
  notes.append(f"Matmul peak ({MATMUL_SIZE}x{MATMUL_SIZE}, XLA): "
               f"{_fmt(first['matmul_peak_gflops_float32'], '.1f')} GFLOP/s float32"
               + (f", {_fmt(first['matmul_peak_gflops'], '.1f')} {first['dtype']}"
                  if first["dtype"] != "float32" else "") + ".")
  return "\n".join(lines + notes)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=256, help="image size (default 256, the paper's)")
  parser.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  parser.add_argument("--backbones", type=lambda s: [b for b in s.split(",") if b],
                      default=["resnet101", "densenet121"], help="comma-separated (default resnet101,densenet121)")
  parser.add_argument("--fusion", type=int, default=None, help="fusion Conv2D width (default 1024; 64 with --tiny)")
  parser.add_argument("--tiny", action="store_true",
                      help="every backbone cut to its stem and one stage of one block (smoke runs)")
  parser.add_argument("--freeze_first", type=int, default=None,
                      help="phase 2 freezes the first N Keras layers of each backbone (default 100; 10 with --tiny)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default 2)")
  parser.add_argument("--situations", type=lambda s: [x for x in s.split(",") if x], default=list(SITUATIONS),
                      help=f"comma-separated subset of {','.join(SITUATIONS)}")
  parser.add_argument("--keras_backend", choices=("auto", "tensorflow", "jax", "none"), default="auto",
                      help="auto: tensorflow when importable, else jax; none: no Keras reference")
  parser.add_argument("--cpu_ynnpack", action="store_true",
                      help="keep XLA's YNNPACK convolution fusions on CPU in the project's rows (the command "
                      "lines' default, config.cpu_ynnpack=False, turns them off; resdense_jax/cpu_flags.py)")
  parser.add_argument("--remat", choices=("none", "blocks"), default="none",
                      help="config.train.remat of the training rows (their XLA temp MB shows what it saves)")
  parser.add_argument("--main_steps", type=int, default=8,
                      help="steps per epoch of the real training-loop run that measures the loader wait "
                      "(2 epochs; 0 skips it)")
  parser.add_argument("--keras_python", default="",
                      help="Python interpreter for the Keras reference (default this one), e.g. a virtual "
                      "environment with tensorflow and keras (`make bench-tf` makes .venv-tf)")
  parser.add_argument("--scan", default="", help="scan for the Predictor row (default: ../shared/data/"
                      "chest_ct_dicom, else a synthetic DICOM series)")
  parser.add_argument("--predictor_repeats", type=int, default=3, help="timed passes over the scan (default 3)")
  parser.add_argument("--no_warm", action="store_true", help="skip the cache-warm first-step measurement")
  parser.add_argument("--one_process", action="store_true",
                      help="all rows of an implementation in one process (faster; each row's peak RSS then "
                      "restarts from what the rows before it left, via /proc/self/clear_refs)")
  parser.add_argument("--workdir", default="", help="scratch folder (default: a new temporary folder)")
  parser.add_argument("--json", default="", help="write one JSON object per row to this file")
  parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
  parser.add_argument("--_spec", default="", help=argparse.SUPPRESS)
  parser.add_argument("--_out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.fusion is None:
    args.fusion = 64 if args.tiny else 1024
  if args.freeze_first is None:
    args.freeze_first = 10 if args.tiny else 100
  unknown = sorted(set(args.backbones) - set(KERAS_DEPTHS)) + sorted(set(args.situations) - set(SITUATIONS))
  if unknown or not args.backbones or not args.situations:
    parser.error(f"unknown or missing --backbones/--situations: {unknown}; backbones: {sorted(KERAS_DEPTHS)}, "
                 f"situations: {list(SITUATIONS)}")
  if args.steps < 1:
    parser.error("--steps must be at least 1")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args._worker:  # pylint: disable=protected-access
    spec = json.loads(pathlib.Path(args._spec).read_text())  # pylint: disable=protected-access
    out = {"project": project_worker, "keras": keras_worker,  # pylint: disable=protected-access
           "main_run": main_run_worker}[args._worker](spec)  # pylint: disable=protected-access
    pathlib.Path(args._out).write_text(json.dumps(out))  # pylint: disable=protected-access
    return
  started = time.perf_counter()
  rows = measure(args)
  print(table(rows), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
    _log(f"wrote {len(rows)} rows to {args.json}")
  _log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  main()
