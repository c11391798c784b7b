"""How much validation scan macro-F1 swings from one epoch to the next, with and without the stabilisers.

    python benchmarks/stability.py [--seeds=0,1,2] [--settings=paper,stable] [--finetune_epochs=11]

Trains the demo (configs/demo.py: synthetic CT, small Res-Dense Net from scratch, two phases) once per seed
and setting, in this process one after the other, and prints per setting, averaged over the seeds:
  mean |dF1|   mean absolute change of validation scan macro-F1 between consecutive epochs
  mean / max drop  the mean and the largest fall from one epoch to the next (0 for a curve that only rises:
               unlike |dF1|, learning progress does not count as a swing)
  std          standard deviation of macro-F1 over the epochs after the first
  min / max    lowest and highest macro-F1 over the epochs after the first
  final / best macro-F1 of the last epoch, and the best epoch's
  loss@1       the first epoch's training loss (ln 2 = 0.693 is a neutral start)
and the same per seed with --per_seed. Settings (--settings, comma-separated):
  paper            the demo as it is (head_init "flax", no warmup, no EMA, no label smoothing)
  all              the four stabilisers below together
  stable           configs/finetune_stable.py's choice: zeros_head + ema
  zeros_head       config.model.head_init = "zeros" (logits 0, p = 0.5 at step 0)
  warmup           every phase warms its learning rate up over --warmup_epochs
  ema              config.train.ema_decay = --ema_decay (evaluation and checkpoints use the average)
  label_smoothing  config.train.label_smoothing = --label_smoothing
  balanced         config.data.balanced_sampling (not a stabiliser; for comparison)
  a+b              several of the above together, e.g. zeros_head+warmup
Each run has its own folder under --workdir; a finished run is read back instead of trained again, so an
interrupted measurement continues where it stopped. The synthetic collection is written once per seed.
A shortened variant for a quick check: --finetune_epochs=3 --seeds=0,1 (about 1-2 minutes a run on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import pathlib
import statistics
import sys
import time
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resdense_jax import cpu_flags  # noqa: E402  (before anything starts a JAX backend)

METRIC = "val_scan_macro_f1"


def load_config(path: pathlib.Path):
  """get_config() of a config file (configs/demo.py imports configs/common.py from its own folder)."""
  sys.path.insert(0, str(path.parent))
  spec = importlib.util.spec_from_file_location(f"stability_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _zeros_head(config, args):
  config.model.head_init = "zeros"


def _warmup(config, args):
  for phase in config.phases:
    phase.optimizer.warmup_steps = 0
    phase.optimizer.warmup_epochs = args.warmup_epochs


def _ema(config, args):
  config.train.ema_decay = args.ema_decay


def _label_smoothing(config, args):
  if "label_smoothing" not in config.train:
    raise SystemExit("config.train.label_smoothing does not exist in this tree; drop label_smoothing from "
                     "--settings")
  config.train.label_smoothing = args.label_smoothing


def _balanced(config, args):
  config.data.balanced_sampling = True


STABILISERS: dict[str, Callable] = {"zeros_head": _zeros_head, "warmup": _warmup, "ema": _ema,
                                    "label_smoothing": _label_smoothing}
SETTINGS: dict[str, tuple[Callable, ...]] = {
    "paper": (),
    "all": tuple(STABILISERS.values()),
    "stable": (_zeros_head, _ema),
    **{name: (change,) for name, change in STABILISERS.items()},
    "balanced": (_balanced,),
}


def changes(setting: str) -> tuple[Callable, ...]:
  """The config changes of a setting name ("ema", or several joined by "+")."""
  return tuple(change for part in setting.split("+") for change in SETTINGS[part])


def spread(f1s: list[float]) -> dict[str, float]:
  """Epoch-to-epoch spread of one run's validation macro-F1 series (one value per epoch)."""
  later = f1s[1:] or f1s
  changes = [abs(b - a) for a, b in zip(f1s, f1s[1:])]
  drops = [max(0.0, a - b) for a, b in zip(f1s, f1s[1:])]
  return {"mean_abs_change": statistics.fmean(changes) if changes else 0.0,
          "mean_drop": statistics.fmean(drops) if drops else 0.0, "max_drop": max(drops, default=0.0),
          "std": statistics.pstdev(later), "min": min(later), "max": max(later),
          "final": f1s[-1], "best": max(f1s)}


def run_config(base, setting: str, seed: int, args):
  # A deep copy: copy_and_resolve_references shares the ConfigDicts inside lists (the phases), so a setting's
  # warmup would leak into the settings after it.
  config = copy.deepcopy(base)
  config.seed = seed
  if args.finetune_epochs is not None:
    config.phases[-1].epochs = args.finetune_epochs
  # The collection of this seed, written once and shared by the settings (the demo writes one per workdir).
  config.data.synthetic = False
  config.data.root = str(pathlib.Path(args.workdir) / f"collection_seed{seed}")
  for change in changes(setting):
    change(config, args)
  return config


def write_collection(base, seed: int, workdir: pathlib.Path) -> None:
  from resdense_jax.data import synthetic  # noqa: PLC0415  (after cpu_flags: imports JAX)
  from resdense_jax.models.build import plain  # noqa: PLC0415  (the same)
  root = workdir / f"collection_seed{seed}"
  if not (root / ".complete").exists():
    synthetic.write_collection(root, num_scans=plain(base.data.synthetic_scans),
                               slice_size=base.data.synthetic_slice_size,
                               num_slices=tuple(base.data.synthetic_num_slices), seed=seed)
    (root / ".complete").write_text("written by benchmarks/stability.py\n")


def run(config, workdir: pathlib.Path) -> list[dict]:
  """Trains (or, when finished before, reads back) one run; its evaluation records."""
  from resdense_jax import train  # noqa: PLC0415  (after cpu_flags: imports JAX)
  train.train_and_evaluate(config, workdir)
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def table(rows: list[tuple[str, dict]], title: str) -> str:
  lines = [f"{title}", "", "| setting | runs | mean abs dF1 | mean drop | max drop | std | min | max | final | best "
           "| loss@1 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for name, s in rows:
    lines.append(f"| {name} | {s['runs']} | {s['mean_abs_change']:.3f} | {s['mean_drop']:.3f} | {s['max_drop']:.3f} | "
                 f"{s['std']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {s['final']:.3f} | {s['best']:.3f} | "
                 f"{s['loss1']:.3f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=str(ROOT / "configs" / "demo.py"))
  parser.add_argument("--workdir", default="/tmp/resdense_stability")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--settings", default="paper,stable")
  parser.add_argument("--finetune_epochs", type=int, default=None,
                      help="epochs of the last phase (default: the config's; the demo has 11)")
  parser.add_argument("--warmup_epochs", type=float, default=0.5)
  parser.add_argument("--ema_decay", type=float, default=0.99)
  parser.add_argument("--label_smoothing", type=float, default=0.1)
  parser.add_argument("--per_seed", action="store_true", help="also one row per seed")
  args = parser.parse_args(argv)
  unknown = [p for s in args.settings.split(",") for p in s.split("+") if p not in SETTINGS]
  if unknown:
    parser.error(f"unknown settings {unknown}; choose from {sorted(SETTINGS)}")
  base = load_config(pathlib.Path(args.config))
  cpu_flags.set_ynnpack(base.get("cpu_ynnpack", False))  # as the command lines do
  workdir = pathlib.Path(args.workdir)
  seeds = [int(s) for s in args.seeds.split(",")]
  results: dict[str, dict[int, dict]] = {}
  for seed in seeds:
    write_collection(base, seed, workdir)
  for setting in args.settings.split(","):
    for seed in seeds:
      start = time.perf_counter()
      records = run(run_config(base, setting, seed, args), workdir / f"{setting}_seed{seed}")
      f1s = [r[METRIC] for r in records]
      results.setdefault(setting, {})[seed] = {**spread(f1s), "loss1": records[0]["train_loss"], "f1s": f1s}
      print(f"{setting} seed {seed}: {METRIC} by epoch {[round(f, 3) for f in f1s]} "
            f"({time.perf_counter() - start:.0f} s)", flush=True)
  keys = ("mean_abs_change", "mean_drop", "max_drop", "std", "min", "max", "final", "best", "loss1")
  rows = [(name, {"runs": len(by_seed), **{k: statistics.fmean(r[k] for r in by_seed.values()) for k in keys}})
          for name, by_seed in results.items()]
  print()
  print(table(rows, f"Validation scan macro-F1 over epochs, mean over seeds {seeds} ({args.config})"))
  if args.per_seed:
    per_seed = [(f"{name} seed {seed}", {"runs": 1, **r}) for name, by_seed in results.items()
                for seed, r in by_seed.items()]
    print()
    print(table(per_seed, "Per seed"))
  (workdir / "summary.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
  main()
