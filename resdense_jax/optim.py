"""Optimizers as Keras defines them, learning-rate schedules, freezing, the trainable partition and the EMA.

For an own optax loop (no ConfigDict):

    labels, model = optim.freeze(model, variables["params"], "backbones")   # labels + frozen BatchNorms
    tx = optim.with_frozen(optim.keras_rmsprop(1e-3), labels)             # frozen: zero updates, no state

`keras_rmsprop` and `keras_adam` are keras.optimizers.RMSprop and Adam (step for step); the engine's phases
build the same directions from their configs (`base_optimizer`, `create_optimizer`).

Freezing (big_vision style, resdense_jax/freezing.py, re-exported here): every parameter gets exactly one
label, "trainable" or "frozen", from rules ("all", "backbones", "resnet101", "resnet101:100",
"backbones:100", "backbone:100" for a standalone backbone, "re:<regex>"); optax.multi_transform gives frozen
parameters `set_to_zero` (no optimizer state at all) and the trainable ones the optimizer. The engine's train
step differentiates only the trainable partition (`split` / `merge`), so a frozen backbone costs a forward
pass.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

# Re-exported: optim is where freezing is used from (optim.freeze, optim.FROZEN, ...).
from resdense_jax.freezing import (FROZEN, LABELS, TRAINABLE, check_labels, freeze, freeze_labels,
                                   frozen_batchnorm)

Path = tuple[str, ...]

__all__ = [
    "FROZEN", "LABELS", "TRAINABLE", "apply_trainable_update", "base_optimizer", "check_labels", "count",
    "create_optimizer", "ema_decay_at", "ema_for_phase", "ema_init", "ema_update", "ema_variables", "freeze",
    "freeze_labels", "frozen_batchnorm", "keras_adam", "keras_rmsprop", "learning_rate_schedule", "merge",
    "rmsprop_keras", "scale_by_adam_keras", "scale_by_rms_keras", "split", "warmup_steps", "with_frozen",
    "zeros_for",
]


# ----------------------------------------------------------------------------------------------- optimizers


def scale_by_rms_keras(rho: float = 0.9, epsilon: float = 1e-7) -> optax.GradientTransformation:
  """keras.optimizers.RMSprop's direction: v = rho v + (1-rho) g^2;  g / sqrt(v + epsilon) (epsilon inside)."""
  return optax.scale_by_rms(decay=rho, eps=epsilon, eps_in_sqrt=True)


def keras_rmsprop(learning_rate: float | optax.Schedule = 1e-3, *, rho: float = 0.9,
                  epsilon: float = 1e-7) -> optax.GradientTransformation:
  """keras.optimizers.RMSprop (momentum 0, not centered): p -= lr g / sqrt(v + epsilon).

  optax.rmsprop's defaults differ (eps 1e-8); this is optax.rmsprop(lr, decay=rho, eps=epsilon,
  eps_in_sqrt=True). `learning_rate` may be an optax schedule.

      tx = optim.with_frozen(optim.keras_rmsprop(1e-3), labels)
  """
  return optax.chain(scale_by_rms_keras(rho, epsilon), optax.scale_by_learning_rate(learning_rate))


# The name before keras_rmsprop; kept for code that uses it.
rmsprop_keras = keras_rmsprop


class ScaleByAdamKerasState(NamedTuple):
  count: jax.Array
  m: Any
  v: Any


def scale_by_adam_keras(beta_1: float = 0.9, beta_2: float = 0.999,
                        epsilon: float = 1e-7) -> optax.GradientTransformation:
  """keras.optimizers.Adam's direction: sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + epsilon).

  Keras adds epsilon to the uncorrected sqrt(v) (optax.scale_by_adam adds it to sqrt(v_hat)); with
  epsilon 1e-7 and small gradients the first steps differ visibly, so this follows Keras.
  """

  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return ScaleByAdamKerasState(count=jnp.zeros([], jnp.int32), m=zeros(), v=zeros())

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    t = count.astype(jnp.float32)
    m = jax.tree.map(lambda m, g: m + (g - m) * (1 - beta_1), state.m, updates)
    v = jax.tree.map(lambda v, g: v + (g * g - v) * (1 - beta_2), state.v, updates)
    alpha = jnp.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
    updates = jax.tree.map(lambda m, v: alpha * m / (jnp.sqrt(v) + epsilon), m, v)
    return updates, ScaleByAdamKerasState(count=count, m=m, v=v)

  return optax.GradientTransformation(init_fn, update_fn)


def keras_adam(learning_rate: float | optax.Schedule = 1e-3, *, beta_1: float = 0.9, beta_2: float = 0.999,
               epsilon: float = 1e-7) -> optax.GradientTransformation:
  """keras.optimizers.Adam (no amsgrad, no weight decay): epsilon on the uncorrected sqrt(v), unlike optax.adam.

      tx = optim.with_frozen(optim.keras_adam(1e-4), labels)
  """
  return optax.chain(scale_by_adam_keras(beta_1, beta_2, epsilon), optax.scale_by_learning_rate(learning_rate))


def warmup_steps(config, steps_per_epoch: int | None = None) -> int:
  """The phase's warmup in steps: `warmup_steps`, or `warmup_epochs` times the steps of an epoch."""
  steps, epochs = int(config.get("warmup_steps", 0)), float(config.get("warmup_epochs", 0.0))
  if steps < 0 or epochs < 0:
    raise ValueError(f"warmup_steps ({steps}) and warmup_epochs ({epochs}) must not be negative")
  if epochs:
    if steps:
      raise ValueError(f"set warmup_steps ({steps}) or warmup_epochs ({epochs}), not both")
    if steps_per_epoch is None:
      raise ValueError(f"warmup_epochs ({epochs}) needs the steps per epoch; give warmup_steps instead")
    steps = int(round(epochs * steps_per_epoch))
  return steps


def learning_rate_schedule(config, num_steps: int, steps_per_epoch: int | None = None) -> optax.Schedule:
  """The phase's learning rate over its `num_steps` steps: constant | cosine | warmup_cosine.

  Any schedule with a warmup (`warmup_steps`, or `warmup_epochs` resolved with `steps_per_epoch`) rises
  linearly from 0 at the phase's step 0 to the peak at step w, then follows the schedule: constant stays at the
  peak, cosine decays to 0 at the phase's end (warmup_cosine is cosine with a warmup). RMSprop's and Adam's
  first steps are their largest (the second-moment estimate starts at 0), which the warmup damps.
  """
  lr = float(config.learning_rate)
  name = config.get("schedule", "constant")
  warmup = warmup_steps(config, steps_per_epoch)
  if name == "constant":
    if not warmup:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if name == "cosine" and not warmup:
    return optax.cosine_decay_schedule(lr, decay_steps=max(num_steps, 1))
  if name in ("cosine", "warmup_cosine"):
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1))
  raise ValueError(f"unknown learning-rate schedule {name!r}; choose constant, cosine or warmup_cosine")


def _decay_mask(params):
  """Decoupled weight decay on kernels only (ndim > 1), not on biases, BatchNorm or GeM's p."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def base_optimizer(config, num_steps: int, steps_per_epoch: int | None = None) -> optax.GradientTransformation:
  """The optimizer of one phase, from its config (name, learning_rate, schedule, weight_decay, ...)."""
  lr = learning_rate_schedule(config, num_steps, steps_per_epoch)
  name = config.name
  if name == "rmsprop":
    scale = scale_by_rms_keras(rho=config.get("rho", 0.9), epsilon=config.get("epsilon", 1e-7))
  elif name == "adam":
    scale = scale_by_adam_keras(beta_1=config.get("beta_1", 0.9), beta_2=config.get("beta_2", 0.999),
                                epsilon=config.get("epsilon", 1e-7))
  elif name == "sgd":
    scale = optax.trace(decay=config.get("momentum", 0.0)) if config.get("momentum", 0.0) else optax.identity()
  else:
    raise ValueError(f"unknown optimizer {name!r}; choose rmsprop, adam or sgd")
  chain = [scale]
  if config.get("weight_decay", 0.0):
    # Decoupled, like Keras's `weight_decay=` and AdamW: p -= lr * wd * p.
    chain.append(optax.add_decayed_weights(config.weight_decay, mask=_decay_mask))
  chain.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*chain)


def create_optimizer(config, labels, num_steps: int,
                     steps_per_epoch: int | None = None) -> optax.GradientTransformation:
  """The phase's optimizer on trainable parameters; frozen ones get `set_to_zero` and no state."""
  return with_frozen(base_optimizer(config, num_steps, steps_per_epoch), labels)


def with_frozen(tx: optax.GradientTransformation, labels) -> optax.GradientTransformation:
  """`tx` on the parameters labelled TRAINABLE; FROZEN ones get exactly zero updates and no optimizer state.

  `labels`: a label tree with the parameters' structure (optim.freeze), or a function of the parameters
  returning one, as optax.multi_transform takes it. `init` checks that every parameter has exactly one of the
  two labels (check_labels). A zero update leaves a frozen parameter unchanged under optax.apply_updates
  (p + 0.0 == p; only a stored -0.0 would come back as +0.0; the engine's apply_trainable_update carries frozen
  leaves over untouched instead).

      tx = optim.with_frozen(optim.keras_rmsprop(1e-3), labels)
      opt_state = tx.init(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
  """
  inner = optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)

  def init_fn(params):
    check_labels(labels(params) if callable(labels) else labels, params)
    return inner.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, inner.update)


def count(labels, params) -> dict[str, int]:
  """Number of scalar parameters per label."""
  totals = {TRAINABLE: 0, FROZEN: 0}
  for label, p in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
    totals[label] += int(p.size)
  return totals


# ------------------------------------------------------------------------------------- trainable partition


def split(params, labels) -> tuple[dict[Path, jax.Array], dict[Path, jax.Array]]:
  """(trainable, frozen) flat dicts {path: array}; differentiate the first, close over the second."""
  flat_params = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(labels)
  trainable = {k: v for k, v in flat_params.items() if flat_labels[k] == TRAINABLE}
  frozen = {k: v for k, v in flat_params.items() if flat_labels[k] == FROZEN}
  return trainable, frozen


def merge(trainable: Mapping[Path, jax.Array], frozen: Mapping[Path, jax.Array]):
  """The nested parameter tree from the two flat partitions."""
  return traverse_util.unflatten_dict({**frozen, **trainable})


def zeros_for(frozen: Mapping[Path, jax.Array]) -> dict[Path, jax.Array]:
  """Zero 'gradients' for frozen parameters: constants, never computed by backprop, ignored by set_to_zero."""
  return {k: jnp.zeros_like(v) for k, v in frozen.items()}


def apply_trainable_update(tx: optax.GradientTransformation, params, labels, trainable_grads, opt_state):
  """One optax step on the trainable partition: (new params, new opt_state).

  `trainable_grads` are the gradients of split(params, labels)[0]; frozen weights get zero gradients in the
  optimizer's view and are carried over as they are (bitwise), never added to a zero update.
  """
  trainable, frozen = split(params, labels)
  updates, opt_state = tx.update(merge(trainable_grads, zeros_for(frozen)), opt_state, params)
  trainable_updates, _ = split(updates, labels)
  return merge(optax.apply_updates(trainable, trainable_updates), frozen), opt_state


# ---------------------------------------------------------------------------- exponential moving average


def ema_init(params, batch_stats, labels) -> dict:
  """A phase's EMA state as it starts: copies of its trainable parameters and of every BatchNorm statistic.

  {"params": the trainable leaves only (a sub-tree of params; a frozen parameter's average is itself, so it
  needs no state), "batch_stats": the whole tree}. Copies: the train step donates the state, and one buffer
  cannot be donated twice.
  """
  trainable, _ = split(params, labels)
  return {"params": traverse_util.unflatten_dict({k: jnp.copy(v) for k, v in trainable.items()}),
          "batch_stats": jax.tree.map(jnp.copy, batch_stats)}


def ema_for_phase(ema: dict, params, labels) -> dict:
  """The EMA carried into a new phase: parameters trainable in both phases keep their average, newly trainable
  ones start at their current value, newly frozen ones drop out (their value is fixed from now on)."""
  trainable, _ = split(params, labels)
  averaged = traverse_util.flatten_dict(ema["params"])
  return {"params": traverse_util.unflatten_dict({k: averaged[k] if k in averaged else jnp.copy(v)
                                                  for k, v in trainable.items()}),
          "batch_stats": ema["batch_stats"]}


def ema_decay_at(decay: float, updates_before, *, warmup: bool) -> jax.Array:
  """The decay of the phase's update number `updates_before` + 1: `decay`, or with `warmup`
  min(decay, (1 + t) / (10 + t)) (tf.train.ExponentialMovingAverage's `num_updates` form).

  Why the warmup: the average starts at the phase's first weights (a random or zero head, backbones that have
  not moved yet); at decay 0.999 they would still weigh 37% after 1000 steps. With it, the average follows the
  weights closely at first (t = 0: 0.1, t = 90: 0.91) and reaches `decay` after 9 / (1 - decay) updates.
  """
  decay = jnp.asarray(decay, jnp.float32)
  if not warmup:
    return decay
  t = jnp.asarray(updates_before, jnp.float32)
  return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def ema_update(ema: dict, params, batch_stats, decay: jax.Array) -> dict:
  """One EMA step towards the weights after an update: e + (1 - decay) * (x - e) for every averaged leaf.

  In this form a leaf equal to its average (a frozen BatchNorm's statistics) keeps it bitwise.
  """
  def towards(average, value):
    return average + (1.0 - decay).astype(average.dtype) * (value - average)

  flat = traverse_util.flatten_dict(params)
  averaged = {k: towards(e, flat[k]) for k, e in traverse_util.flatten_dict(ema["params"]).items()}
  return {"params": traverse_util.unflatten_dict(averaged),
          "batch_stats": jax.tree.map(towards, ema["batch_stats"], batch_stats)}


def ema_variables(params, ema: dict | None, batch_stats=None) -> dict:
  """{"params", "batch_stats"} for inference: the averages where there are some, the raw value elsewhere
  (frozen parameters). `ema` None: the raw `params` and `batch_stats`."""
  if ema is None:
    return {"params": params, "batch_stats": batch_stats}
  flat = traverse_util.flatten_dict(params)
  flat.update(traverse_util.flatten_dict(ema["params"]))
  return {"params": traverse_util.unflatten_dict(flat), "batch_stats": ema["batch_stats"]}
