"""Fine-tuning Res-Dense Net: train state, jit-compiled steps, phases, and the training loop.

flax examples/imagenet style: small pure functions (create_model, create_train_state, train_step, eval_step)
and `train_and_evaluate(config, workdir)` that wires data, phases, evaluation, checkpoints and logging.

Data parallel from the first line: a Mesh over all devices with one "data" axis; batches are sharded on it,
the train state is replicated, so one CPU, several GPUs or a TPU VM run the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resdense_jax import checkpoints, evaluate, losses, optim
from resdense_jax.models.keras_layers import BN_MOMENTUM
from resdense_jax.models.resdense import ResDenseNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@struct.dataclass
class TrainState:
  """Everything a step changes; optimizer and model are static (per phase) and live outside."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


@dataclasses.dataclass(frozen=True)
class Phase:
  """One fine-tuning phase: steps [start_step, end_step), its labels, model (frozen BatchNorms) and optimizer."""
  index: int
  name: str
  start_step: int
  end_step: int
  labels: Any
  model: ResDenseNet
  tx: optax.GradientTransformation


# -------------------------------------------------------------------------------------------------- model


def _plain(value):
  """ConfigDict / lists -> plain dicts / tuples (hashable module attributes)."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return {k: _plain(v) for k, v in dict(value).items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def create_model(model_config: ml_collections.ConfigDict, *, frozen_bn=()) -> ResDenseNet:
  """The Res-Dense Net the config describes."""
  if model_config.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {model_config.dtype!r}")
  return ResDenseNet(
      backbones=tuple(model_config.backbones),
      fusion_filters=model_config.fusion_filters,
      fusion_kernel=model_config.fusion_kernel,
      fusion_activation=model_config.fusion_activation or None,
      pooling=model_config.pooling,
      dropout=model_config.dropout,
      num_outputs=model_config.num_outputs,
      preprocessing=model_config.preprocessing,
      backbone_kwargs=_plain(model_config.backbone_kwargs),
      frozen_bn=tuple(frozen_bn),
      backbone_bn_inference=model_config.backbone_bn_inference,
      dtype=DTYPES[model_config.dtype],
  )


def initialized(rng: jax.Array, model: ResDenseNet, image_size: int) -> dict:
  """Fresh {"params", "batch_stats"} (float32 params), jit-compiled so the init runs once through XLA."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))({"params": rng}, x)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def load_pretrained(model: ResDenseNet, variables: dict, model_config) -> dict:
  """Keras ImageNet weights into each backbone's sub-tree (config.model.pretrained == "imagenet")."""
  if model_config.pretrained in ("", "none", None):
    return variables
  if model_config.pretrained != "imagenet":
    raise ValueError(f"config.model.pretrained must be 'imagenet' or 'none', got {model_config.pretrained!r}")
  from resdense_jax import weights  # pylint: disable=g-import-not-at-top  (h5py only when needed)

  params = dict(variables["params"])
  batch_stats = dict(variables["batch_stats"])
  for name, backbone in model.backbone_modules().items():
    try:
      loaded = weights.load_keras(backbone, "imagenet", cache_dir=model_config.weights_dir or None,
                                  download=model_config.download_weights)
    except weights.WeightsError as e:
      raise weights.WeightsError(
          f"ImageNet weights for {name}: {e}\nGet them with `python -m resdense_jax.weights` (see its --help), "
          f"or let Keras download them once (keras.applications.{_keras_name(name)}(weights='imagenet', "
          "include_top=False)), or put the published .h5 files into --config.model.weights_dir; "
          "or train from scratch with --config.model.pretrained=none.") from e
    params[name] = loaded["params"]
    batch_stats[name] = loaded["batch_stats"]
  return {"params": params, "batch_stats": batch_stats}


def _keras_name(backbone: str) -> str:
  return {"resnet": "ResNet", "densenet": "DenseNet"}[backbone.rstrip("0123456789")] + backbone.lstrip(
      "resnetdenst")


# ----------------------------------------------------------------------------------------------- sharding


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis "data" over all devices."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


# ------------------------------------------------------------------------------------------------- phases


def plan_phases(config, steps_per_epoch: int) -> list[tuple[str, Any, int, int]]:
  """(name, phase config, start step, end step) of each phase, back to back."""
  plan, start = [], 0
  for phase_config in config.phases:
    end = start + int(phase_config.epochs) * steps_per_epoch
    plan.append((phase_config.name, phase_config, start, end))
    start = end
  if start == 0:
    raise ValueError("config.phases trains for 0 epochs in total")
  return plan


def create_phase(index: int, plan, config, params) -> Phase:
  """Labels, frozen BatchNorms, model and optimizer of phase `index` of `plan`."""
  name, phase_config, start, end = plan[index]
  base_model = create_model(config.model)
  keras_layers = base_model.keras_layers()
  labels = optim.freeze_labels(params, tuple(phase_config.freeze), keras_layers)
  frozen_bn = optim.frozen_batchnorm(labels, keras_layers)
  model = create_model(config.model, frozen_bn=tuple(frozen_bn.items()))
  tx = optim.create_optimizer(phase_config.optimizer, labels, end - start)
  return Phase(index, name, start, end, labels, model, tx)


def phase_index_at(plan, step: int) -> int:
  """The phase that runs step `step` (0-based); the last phase at or past the end."""
  for index, (_, _, start, end) in enumerate(plan):
    if start <= step < end:
      return index
  return len(plan) - 1


# ------------------------------------------------------------------------------------------ state and steps


def create_train_state(rng: jax.Array, variables: dict, phase: Phase) -> TrainState:
  """Step 0 with the phase's fresh optimizer state."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=phase.tx.init(variables["params"]), rng=rng)


def start_phase(state: TrainState, phase: Phase) -> TrainState:
  """Each phase starts its own optimizer (fresh state) on the current weights."""
  return state.replace(opt_state=phase.tx.init(state.params))


def train_step(state: TrainState, batch: dict, *, model: ResDenseNet, tx: optax.GradientTransformation,
               labels: Any, loss_fn: Callable) -> tuple[TrainState, dict]:
  """One optimizer step; only the trainable partition is differentiated, frozen weights are constants."""
  trainable, frozen = optim.split(state.params, labels)
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_of(trainable_params):
    variables = {"params": optim.merge(trainable_params, frozen), "batch_stats": state.batch_stats}
    logits, updated = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"],
                                  rngs={"dropout": dropout_rng})
    return loss_fn(logits, batch["label"]), (logits, updated["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
  full_grads = optim.merge(grads, optim.zeros_for(frozen))
  updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
  flat_updates, _ = optim.split(updates, labels)
  # Frozen weights are carried over as they are (bitwise), never added to a zero update.
  params = optim.merge(optax.apply_updates(trainable, flat_updates), frozen)
  preds = (losses.covid_probability(logits) > 0.5).astype(jnp.int32)
  metrics = {"loss": loss, "accuracy": jnp.mean(preds == batch["label"])}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def eval_step(variables: dict, images: jax.Array, *, model: ResDenseNet) -> jax.Array:
  """P(COVID) of each slice, inference mode."""
  logits = model.apply(variables, images, train=False)
  return losses.covid_probability(logits)


def batch_statistics(variables: dict, images: jax.Array, *, model: ResDenseNet) -> Any:
  """The mean and variance each BatchNorm computes on this batch in training mode (a tree like batch_stats).

  Flax's update is new = m * old + (1 - m) * batch, so the batch statistic is recovered from it; layers in
  inference mode (frozen, or every backbone's with backbone_bn_inference) leave old unchanged and keep it.
  """
  _, updated = model.apply(variables, images, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.PRNGKey(0)})
  m = BN_MOMENTUM

  def recovered(new, old):
    return jnp.where(new == old, old, (new - m * old) / (1.0 - m))

  return jax.tree.map(recovered, updated["batch_stats"], variables["batch_stats"])


def compile_batch_statistics(model: ResDenseNet, mesh: Mesh):
  """batch_statistics, jit-compiled with the variables replicated and the images sharded."""
  return jax.jit(functools.partial(batch_statistics, model=model),
                 in_shardings=(replicated(mesh), data_sharded(mesh)), out_shardings=replicated(mesh))


def precise_batch_stats(state: TrainState, batches, *, stats_fn: Callable, batch_sharding: NamedSharding,
                        num_batches: int) -> TrainState:
  """PreciseBN (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): the BatchNorm moving statistics
  replaced by the average of `num_batches` batches' statistics under the current weights.

  Keras's moving average (momentum 0.99, ~100 steps) trails weights that still move fast (a from-scratch
  model at a large learning rate), so evaluation normalises with statistics of older weights. Only
  inference-mode statistics change; the training trajectory of the parameters does not.
  `stats_fn`: compile_batch_statistics(model, mesh), compiled once per phase rather than per evaluation.
  """
  from resdense_jax import data  # pylint: disable=g-import-not-at-top

  total, count = None, 0
  for batch in tqdm.tqdm(batches, total=num_batches, desc="precise BN", unit="batch", leave=False,
                         dynamic_ncols=True):
    images = data.to_global_batch({"image": batch["image"]}, batch_sharding)["image"]
    stats = stats_fn(state.variables, images)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
    if count == num_batches:
      break
  if count == 0:
    raise ValueError("precise BatchNorm statistics need at least one training batch")
  return state.replace(batch_stats=jax.tree.map(lambda s: s / count, total))


def compile_train_step(phase: Phase, loss_fn: Callable, mesh: Mesh):
  """train_step for this phase, jit-compiled with the state donated and replicated, the batch sharded."""
  step = functools.partial(train_step, model=phase.model, tx=phase.tx, labels=phase.labels, loss_fn=loss_fn)
  return jax.jit(step, in_shardings=(replicated(mesh), data_sharded(mesh)), out_shardings=replicated(mesh),
                 donate_argnums=0)


def compile_eval_step(model: ResDenseNet, mesh: Mesh):
  step = functools.partial(eval_step, model=model)
  return jax.jit(step, in_shardings=(replicated(mesh), data_sharded(mesh)), out_shardings=replicated(mesh))


# ------------------------------------------------------------------------------------------------ logging


class MetricWriter:
  """metrics.jsonl (one JSON per evaluation) and TensorBoard events (tensorboardX, no TensorFlow).

  Every process computes the same metrics; only process 0 writes them (the others' writer does nothing).
  """

  def __init__(self, workdir: pathlib.Path, *, resume_step: int | None):
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    if jax.process_index() != 0:
      return
    if resume_step is not None and self.path.exists():
      self._truncate_after(resume_step)
    elif resume_step is None and self.path.exists():
      self.path.unlink()  # a fresh run in a workdir without checkpoints
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
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


def _summary_line(record: dict) -> str:
  return (f"[{record['phase_name']} epoch {record['epoch']} step {record['step']}] "
          f"train_loss {record['train_loss']:.4f}  val scan macro-F1 {record['val_scan_macro_f1']:.4f}  "
          f"F1 covid {record['val_scan_f1_covid']:.4f} non-covid {record['val_scan_f1_noncovid']:.4f}  "
          f"acc {record['val_scan_accuracy']:.4f}  AUC {record['val_scan_auc']:.4f}  "
          f"slice acc {record['val_slice_accuracy']:.4f}")


# ------------------------------------------------------------------------------------------------ the loop


def resolve_data_root(config, workdir: pathlib.Path) -> pathlib.Path:
  """The collection's root: config.data.root, or the synthetic collection generated into the workdir
  (by process 0; with several processes the workdir must be shared, as orbax's checkpoints need anyway)."""
  from resdense_jax import data  # pylint: disable=g-import-not-at-top

  if config.data.synthetic:
    root = workdir / "synthetic_ct"
    if jax.process_index() == 0 and not (root / ".complete").exists():
      data.synthetic.write_collection(root, num_scans=_plain(config.data.synthetic_scans),
                                      slice_size=config.data.synthetic_slice_size,
                                      num_slices=tuple(config.data.synthetic_num_slices), seed=config.seed)
      (root / ".complete").write_text("written by resdense_jax.train\n")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("resdense_jax synthetic collection written")
    return root
  if not config.data.root:
    raise ValueError(
        "no data: set --config.data.root=/path/to/COV19-CT-DB (folders train/{covid,non-covid}/<scan>/*.jpg and "
        "validation/...). COV19-CT-DB is distributed by the MIA-COV19D / ECCV-AIMIA organisers on request "
        "(https://mlearn.lincoln.ac.uk/), or run --config=configs/demo.py to train on a synthetic collection.")
  root = pathlib.Path(config.data.root).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(
        f"{root}: no such folder. Point --config.data.root at the COV19-CT-DB root (with train/ and "
        "validation/ inside); the database is distributed by the MIA-COV19D organisers on request.")
  return root


def data_sources(config, workdir: pathlib.Path):
  """(train, validation) slice sources: a prepared TFDS copy (config.data.prepared_dir) or the raw scan folders."""
  from resdense_jax import data  # pylint: disable=g-import-not-at-top

  if config.data.get("prepared_dir"):
    # Written by `python -m resdense_jax.data.prepare`, which already split by scan.
    return tuple(data.PreparedData(config.data.prepared_dir, split, image_size=config.data.image_size)
                 for split in ("train", "validation"))
  collection = data.discover(resolve_data_root(config, workdir), val_fraction=config.data.val_fraction,
                             seed=config.seed)
  return data.RawScans(collection.train), data.RawScans(collection.validation)


def precise_bn_batches(train_source, config, step: int):
  """Un-augmented, shuffled training batches for precise_batch_stats: the inputs look like evaluation's
  (no rotation corners), and they are drawn afresh from (seed, step), so a resumed run draws the same."""
  from resdense_jax import data  # pylint: disable=g-import-not-at-top

  return iter(data.train_pipeline(train_source, image_size=config.data.image_size,
                                  batch_size=config.train.batch_size, seed=config.seed + 1 + step,
                                  num_epochs=None, augment=False, middle_fraction=config.data.middle_fraction,
                                  num_workers=0))


def save_resolved_config(config, workdir: pathlib.Path) -> None:
  """config.json in the workdir and next to the checkpoints (load_for_inference reads the latter); process 0."""
  if jax.process_index() != 0:
    return
  for folder in (workdir, workdir / "checkpoints"):
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints.write_json_atomic(folder / "config.json", json.loads(config.to_json_best_effort()))


def setup_run(config, workdir: pathlib.Path):
  """What a run settles before its first step: (train source, validation source, steps per epoch, phase plan).

  Checks the batch sizes against the devices, finds the data and writes the resolved config.json.
  """
  from resdense_jax import data  # pylint: disable=g-import-not-at-top

  workdir.mkdir(parents=True, exist_ok=True)
  devices = len(jax.devices())
  if config.train.batch_size % devices or config.eval.batch_size % devices:
    raise ValueError(f"train/eval batch sizes ({config.train.batch_size}, {config.eval.batch_size}) must divide "
                     f"evenly over the {devices} devices")
  train_source, val_source = data_sources(config, workdir)
  steps_per_epoch = data.steps_per_epoch(train_source, config.train.batch_size,
                                         middle_fraction=config.data.middle_fraction)
  plan = plan_phases(config, steps_per_epoch)
  save_resolved_config(config, workdir)
  return train_source, val_source, steps_per_epoch, plan


def dry_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Everything train_and_evaluate settles before training, without training: the data, config.json, and per
  phase its steps, freezing and parameter counts. Shapes only: no weights loaded, nothing compiled."""
  train_source, val_source, steps_per_epoch, plan = setup_run(config, pathlib.Path(workdir))
  model = create_model(config.model)
  size = config.data.image_size
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]
  phases = []
  for index, (name, phase_config, start, end) in enumerate(plan):
    counts = optim.count(create_phase(index, plan, config, params).labels, params)
    phases.append({"name": name, "start_step": start, "end_step": end, "freeze": list(phase_config.freeze),
                   "optimizer": phase_config.optimizer.name, "learning_rate": phase_config.optimizer.learning_rate,
                   "trainable_params": counts[optim.TRAINABLE], "frozen_params": counts[optim.FROZEN]})
  return {"backbones": list(model.backbones), "image_size": size, "batch_size": config.train.batch_size,
          "train_scans": len(train_source.scans), "train_slices": int(np.sum(train_source.num_slices)),
          "validation_scans": len(val_source.scans), "steps_per_epoch": steps_per_epoch, "phases": phases}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       max_steps: int | None = None) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`), evaluating after each epoch.

  `max_steps`: stop this call after that many steps (a preemption budget; the next call resumes).
  Returns the last evaluation record plus "best_val_scan_macro_f1" and "best_step".
  """
  from resdense_jax import data  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  mesh = create_mesh()
  batch_size = config.train.batch_size
  train_source, val_source, steps_per_epoch, plan = setup_run(config, workdir)
  total_steps = plan[-1][3]
  eval_every = steps_per_epoch * config.train.eval_every_epochs

  model = create_model(config.model)
  # Initial weights from the RBG generator: the init program compiles ~3x faster on CPU than with threefry
  # (12-16 s for a small Res-Dense Net); the state's RNG (dropout) stays threefry.
  init_rng = jax.random.key(config.seed, impl="rbg")
  state_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]
  variables = initialized(init_rng, model, config.data.image_size)
  train_iter = iter(data.train_pipeline(
      train_source, image_size=config.data.image_size, batch_size=batch_size, seed=config.seed,
      num_epochs=None, augment=config.data.augment, rotation_factor=config.data.rotation_factor,
      middle_fraction=config.data.middle_fraction, num_workers=config.data.num_workers))

  manager = checkpoints.create_manager(workdir / "checkpoints", best_metric=config.eval.best_metric,
                                       async_save=config.train.async_checkpointing)
  latest = manager.latest_step()
  if latest is None:
    variables = load_pretrained(model, variables, config.model)
    phase = create_phase(0, plan, config, variables["params"])
    state = create_train_state(state_rng, variables, phase)
    meta = {"loss_sum": 0.0, "loss_count": 0}
  else:
    meta = checkpoints.restore_meta(manager, latest)
    phase = create_phase(meta["phase"], plan, config, variables["params"])
    template = create_train_state(state_rng, variables, phase)
    state, train_iter = checkpoints.restore(manager, latest, template, train_iter)
    print(f"resumed from {manager.directory} step {latest} (phase {phase.name})", flush=True)
  state = jax.device_put(state, replicated(mesh))
  writer = MetricWriter(workdir, resume_step=latest)
  loss_fn = losses.get_loss(config.train.loss)
  batch_sharding = data_sharded(mesh)
  precise_bn = int(config.train.get("precise_bn_batches", 0))

  step = int(state.step)
  stop = total_steps if max_steps is None else min(total_steps, step + max_steps)
  loss_sum, loss_count = float(meta["loss_sum"]), int(meta["loss_count"])
  record: dict = {}
  compiled_phase, step_fn = None, None
  progress = tqdm.tqdm(total=stop, initial=step, desc="train", unit="step", dynamic_ncols=True)
  while step < stop:
    if step >= phase.end_step:
      phase = create_phase(phase.index + 1, plan, config, state.params)
      state = start_phase(state, phase)
    if compiled_phase is not phase:
      step_fn, compiled_phase = compile_train_step(phase, loss_fn, mesh), phase
      eval_fn = compile_eval_step(phase.model, mesh)
      stats_fn = compile_batch_statistics(phase.model, mesh) if precise_bn else None
      progress.set_description(f"train [{phase.name}]")
    batch = data.to_global_batch(next(train_iter), batch_sharding)
    state, step_metrics = step_fn(state, batch)
    step += 1
    loss_sum = loss_sum + step_metrics["loss"]  # stays on device: no host sync per step
    loss_count += 1
    progress.update(1)
    if step % config.train.log_every_steps == 0:
      progress.set_postfix(loss=f"{float(loss_sum) / max(loss_count, 1):.4f}")
      writer.write_scalars({"train_step_loss": float(step_metrics["loss"])}, step)
    metrics = None
    if step % eval_every == 0 or step == total_steps:
      if precise_bn:
        state = precise_batch_stats(state, precise_bn_batches(train_source, config, step), stats_fn=stats_fn,
                                    batch_sharding=batch_sharding, num_batches=precise_bn)
      results = evaluate.evaluate(eval_fn, state.variables, val_source, config, batch_sharding)
      record = {"step": step, "epoch": -(-step // steps_per_epoch), "phase": phase.index,
                "phase_name": phase.name, "train_loss": float(loss_sum) / max(loss_count, 1),
                **{f"val_{k}": v for k, v in results.items()}}
      writer.write(record)
      tqdm.tqdm.write(_summary_line(record))
      metrics = {config.eval.best_metric: record[config.eval.best_metric]}
      loss_sum, loss_count = 0.0, 0
    every = config.train.checkpoint_every_steps
    if metrics is not None or (every and step % every == 0) or step == stop:
      meta = {"step": step, "phase": phase.index, "loss_sum": float(loss_sum), "loss_count": loss_count}
      checkpoints.save(manager, step, state, train_iter, meta, metrics=metrics)
  progress.close()
  manager.wait_until_finished()
  writer.close()
  best = manager.best_step()
  record = dict(record)
  record["best_step"] = best
  record["best_" + config.eval.best_metric] = checkpoints.best_metric_value(manager, best, config.eval.best_metric)
  manager.close()
  return record
