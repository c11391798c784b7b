"""Training logs: metrics.jsonl (one JSON object per evaluation) and TensorBoard events (tensorboardX, no
TensorFlow). Every process computes the same metrics; only process 0 writes them."""

from __future__ import annotations

import json
import os
import pathlib

import jax
from tensorboardX import SummaryWriter

# Fields of a metrics.jsonl record measured in seconds: the only ones two identical runs may differ in.
TIMING_FIELDS = ("train_images_per_s", "data_wait_fraction")


class MetricWriter:
  """Appends evaluation records and step scalars; a resumed run first drops what a killed run wrote after its
  latest checkpoint, so every record appears once."""

  def __init__(self, workdir: pathlib.Path, *, resume_step: int | None):
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    if jax.process_index() != 0:
      return
    if resume_step is not None and self.path.exists():
      self._truncate_after(resume_step)
    elif resume_step is None and self.path.exists():
      self.path.unlink()  # a fresh run in a workdir without checkpoints
    self.tb = SummaryWriter(str(workdir / "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    """Drop records a killed run wrote after its latest checkpoint: the resumed run writes them again."""
    kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, self.path)

  def write(self, record: dict) -> None:
    if self.tb is None:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if isinstance(value, (int, float)) and key not in ("step", "epoch", "phase"):
        self.tb.add_scalar(key, value, record["step"])
    self.tb.flush()

  def write_scalars(self, scalars: dict, step: int) -> None:
    if self.tb is None:
      return
    for key, value in scalars.items():
      self.tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def summary_line(record: dict) -> str:
  """One evaluation record as the line the training loop prints."""
  return (f"[{record['phase_name']} epoch {record['epoch']} step {record['step']}] "
          f"train_loss {record['train_loss']:.4f}  val scan macro-F1 {record['val_scan_macro_f1']:.4f}  "
          f"F1 covid {record['val_scan_f1_covid']:.4f} non-covid {record['val_scan_f1_noncovid']:.4f}  "
          f"acc {record['val_scan_accuracy']:.4f}  AUC {record['val_scan_auc']:.4f}  "
          f"slice acc {record['val_slice_accuracy']:.4f}")
