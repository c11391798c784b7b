"""Orbax checkpoints: the best (by validation scan macro-F1) and the latest, with the data-iterator state.

Retention: orbax's `best_fn` alone keeps only the best N and deletes the latest, so the manager uses a
preservation policy "LatestN(1) or BestN(1)". Checkpoints saved without metrics (mid-epoch, for resuming)
are kept only while they are the latest.

Each checkpoint step holds three items:
  state      the TrainState (params, batch_stats, optimizer state, step, RNG and, with config.train.ema_decay,
             the moving average of the weights: what `load_for_inference` returns, so predict, explain and
             reports use it, while a resumed run continues from the raw weights and the average alike)
  data_iter  the grain iterator state (grain's own orbax handler), so a resumed run sees the same batches
  meta       JSON: phase index and the running train-loss sums; the best metric so far and the evaluations
             since it last improved (early stopping, `early_stop` when the run stopped); after an evaluation
             the threshold maximising validation scan macro-F1 (`val_scan_best_threshold`, `load_threshold`)
The resolved config sits in `config.json` next to the step folders, for `load_for_inference`.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

import grain.checkpoint as grain_checkpoint
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from resdense_jax import optim
from resdense_jax.models.build import create_model


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON to a temporary file and renames it into place (never a half-written file)."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def create_manager(directory: str | os.PathLike, *, best_metric: str = "val_scan_macro_f1",
                   async_save: bool = True) -> ocp.CheckpointManager:
  """A manager keeping the latest checkpoint and the one with the highest `best_metric`."""
  directory = pathlib.Path(directory).absolute()
  get_metric = lambda metrics: metrics[best_metric]
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=1),
          policies.BestN(get_metric_fn=get_metric, reverse=False, n=1, keep_checkpoints_without_metrics=False),
      ]),
      best_fn=get_metric,  # only for best_step(); retention is the policy above
      best_mode="max",
      enable_async_checkpointing=async_save,
      create=True,
  )
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict,
         metrics: dict | None = None) -> None:
  """Saves state, iterator and meta at `step`; `metrics` ranks it for the best-checkpoint policy."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data_iter=grain_checkpoint.CheckpointSave(data_iterator),
                            meta=ocp.args.JsonSave(meta))
  manager.save(step, args=args, metrics=metrics, force=True)


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """Only the JSON meta of a checkpoint (it says which phase's optimizer state to expect)."""
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore(manager: ocp.CheckpointManager, step: int, template, data_iterator):
  """(state, data_iterator) restored at `step`; `template` gives the state's structure, dtypes and shardings."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data_iter=grain_checkpoint.CheckpointRestore(data_iterator)))
  return restored.state, restored.data_iter


def best_metric_value(manager: ocp.CheckpointManager, step: int | None, name: str) -> float | None:
  if step is None:
    return None
  metrics = manager.metrics(step)
  return None if metrics is None else float(metrics[name])


def best_step(folder: str | os.PathLike, best_metric: str = "val_scan_macro_f1") -> int:
  """The step of the best checkpoint in a checkpoints folder, as the manager picks it."""
  manager = create_manager(folder, best_metric=best_metric, async_save=False)
  try:
    step = manager.best_step()
  finally:
    manager.close()
  if step is None:
    raise FileNotFoundError(f"{folder}: no evaluated checkpoint saved yet")
  return int(step)


def _find_step_dir(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(checkpoints folder, step folder) for a workdir, a checkpoints folder (-> best step) or a step folder."""
  if (path / "state").is_dir():
    return path.parent, path
  for folder in (path / "checkpoints", path):
    if (folder / "config.json").is_file():
      return folder, folder / str(best_step(folder))
  raise FileNotFoundError(f"{path}: not a checkpoint (no state/), checkpoints folder or workdir (no config.json)")


def load_meta(checkpoint_dir: str | os.PathLike) -> tuple[pathlib.Path, dict]:
  """(step folder, its JSON meta) of the checkpoint `load_for_inference` loads for `checkpoint_dir`."""
  _, step_dir = _find_step_dir(pathlib.Path(checkpoint_dir).expanduser().absolute())
  checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
  try:
    return step_dir, dict(checkpointer.restore(step_dir / "meta"))
  finally:
    checkpointer.close()


def load_threshold(checkpoint_dir: str | os.PathLike) -> tuple[float, float]:
  """(threshold, validation scan macro-F1 there) recorded with the checkpoint `load_for_inference` loads:
  the threshold that maximised the validation scan macro-F1 at that evaluation (metrics.best_threshold)."""
  step_dir, meta = load_meta(checkpoint_dir)
  if meta.get("val_scan_best_threshold") is None:
    raise ValueError(f"{step_dir}: this checkpoint records no validation threshold (saved by an older version, "
                     "or not at an evaluation); give the threshold as a number instead, e.g. --threshold=0.5")
  return float(meta["val_scan_best_threshold"]), float(meta["val_scan_best_threshold_macro_f1"])


def restore_on_host(item_dir: str | os.PathLike) -> Any:
  """One saved tree (a step's `state/` folder) as host NumPy arrays, whatever devices the saving run had.

  Every leaf gets explicit restore arguments (NumPy): orbax needs no shardings (the saved ones name the devices
  of the training run, two devices or two processes, which this process may not have) and does not fall back
  on the checkpoint's sharding file with its "Sharding info not provided" warning. Nothing is logged that the
  caller would have to act on.
  """
  item_dir = pathlib.Path(item_dir)
  handler = ocp.PyTreeCheckpointHandler()
  checkpointer = ocp.Checkpointer(handler)
  try:
    # The handler's own metadata (the saved tree): Checkpointer.metadata would also look for the step's metadata
    # file inside the item folder, where the manager never writes it, and log a warning about its absence.
    metadata = handler.metadata(item_dir).tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  finally:
    checkpointer.close()


def load_for_inference(checkpoint_dir: str | os.PathLike, *, ema: bool = True):
  """(model, variables, config) from the best checkpoint of a run, or from a given step folder.

  `checkpoint_dir` is a workdir, its `checkpoints/` folder (the best step is taken), or one step folder.
  `variables` is {"params", "batch_stats"} as host NumPy-backed jax arrays on the default device: the moving
  average of the weights when the run kept one (config.train.ema_decay; what it evaluated), unless `ema` is
  False (then the raw trained weights).
  """
  folder, step_dir = _find_step_dir(pathlib.Path(checkpoint_dir).expanduser().absolute())
  config_path = folder / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path}: missing; the resolved config is saved there by train_and_evaluate")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  tree = restore_on_host(step_dir / "state")
  average = tree.get("ema") if ema else None
  variables = jax.device_put(optim.ema_variables(tree["params"], average or None, tree["batch_stats"]))
  return create_model(config.model), variables, config
