"""Fine-tuning Res-Dense Net: train state, jit-compiled steps, phases, and the training loop.

flax examples/imagenet style: small pure functions (create_train_state, train_step, eval_step) and
`train_and_evaluate(config, workdir)` that wires data, phases, evaluation, checkpoints and logging. The model
comes from `models.build.create_model`, the mesh and shardings from `sharding`, the slices from
`data.sources`, the logs go through `metric_writer`.

Data parallel from the first line: batches are sharded over the mesh's "data" axis and the train state is
replicated (or, with config.train.fsdp, split over the same axis), so one CPU, several GPUs or a TPU VM run
the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import struct
from jax.sharding import Mesh, NamedSharding

from resdense_jax import checkpoints, compilation_cache, evaluate, feature_cache, losses, optim, scan_train
from resdense_jax.data import pipeline, prefetch, sources
from resdense_jax.metric_writer import MetricWriter, summary_line
from resdense_jax.models.build import DTYPES, create_model, plain  # noqa: F401  (train.create_model, as flax examples)
from resdense_jax.models.keras_layers import BN_MOMENTUM, REMAT_SAVED
from resdense_jax.models.resdense import ResDenseNet
from resdense_jax.sharding import create_mesh, data_sharded, replicated, state_sharding  # noqa: F401
from resdense_jax.weights import pretrained

REMAT_POLICIES = ("none", "blocks")

@struct.dataclass
class TrainState:
  """Everything a step changes; optimizer and model are static (per phase) and live outside."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  # config.train.ema_decay > 0: the exponential moving average of the weights (optim.ema_init: the phase's
  # trainable parameters and every BatchNorm statistic), updated after every step; None when off.
  ema: Any = None

  @property
  def variables(self) -> dict:
    """The weights being trained."""
    return {"params": self.params, "batch_stats": self.batch_stats}

  @property
  def eval_variables(self) -> dict:
    """The weights to evaluate, checkpoint for inference and predict with: the EMA when on, else `variables`."""
    return optim.ema_variables(self.params, self.ema, self.batch_stats)


@dataclasses.dataclass(frozen=True)
class Ema:
  """How a phase's train step averages the weights (config.train.ema_decay, ema_warmup)."""
  decay: float
  warmup: bool
  start_step: int  # the phase's first step: the warmup counts the phase's updates from there


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
  ema: Ema | None = None


# -------------------------------------------------------------------------------------------------- model


def initialized(rng: jax.Array, model: ResDenseNet, image_size: int) -> dict:
  """Fresh {"params", "batch_stats"} (float32 params), jit-compiled so the init runs once through XLA."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))({"params": rng}, x)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def load_pretrained(model: ResDenseNet, variables: dict, model_config) -> dict:
  """Keras weights into each backbone's sub-tree, as config.model.pretrained says: "imagenet", "none", a file,
  or one of these per backbone (resdense_jax/weights/pretrained.py; `ResDenseNet.pretrained` shares the code)."""
  return pretrained.load_backbones(model, variables, model_config.pretrained,
                                   cache_dir=model_config.weights_dir or None,
                                   download=model_config.download_weights)


def _keras_name(backbone: str) -> str:
  """The keras.applications constructor of a backbone: resnet101 -> ResNet101, resnet50v2 -> ResNet50V2."""
  family = "DenseNet" if backbone.startswith("densenet") else "ResNet"
  return family + backbone[len(family):].upper()


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
  epochs = int(phase_config.epochs)
  tx = optim.create_optimizer(phase_config.optimizer, labels, end - start,
                              steps_per_epoch=(end - start) // epochs if epochs else None)
  decay = float(config.train.get("ema_decay", 0.0))
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"config.train.ema_decay must be in [0, 1) (0: off), got {decay}")
  ema = Ema(decay, bool(config.train.get("ema_warmup", True)), start) if decay else None
  phase = Phase(index, name, start, end, labels, model, tx, ema)
  # config.model.scan_head attention / transformer: the phase trains the ScanModel over that slice model.
  return scan_train.scan_phase(phase, config) if scan_train.uses_scan_head(config) else phase


def phase_index_at(plan, step: int) -> int:
  """The phase that runs step `step` (0-based); the last phase at or past the end."""
  for index, (_, _, start, end) in enumerate(plan):
    if start <= step < end:
      return index
  return len(plan) - 1


# ------------------------------------------------------------------------------------------ state and steps


def create_train_state(rng: jax.Array, variables: dict, phase: Phase) -> TrainState:
  """Step 0 with the phase's fresh optimizer state (and EMA, when the phase averages)."""
  ema = optim.ema_init(variables["params"], variables["batch_stats"], phase.labels) if phase.ema else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=phase.tx.init(variables["params"]), rng=rng,
                    ema=ema)


def start_phase(state: TrainState, phase: Phase) -> TrainState:
  """Each phase starts its own optimizer (fresh state) on the current weights; the EMA carries on for
  parameters trainable before and now (optim.ema_for_phase)."""
  state = state.replace(opt_state=phase.tx.init(state.params))
  if phase.ema is None:
    return state.replace(ema=None)
  if state.ema is None:
    return state.replace(ema=optim.ema_init(state.params, state.batch_stats, phase.labels))
  return state.replace(ema=optim.ema_for_phase(state.ema, state.params, phase.labels))


def remat_policy(name: str):
  """config.train.remat: "none" keeps every activation for the backward pass; "blocks" keeps only each block's
  output (models.keras_layers.block_output) and recomputes the inside of a block during the backward pass."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"config.train.remat must be one of {REMAT_POLICIES}, got {name!r}")
  return None if name == "none" else jax.checkpoint_policies.save_only_these_names(REMAT_SAVED)


def train_step(state: TrainState, batch: dict, *, model: ResDenseNet, tx: optax.GradientTransformation,
               labels: Any, loss_fn: Callable, remat: str = "none") -> tuple[TrainState, dict]:
  """One optimizer step; only the trainable partition is differentiated, frozen weights are constants."""
  trainable, frozen = optim.split(state.params, labels)
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_of(trainable_params):
    variables = {"params": optim.merge(trainable_params, frozen), "batch_stats": state.batch_stats}
    logits, updated = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"],
                                  rngs={"dropout": dropout_rng})
    return loss_fn(logits, batch["label"]), (logits, updated["batch_stats"])

  if (policy := remat_policy(remat)) is not None:
    loss_of = jax.checkpoint(loss_of, policy=policy)
  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
  params, opt_state = optim.apply_trainable_update(tx, state.params, labels, grads, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  return new_state, losses.step_metrics(loss, logits, batch["label"])


def with_ema(step_fn: Callable, ema: Ema) -> Callable:
  """`step_fn(state, batch)` followed by one EMA update towards the weights it produced (inside the same jit)."""

  def step_and_average(state: TrainState, batch: dict):
    if state.ema is None:
      raise ValueError("the phase averages the weights (config.train.ema_decay) but the state has no EMA; "
                       "create it with create_train_state / start_phase")
    new_state, metrics = step_fn(state, batch)
    decay = optim.ema_decay_at(ema.decay, state.step - ema.start_step, warmup=ema.warmup)
    return new_state.replace(ema=optim.ema_update(new_state.ema, new_state.params, new_state.batch_stats,
                                                  decay)), metrics

  return step_and_average


def eval_step(variables: dict, images: jax.Array, *, model: ResDenseNet, tta: str = "none") -> jax.Array:
  """P(COVID) of each slice, inference mode; with tta="flip" the mean over the slice and its mirror."""
  probs = [losses.covid_probability(model.apply(variables, view, train=False))
           for view in evaluate.tta_views(images, tta)]
  return probs[0] if len(probs) == 1 else sum(probs) / len(probs)


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
  With an EMA the statistics are those of the averaged weights (what is evaluated) and replace the EMA's.
  """
  variables = state.eval_variables
  base = variables["batch_stats"]
  total, count = None, 0
  for batch in tqdm.tqdm(batches, total=num_batches, desc="precise BN", unit="batch", leave=False,
                         dynamic_ncols=True):
    images = pipeline.to_global_batch({"image": batch["image"]}, batch_sharding)["image"]
    # Differences from the moving statistics: a frozen layer adds exactly 0 and keeps its statistics bitwise
    # (a plain sum / count of N equal values rounds).
    delta = jax.tree.map(jnp.subtract, stats_fn(variables, images), base)
    total = delta if total is None else jax.tree.map(jnp.add, total, delta)
    count += 1
    if count == num_batches:
      break
  if count == 0:
    raise ValueError("precise BatchNorm statistics need at least one training batch")
  estimated = jax.tree.map(lambda old, d: old + d / count, base, total)
  if state.ema is None:
    return state.replace(batch_stats=estimated)
  return state.replace(ema={**state.ema, "batch_stats": estimated})


def compile_train_step(phase: Phase, loss_fn: Callable, mesh: Mesh, *, remat: str = "none",
                       state_shardings: Any = None):
  """train_step for this phase, jit-compiled with the state donated, the batch sharded over "data".

  `state_shardings`: a tree like the state (sharding.state_sharding: replicated, or FSDP); default replicated.
  """
  step = functools.partial(train_step, model=phase.model, tx=phase.tx, labels=phase.labels, loss_fn=loss_fn,
                           remat=remat)
  if phase.ema is not None:
    step = with_ema(step, phase.ema)
  return _jit_step(step, mesh, state_shardings)


def _jit_step(step: Callable, mesh: Mesh, state_shardings: Any = None):
  shardings = replicated(mesh) if state_shardings is None else state_shardings
  return jax.jit(step, in_shardings=(shardings, data_sharded(mesh)), out_shardings=(shardings, replicated(mesh)),
                 donate_argnums=0)


def compile_head_step(phase: Phase, loss_fn: Callable, mesh: Mesh, *, state_shardings: Any = None):
  """feature_cache's head step for this phase; with the phase's EMA update when it averages the weights."""
  if phase.ema is None:
    return feature_cache.compile_head_step(phase, loss_fn, mesh, state_shardings=state_shardings)
  feature_cache.check(phase.model, phase.labels)
  step = functools.partial(feature_cache.head_train_step, model=phase.model, tx=phase.tx, labels=phase.labels,
                           loss_fn=loss_fn)
  return _jit_step(with_ema(step, phase.ema), mesh, state_shardings)


def compile_eval_step(model: ResDenseNet, mesh: Mesh, *, variables_shardings: Any = None, tta: str = "none"):
  """eval_step jit-compiled; one program per image shape (evaluation pads its last batch, so one per run)."""
  step = functools.partial(eval_step, model=model, tta=evaluate.check_tta(tta))
  shardings = replicated(mesh) if variables_shardings is None else variables_shardings
  return jax.jit(step, in_shardings=(shardings, data_sharded(mesh)), out_shardings=replicated(mesh))


def compiled_with_progress(step_fn, what: str, *args):
  """Ahead-of-time compiles `step_fn` for `args`, saying what compiles and how long it took (with the
  persistent compilation cache warm a second run reads the program back instead)."""
  tqdm.tqdm.write(f"compiling {what} ...")
  start = time.perf_counter()
  lowered = step_fn.lower(*args)
  traced = time.perf_counter()
  compiled = lowered.compile()
  tqdm.tqdm.write(f"compiled {what} in {time.perf_counter() - start:.1f} s (trace {traced - start:.1f} s, "
                  f"compile {time.perf_counter() - traced:.1f} s)")
  return compiled


# ------------------------------------------------------------------------------------------------ the loop


def save_resolved_config(config, workdir: pathlib.Path, pretrained_weights: dict | None = None) -> None:
  """config.json in the workdir and next to the checkpoints (load_for_inference reads the latter); process 0.

  `pretrained_weights` (weights.pretrained.record: each backbone's source, file, MD5, bytes) goes under the
  top-level key "pretrained_weights", beside the config's fields.
  """
  if jax.process_index() != 0:
    return
  resolved = json.loads(config.to_json_best_effort())
  if pretrained_weights is not None:
    resolved[pretrained.RECORD_KEY] = pretrained_weights
  for folder in (workdir, workdir / "checkpoints"):
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints.write_json_atomic(folder / "config.json", resolved)


def setup_run(config, workdir: pathlib.Path, *, fetch_weights: bool = True):
  """What a run settles before its first step: (train source, validation source, steps per epoch, phase plan).

  Checks the batch sizes against the devices, finds the data, finds (a fresh run with `fetch_weights`: downloads)
  the pretrained files and writes the resolved config.json with what each backbone starts from.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  devices = len(jax.devices())
  if config.train.batch_size % devices or config.eval.batch_size % devices:
    raise ValueError(f"train/eval batch sizes ({config.train.batch_size}, {config.eval.batch_size}) must divide "
                     f"evenly over the {devices} devices")
  train_source, val_source = sources.data_sources(config, workdir)
  if scan_train.uses_scan_head(config):  # batches of whole scans (scan_train.py)
    scan_train.check_options(config)
    steps_per_epoch = scan_train.steps_per_epoch(train_source, config)
  else:
    steps_per_epoch = pipeline.steps_per_epoch(train_source, config.train.batch_size,
                                               middle_fraction=config.data.middle_fraction)
  plan = plan_phases(config, steps_per_epoch)
  record = (pretrained.run_record(create_model(config.model), config.model, workdir, download_ok=fetch_weights)
            if jax.process_index() == 0 else None)
  save_resolved_config(config, workdir, record)
  return train_source, val_source, steps_per_epoch, plan


def dry_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Everything train_and_evaluate settles before training, without training: the data, config.json, and per
  phase its steps, freezing and parameter counts. Shapes only: no weights loaded, nothing compiled."""
  train_source, val_source, steps_per_epoch, plan = setup_run(config, pathlib.Path(workdir), fetch_weights=False)
  model = create_model(config.model)
  size = config.data.image_size
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]
  if scan_train.uses_scan_head(config):  # the scan head's parameters too
    params = scan_train.abstract_params(scan_train.create_model(config), size)
  phases = []
  for index, (name, phase_config, start, end) in enumerate(plan):
    counts = optim.count(create_phase(index, plan, config, params).labels, params)
    phases.append({"name": name, "start_step": start, "end_step": end, "freeze": list(phase_config.freeze),
                   "optimizer": phase_config.optimizer.name, "learning_rate": phase_config.optimizer.learning_rate,
                   "trainable_params": counts[optim.TRAINABLE], "frozen_params": counts[optim.FROZEN]})
  return {"backbones": list(model.backbones), "image_size": size, "batch_size": config.train.batch_size,
          "train_scans": len(train_source.scans), "train_slices": int(np.sum(train_source.num_slices)),
          "validation_scans": len(val_source.scans), "steps_per_epoch": steps_per_epoch, "phases": phases,
          # The loss options resolved as training would ("balanced" from the training slices' classes).
          "class_weight": losses.from_config(config.train, train_slice_labels(train_source, config))[1],
          "tta": evaluate.check_tta(config.eval.get("tta", "none"))}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       max_steps: int | None = None) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`), evaluating after each epoch.

  `max_steps`: stop this call after that many steps (a preemption budget; the next call resumes).
  Returns the last evaluation record plus "best_val_scan_macro_f1" and "best_step".
  """
  compilation_cache.enable(config.get("compilation_cache_dir", compilation_cache.DEFAULT_DIR))
  workdir = pathlib.Path(workdir)
  mesh = create_mesh()
  batch_size = config.train.batch_size
  train_source, val_source, steps_per_epoch, plan = setup_run(config, workdir)
  # Slices a step sees: batch_size slices, or batch_size scans x slices_per_scan with a scan head.
  images_per_step = batch_size * (int(config.data.slices_per_scan) if scan_train.uses_scan_head(config) else 1)
  total_steps = plan[-1][3]
  eval_every = steps_per_epoch * config.train.eval_every_epochs
  remat = config.train.get("remat", "none")
  remat_policy(remat)  # a misspelt policy fails here, not after the first phase
  tta = evaluate.check_tta(config.eval.get("tta", "none"))  # likewise a misspelt test-time augmentation

  scan = scan_train.uses_scan_head(config)  # one logit per scan: scan_train.py's model, batches, evaluation
  model = scan_train.create_model(config) if scan else create_model(config.model)
  # Initial weights from the RBG generator: the init program compiles ~3x faster on CPU than with threefry
  # (12-16 s for a small Res-Dense Net); the state's RNG (dropout) stays threefry.
  init_rng = jax.random.key(config.seed, impl="rbg")
  state_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]
  variables = (scan_train.initialized if scan else initialized)(init_rng, model, config.data.image_size)
  train_iter = iter(scan_train.train_pipeline(train_source, config)) if scan else iter(pipeline.train_pipeline(
      train_source, image_size=config.data.image_size, batch_size=batch_size, seed=config.seed,
      num_epochs=None, augment=config.data.augment, rotation_factor=config.data.rotation_factor,
      middle_fraction=config.data.middle_fraction, num_workers=config.data.num_workers,
      balanced=config.data.get("balanced_sampling", False)))

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
  fsdp = bool(config.train.get("fsdp", False))
  state = jax.device_put(state, state_sharding(state, mesh, fsdp=fsdp))
  writer = MetricWriter(workdir, resume_step=latest)
  loss_fn, class_weight = losses.from_config(config.train, train_slice_labels(train_source, config))
  if class_weight is not None:
    print(f"class weights (non-COVID, COVID): {class_weight[0]:.4g}, {class_weight[1]:.4g} "
          f"(config.train.class_weight={config.train.class_weight!r})", flush=True)
  batch_sharding = data_sharded(mesh)
  # The next batches are decoded and on their way to the devices while the current step runs.
  batches = prefetch.DevicePrefetcher(train_iter, batch_sharding, size=int(config.data.get("prefetch", 2)))
  precise_bn = int(config.train.get("precise_bn_batches", 0))
  cache_views, cache = int(config.train.get("cache_frozen_features", 0)), None

  step = int(state.step)
  stop = total_steps if max_steps is None else min(total_steps, step + max_steps)
  loss_sum, loss_count = float(meta["loss_sum"]), int(meta["loss_count"])
  # Early stopping: evaluations since the best metric last improved, carried over a resume by the meta.
  patience = int(config.train.get("patience", 0))
  best_value, stale = meta.get("best_metric_value"), int(meta.get("evaluations_without_improvement", 0))
  early_stop = None
  if patience and stale >= patience:  # the run stopped early before: re-running it trains nothing
    early_stop = meta.get("early_stop") or _early_stop_reason(config.eval.best_metric, stale, best_value, patience)
    stop = step
    print(f"{workdir}: stopped early at step {step}: {early_stop}. Nothing to train; raise "
          "config.train.patience or set it to 0 to train on from there.", flush=True)
  record: dict = {}
  compiled_phase, step_fn, eval_fn, previous_loss = None, None, None, None
  period_start, period_wait, period_compile, period_steps = time.perf_counter(), batches.wait_s, 0.0, 0
  progress = tqdm.tqdm(total=stop, initial=step, desc="train", unit="step", dynamic_ncols=True)
  try:
    while step < stop:
      if step >= phase.end_step:
        phase = create_phase(phase.index + 1, plan, config, state.params)
        state = start_phase(state, phase)
        cache = None  # frees the features of the phase before
      if compiled_phase is not phase:
        shardings = state_sharding(state, mesh, fsdp=fsdp)
        if cache_views and feature_cache.applies(phase.model, phase.labels):
          # Backbones frozen: their features of `cache_views` augmented views per slice, computed once; this
          # phase then trains the head alone and reads no batch from the pipeline.
          cache = feature_cache.build_from_config(config, train_source, state.variables, model=phase.model,
                                                  labels=phase.labels, mesh=mesh)
          step_builder = compile_head_step(phase, loss_fn, mesh, state_shardings=shardings)
          what = f"the head step of phase {phase.name!r} (cached backbone features)"
        else:
          step_builder = compile_train_step(phase, loss_fn, mesh, remat=remat, state_shardings=shardings)
          what = f"the train step of phase {phase.name!r}"
      batch = cache.global_batch(step - phase.start_step, batch_sharding) if cache else next(batches)
      if compiled_phase is not phase:
        compile_start = time.perf_counter()
        step_fn = compiled_with_progress(step_builder, what, state, batch)
        # PreciseBN changes nothing while no BatchNorm trains (backbones frozen, e.g. phase 1): skipped there.
        bn_trains = not feature_cache.applies(phase.model, phase.labels)
        stats_fn = (compile_batch_statistics(scan_train.slice_model(phase.model), mesh)
                    if precise_bn and bn_trains else None)
        compiled_phase = phase
        period_compile += time.perf_counter() - compile_start
        progress.set_description(f"train [{phase.name}]")
      state, step_metrics = step_fn(state, batch)
      # Backpressure, not a sync: the host waits for the step before this one, so the device always has the
      # current step queued while the host fetches the next batch, and the loop never runs far ahead of it
      # (then time blocked in next(batches) is time the device would idle for data).
      if previous_loss is not None:
        previous_loss.block_until_ready()
      previous_loss = step_metrics["loss"]
      step += 1
      period_steps += 1
      loss_sum = loss_sum + step_metrics["loss"]  # stays on device: no host sync per step
      loss_count += 1
      progress.update(1)
      if step % config.train.log_every_steps == 0:
        progress.set_postfix(loss=f"{float(loss_sum) / max(loss_count, 1):.4f}")
        writer.write_scalars({"train_step_loss": float(step_metrics["loss"])}, step)
      metrics = None
      if step % eval_every == 0 or step == total_steps:
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - period_start - period_compile
        waited = batches.wait_s - period_wait
        if stats_fn is not None:
          state = precise_batch_stats(state, sources.precise_bn_batches(train_source, config, step),
                                      stats_fn=stats_fn, batch_sharding=batch_sharding, num_batches=precise_bn)
        if eval_fn is None:  # inference ignores the phases' frozen BatchNorms: one program for the whole run
          eval_fn = (scan_train.Evaluator if scan else compile_eval_step)(
              model, mesh, tta=tta, variables_shardings=state_sharding(state.variables, mesh, fsdp=fsdp))
        # The EMA weights when config.train.ema_decay > 0 (what the checkpoint's inference loads too).
        results = (eval_fn.evaluate if scan else functools.partial(evaluate.evaluate, eval_fn))(
            state.eval_variables, val_source, config, batch_sharding)
        record = {"step": step, "epoch": -(-step // steps_per_epoch), "phase": phase.index,
                  "phase_name": phase.name, "train_loss": float(loss_sum) / max(loss_count, 1),
                  **{f"val_{k}": v for k, v in results.items()},
                  # Timing of the steps since the last evaluation, compiles excluded (TIMING_FIELDS: they
                  # differ between otherwise identical runs). data_wait_fraction: the share of that time the
                  # loop waited for a batch, 0 when the loader keeps up.
                  "train_images_per_s": period_steps * images_per_step / max(elapsed, 1e-9),
                  "data_wait_fraction": min(1.0, waited / max(elapsed, 1e-9))}
        value = record[config.eval.best_metric]
        if best_value is None or value > best_value:
          best_value, stale = value, 0
        else:
          stale += 1
        if patience:
          record["evaluations_without_improvement"] = stale
          if stale >= patience:
            early_stop = record["early_stop"] = _early_stop_reason(config.eval.best_metric, stale, best_value,
                                                                   patience)
        writer.write(record)
        tqdm.tqdm.write(summary_line(record))
        metrics = {config.eval.best_metric: record[config.eval.best_metric]}
        loss_sum, loss_count = 0.0, 0
      every = config.train.checkpoint_every_steps
      if metrics is not None or (every and step % every == 0) or step == stop:
        meta = {"step": step, "phase": phase.index, "loss_sum": float(loss_sum), "loss_count": loss_count}
        meta.update(best_metric_value=best_value, evaluations_without_improvement=stale)
        if metrics is not None:  # the threshold predict --threshold=best reads from the best checkpoint
          meta.update({k: record[k] for k in ("val_scan_best_threshold", "val_scan_best_threshold_macro_f1")})
        if early_stop:
          meta["early_stop"] = early_stop
        checkpoints.save(manager, step, state, batches, meta, metrics=metrics)
      if metrics is not None:
        period_start, period_wait, period_compile, period_steps = time.perf_counter(), batches.wait_s, 0.0, 0
      if early_stop:
        tqdm.tqdm.write(f"early stop at step {step}: {early_stop}")
        break
  finally:
    batches.close()
  progress.close()
  manager.wait_until_finished()
  writer.close()
  best = manager.best_step()
  record = dict(record)
  record["best_step"] = best
  record["best_" + config.eval.best_metric] = checkpoints.best_metric_value(manager, best, config.eval.best_metric)
  if early_stop:
    record["early_stop"] = early_stop
  manager.close()
  return record


def train_slice_labels(train_source, config) -> np.ndarray:
  """The 0/1 label of every training slice the pipeline draws from (config.data.middle_fraction applied)."""
  source = pipeline.as_slice_source(train_source)
  rows = pipeline.select_slices(source.num_slices, config.data.middle_fraction)
  return np.asarray([ref.label for ref in source.scans], np.int64)[rows[:, 0]]


def _early_stop_reason(best_metric: str, stale: int, best_value: float, patience: int) -> str:
  """Why the run stopped, as metrics.jsonl, the checkpoint meta and the console say it."""
  return (f"{best_metric} has not improved on its best {best_value:.4f} for {stale} evaluations "
          f"(config.train.patience={patience})")
