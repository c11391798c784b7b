"""Issue 13's measurement: the attention scan head against the paper's mean head where few slices carry the finding.

A synthetic collection whose COVID scans carry their opacities in only a band of ~`lesion_fraction` of their
slices (data/synthetic.py); a small Res-Dense Net from scratch per head and seed, with the same budget: the
same number of steps of 16 slices each (the mean head: 16 slices a step; a scan head: 2 scans x 8 slices),
Adam 1e-3, nothing frozen, PreciseBN. Prints the validation scan macro-F1 / AUC of each run (last evaluation
and best), and for the attention head the attention given to the lesion slices of the validation COVID scans:
mean weight on lesion slices / mean weight on the other slices, and how often the top-weighted slice is a
lesion slice. Exits 1 when the attention head does not beat the mean head on mean macro-F1 or the ratio is
below --min_ratio.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/scan_head.py --seeds=0,1 --steps=400
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "configs"))

import common  # noqa: E402  pylint: disable=g-import-not-at-top
import demo  # noqa: E402  pylint: disable=g-import-not-at-top

from resdense_jax import cpu_flags  # noqa: E402

cpu_flags.set_ynnpack(False)  # as the command lines do, before JAX starts

from resdense_jax import data, predict, train  # noqa: E402
from resdense_jax.data import synthetic  # noqa: E402

SLICES_PER_STEP = 16


def make_config(head: str, seed: int, root: pathlib.Path, steps: int, steps_per_epoch: int, image_size: int):
  config = common.get_base_config()
  config.seed = seed
  config.data.root = str(root)
  config.data.image_size = image_size
  demo_model = demo.get_config().model  # the demo's small backbones, from scratch
  for field in ("backbones", "backbone_kwargs", "fusion_filters", "pretrained"):
    config.model[field] = demo_model[field]
  config.model.scan_head = head
  config.compilation_cache_dir = ""
  if head == "mean":
    config.train.batch_size = SLICES_PER_STEP
  else:
    config.train.batch_size = 2
    config.data.slices_per_scan = SLICES_PER_STEP // 2
  epochs = max(1, round(steps / steps_per_epoch))
  config.phases = [common.phase("all", epochs, (), optimizer="adam", learning_rate=1e-3)]
  config.train.eval_every_epochs = max(1, epochs // 6)
  config.train.precise_bn_batches = 20
  config.train.log_every_steps = 50
  config.eval.batch_size = 32
  config.eval.scan_length_bucket = 32
  return config, epochs


def attention_on_lesions(workdir: pathlib.Path, root: pathlib.Path) -> tuple[float, float]:
  """(mean weight on lesion slices / mean weight on the others, share of scans whose top slice is a lesion
  slice) over the validation COVID scans, from the best checkpoint."""
  predictor = predict.Predictor.from_checkpoint(workdir)
  ratios, hits = [], []
  for ref in data.discover(root).validation:
    if ref.label != 1:
      continue
    prediction = predictor.predict(ref)
    lesion = synthetic.load_mask(root, "validation", ref.scan_id).any(axis=(1, 2))[prediction.slice_indices]
    weights = prediction.slice_weights
    ratios.append(weights[lesion].mean() / max(weights[~lesion].mean(), 1e-12))
    hits.append(bool(lesion[int(np.argmax(weights))]))
  return float(np.mean(ratios)), float(np.mean(hits))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--heads", default="mean,attention")
  parser.add_argument("--steps", type=int, default=400, help="training steps of 16 slices, every run")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--lesion_fraction", type=float, default=0.15)
  parser.add_argument("--train_scans", type=int, default=16, help="per class")
  parser.add_argument("--val_scans", type=int, default=10, help="per class")
  parser.add_argument("--min_ratio", type=float, default=2.0)
  parser.add_argument("--workdir", default="")
  args = parser.parse_args(argv)
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="scan_head_bench_"))
  root = work / "data"
  if not root.exists():
    synthetic.write_collection(root, num_scans={"train": (args.train_scans,) * 2,
                                                "validation": (args.val_scans,) * 2, "test": 0},
                               slice_size=128, num_slices=(16, 28), seed=13, progress=False,
                               lesion_fraction=args.lesion_fraction)
  train_source = data.RawScans(data.discover(root).train, progress=False)
  slices = int(np.sum(train_source.num_slices))
  rows = []
  # The same budget for every head: the mean head's whole epochs of 16-slice steps, the scan heads as many
  # steps (rounded to their whole epochs of 2 scans a step).
  mean_per_epoch = slices // SLICES_PER_STEP
  budget = max(1, round(args.steps / mean_per_epoch)) * mean_per_epoch
  for head in args.heads.split(","):
    for seed in [int(s) for s in args.seeds.split(",")]:
      per_epoch = slices // SLICES_PER_STEP if head == "mean" else len(train_source.scans) // 2
      config, epochs = make_config(head, seed, root, budget, per_epoch, args.image_size)
      run_dir = work / f"{head}_{seed}"
      shutil.rmtree(run_dir, ignore_errors=True)
      start = time.perf_counter()
      result = train.train_and_evaluate(config, run_dir)
      wall = time.perf_counter() - start
      records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
      last = records[-1]
      row = {"head": head, "seed": seed, "steps": last["step"], "slices_seen": last["step"] * SLICES_PER_STEP,
             "epochs": epochs, "last_f1": last["val_scan_macro_f1"], "last_auc": last["val_scan_auc"],
             "best_f1": result["best_val_scan_macro_f1"], "wall_s": wall}
      if head != "mean":
        row["lesion_weight_ratio"], row["top_slice_is_lesion"] = attention_on_lesions(run_dir, root)
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(f"\ncollection: {root} (lesion_fraction {args.lesion_fraction}, {len(train_source.scans)} training scans, "
        f"{slices} slices), {args.image_size} px, {args.steps} steps of {SLICES_PER_STEP} slices per run\n")
  print("| head | seed | steps x 16 slices | last scan macro-F1 | last AUC | best macro-F1 | lesion/other weight "
        "| top slice on lesion | wall s |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['head']} | {r['seed']} | {r['steps']} | {r['last_f1']:.3f} | {r['last_auc']:.3f} | "
          f"{r['best_f1']:.3f} | {r.get('lesion_weight_ratio', float('nan')):.2f} | "
          f"{r.get('top_slice_is_lesion', float('nan')):.2f} | {r['wall_s']:.0f} |")
  by_head = {h: [r for r in rows if r["head"] == h] for h in {r["head"] for r in rows}}
  ok = True
  if "mean" in by_head and "attention" in by_head:
    mean_f1 = np.mean([r["last_f1"] for r in by_head["mean"]])
    attention_f1 = np.mean([r["last_f1"] for r in by_head["attention"]])
    ratio = min(r["lesion_weight_ratio"] for r in by_head["attention"])
    print(f"\nmean last macro-F1: mean head {mean_f1:.3f}, attention head {attention_f1:.3f}; "
          f"lowest lesion/other weight ratio {ratio:.2f} (asserted >= {args.min_ratio})")
    ok = attention_f1 > mean_f1 and ratio >= args.min_ratio
    print("PASS" if ok else "FAIL")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
