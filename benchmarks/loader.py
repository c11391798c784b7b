"""Train-pipeline throughput: raw JPEG folders vs prepared TFDS data, by worker count.

    python benchmarks/loader.py [--num_scans=8 --num_slices=32 --slice_size=512 --workers=0,1,2]

Writes (once, reused afterwards) a synthetic collection of 512x512 JPEG slices and its
prepared 256 px array_record copy under --workdir, then times augmented batches. Figures:
  slices/s      wall-clock throughput of the whole pipeline;
  per CPU-s     slices per CPU-second of this process (all its threads; worker processes
                are timed from /proc), i.e. what one core sustains;
  cores         CPU-seconds per wall-second: how many cores the configuration kept busy.
                Workers scale when slices/s grows with cores at a steady per CPU-s (on a
                machine shared with other jobs the cores column saturates early).
The target: prepared data >= 1000 augmented 256x256 slices per second per core.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from absl import app, flags

flags.DEFINE_string("workdir", "/tmp/resdense_loader_bench", "Collection and prepared data.")
flags.DEFINE_integer("num_scans", 8, "Scans (half COVID) in the synthetic collection.")
flags.DEFINE_integer("num_slices", 32, "Slices per scan.")
flags.DEFINE_integer("slice_size", 512, "Pixels per side of the JPEG slices.")
flags.DEFINE_integer("image_size", 256, "Training image size.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("batches", 40, "Timed batches per configuration.")
flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker processes to try.")
flags.DEFINE_list("threads", ["1", "8"], "Decoding threads per process to try.")
flags.DEFINE_list("sources", ["raw", "prepared"], "raw (JPEG folders) and/or prepared data.")
flags.DEFINE_integer("repeats", 1, "Timings per configuration (the median is reported).")
FLAGS = flags.FLAGS


def _descendants(pid: int) -> list[int]:
  parents = {}
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
      parents[int(stat.parent.name)] = int(fields[1])
    except (OSError, ValueError):
      pass
  found, frontier = [], [pid]
  while frontier:
    children = [p for p, parent in parents.items() if parent in frontier]
    found += children
    frontier = children
  return found


def _cpu_seconds(pid: int) -> float:
  """User + system CPU time of a process and its live descendants (grain workers), from /proc."""
  tick = os.sysconf("SC_CLK_TCK")
  total = 0.0
  for p in [pid, *_descendants(pid)]:
    try:
      fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick
    except OSError:
      pass
  return total


def _collection(workdir: Path) -> tuple[Path, Path]:
  from resdense_jax import data
  from resdense_jax.data import synthetic

  root, prepared = workdir / "collection", workdir / "prepared"
  if not root.exists():
    half = FLAGS.num_scans // 2
    synthetic.write_collection(root, num_scans={"train": (half, FLAGS.num_scans - half)},
                               slice_size=FLAGS.slice_size, seed=0,
                               num_slices=(FLAGS.num_slices, FLAGS.num_slices))
  data.prepare_dataset(root, prepared, image_size=FLAGS.image_size, val_fraction=0.125,
                       num_workers=min(os.cpu_count() or 1, 4))
  return root, prepared


def _time(source, workers: int, threads: int) -> tuple[float, float, float]:
  from resdense_jax import data

  ds = data.train_pipeline(source, image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                           seed=0, num_workers=workers, read_threads=threads)
  it = iter(ds)
  for _ in range(3):
    next(it)  # Warm up: worker start, file caches, thread pools.
  cpu0, t0 = _cpu_seconds(os.getpid()), time.perf_counter()
  for _ in range(FLAGS.batches):
    next(it)
  wall, cpu = time.perf_counter() - t0, _cpu_seconds(os.getpid()) - cpu0
  if hasattr(it, "close"):
    it.close()
  slices = FLAGS.batches * FLAGS.batch_size
  return slices / wall, slices / max(cpu, 1e-9), cpu / wall


def main(argv):
  del argv
  from resdense_jax import data

  root, prepared = _collection(Path(FLAGS.workdir))
  sources = {}
  if "raw" in FLAGS.sources:
    sources["raw 512px JPEG folders"] = data.discover(root).train
  if "prepared" in FLAGS.sources:
    sources["prepared 256px array_record"] = data.PreparedData(prepared, "train")
  print(f"{os.cpu_count()} CPUs; batch {FLAGS.batch_size}, {FLAGS.batches} timed batches, "
        f"augmented {FLAGS.image_size}x{FLAGS.image_size} slices, median of {FLAGS.repeats}")
  print(f"{'source':30s} {'workers':>7s} {'threads':>7s} {'slices/s':>10s} {'per CPU-s':>10s} "
        f"{'cores':>6s}")
  for name, source in sources.items():
    for workers in map(int, FLAGS.workers):
      for threads in map(int, FLAGS.threads):
        runs = [_time(source, workers, threads) for _ in range(FLAGS.repeats)]
        rate, per_cpu, cores = sorted(runs, key=lambda run: run[1])[len(runs) // 2]
        print(f"{name:30s} {workers:7d} {threads:7d} {rate:10.0f} {per_cpu:10.0f} {cores:6.2f}",
              flush=True)


if __name__ == "__main__":
  app.run(main)
