"""Optimizers as Keras defines them, learning-rate schedules, and freezing by label masks.

Freezing (big_vision style): every parameter gets exactly one label, "trainable" or "frozen", from a tuple of
rules; optax.multi_transform then gives frozen parameters `set_to_zero` (no optimizer state at all) and the
trainable ones the phase's optimizer. The train step differentiates only the trainable partition (see
`split` / `merge`), so a frozen backbone costs a forward pass.

Rules (strings, matched against the fused model's parameter tree):
  "all"                  every parameter
  "backbones"            every backbone sub-tree (the head stays trainable)
  "resnet101"            one backbone's whole sub-tree
  "resnet101:100"        the first 100 entries of that backbone's Keras `model.layers` (parameter-free layers
                         count, as in Keras), from the backbone's `keras_layers()` list
  "backbones:100"        the first 100 Keras layers of every backbone
  "re:<regex>"           parameters whose path "a/b/c" fully matches the regular expression
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

TRAINABLE = "trainable"
FROZEN = "frozen"

Path = tuple[str, ...]


# ----------------------------------------------------------------------------------------------- optimizers


def rmsprop_keras(learning_rate, *, rho: float = 0.9, epsilon: float = 1e-7) -> optax.GradientTransformation:
  """keras.optimizers.RMSprop: v = rho v + (1-rho) g^2;  p -= lr g / sqrt(v + epsilon)."""
  return optax.rmsprop(learning_rate, decay=rho, eps=epsilon, eps_in_sqrt=True)


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
    scale = optax.scale_by_rms(decay=config.get("rho", 0.9), eps=config.get("epsilon", 1e-7), eps_in_sqrt=True)
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
  return optax.multi_transform({TRAINABLE: base_optimizer(config, num_steps, steps_per_epoch),
                                FROZEN: optax.set_to_zero()}, labels)


# ------------------------------------------------------------------------------------------------- freezing


def _keras_layer_params(backbone: str, keras_layers: Sequence[Any], first_n: int) -> set[Path]:
  """Parameter paths (in the fused tree) of the first `first_n` entries of a backbone's Keras layer list."""
  if first_n > len(keras_layers):
    raise ValueError(f"rule {backbone}:{first_n} asks for more layers than the {len(keras_layers)} "
                     f"Keras layers of {backbone}")
  paths = set()
  for layer in keras_layers[:first_n]:
    for weight in layer.weights:
      if weight[0] == "params":
        paths.add((backbone, *weight[1:]))
  return paths


def _rule_params(rule: str, all_paths: Sequence[Path], keras_layers: Mapping[str, Sequence[Any]]) -> set[Path]:
  """The set of parameter paths a single rule selects."""
  backbones = list(keras_layers)
  if rule == "all":
    return set(all_paths)
  if rule.startswith("re:"):
    pattern = re.compile(rule[3:])
    return {p for p in all_paths if pattern.fullmatch("/".join(p))}
  name, _, count = rule.partition(":")
  targets = backbones if name == "backbones" else [name]
  for target in targets:
    if target not in keras_layers:
      raise ValueError(f"freeze rule {rule!r}: {target!r} is not a backbone of this model (backbones: {backbones})")
  selected: set[Path] = set()
  for target in targets:
    if count:
      selected |= _keras_layer_params(target, keras_layers[target], int(count))
    else:
      selected |= {p for p in all_paths if p[0] == target}
  return selected


def freeze_labels(params, rules: Sequence[str], keras_layers: Mapping[str, Sequence[Any]]):
  """A tree like `params` whose leaves are "trainable" or "frozen" according to `rules`.

  `keras_layers` maps each backbone's sub-tree name to its `keras_layers()` list. Every rule must select at
  least one parameter (a typo must not silently train everything), and every parameter a Keras layer list
  names must exist.
  """
  flat = traverse_util.flatten_dict(params)
  all_paths = list(flat)
  known = set(all_paths)
  for backbone, layers in keras_layers.items():
    missing = _keras_layer_params(backbone, layers, len(layers)) - known
    if missing:
      raise ValueError(f"the Keras layer list of {backbone} names parameters the model lacks, e.g. "
                       f"{'/'.join(sorted(missing)[0])}")
  frozen: set[Path] = set()
  for rule in rules:
    selected = _rule_params(rule, all_paths, keras_layers)
    if not selected:
      raise ValueError(f"freeze rule {rule!r} matches no parameter")
    frozen |= selected
  labels = {path: (FROZEN if path in frozen else TRAINABLE) for path in all_paths}
  assert set(labels) == known and all(v in (TRAINABLE, FROZEN) for v in labels.values())
  return traverse_util.unflatten_dict(labels)


def frozen_batchnorm(labels, keras_layers: Mapping[str, Sequence[Any]]) -> dict[str, tuple[str, ...]]:
  """Per backbone, the BatchNormalization layers whose parameters are all frozen (they run in inference mode)."""
  flat = traverse_util.flatten_dict(labels)
  result = {}
  for backbone, layers in keras_layers.items():
    names = []
    for layer in layers:
      params = [(backbone, *w[1:]) for w in layer.weights if w[0] == "params"]
      if layer.class_name == "BatchNormalization" and params and all(flat[p] == FROZEN for p in params):
        names.append(layer.name)
    result[backbone] = tuple(names)
  return result


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
