"""Losses computed from logits, and the matching slice probabilities.

Two head forms:
* one logit per slice (sigmoid, the paper's binary form): `binary_cross_entropy` or `sigmoid_focal_loss`;
* `num_classes` logits per slice (softmax): `sparse_categorical_cross_entropy`.

Every loss is the batch mean, as Keras reduces ("sum_over_batch_size"), computed in float32 even under
bf16 compute so the loss matches a float32 Keras reference.

Options (config.train), each off by default and then bitwise the plain loss:
* `label_smoothing` e: Keras's. Sigmoid head: y -> y (1 - e) + e / 2 (`BinaryCrossentropy(label_smoothing=e)`,
  `BinaryFocalCrossentropy`); softmax head: one-hot y -> y (1 - e) + e / num_classes
  (`CategoricalCrossentropy(label_smoothing=e)`; Keras's sparse loss has no smoothing).
* `class_weight` (w0, w1): each slice's loss times the weight of its true class, summed and divided by the
  batch size, as Keras's `model.fit(class_weight=...)` does (its sample weights, then "sum_over_batch_size":
  not divided by the sum of the weights). `class_weights` resolves "none" / "balanced" / (w0, w1).
"""

from __future__ import annotations

import ast
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _binary_logits(logits: jax.Array) -> jax.Array:
  """[B] or [B, 1] logits -> [B] float32."""
  logits = jnp.asarray(logits, jnp.float32)
  if logits.ndim == 2:
    if logits.shape[-1] != 1:
      raise ValueError(f"a sigmoid loss needs one logit per example, got logits of shape {logits.shape}")
    logits = logits[:, 0]
  return logits


def _binary_targets(labels: jax.Array, label_smoothing: float) -> jax.Array:
  """0/1 labels as float32 targets, squeezed towards 1/2 by Keras's binary label smoothing."""
  targets = labels.astype(jnp.float32)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
  return targets


def _reduce(per_example: jax.Array, labels: jax.Array, class_weight: Sequence[float] | None) -> jax.Array:
  """Batch mean; with class weights sum(w[y] * loss) / batch size (Keras's sample-weighted reduction)."""
  if class_weight is not None:
    per_example = per_example * jnp.asarray(class_weight, jnp.float32)[labels.astype(jnp.int32)]
  return per_example.mean()


def binary_cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                         class_weight: Sequence[float] | None = None) -> jax.Array:
  """Keras `BinaryCrossentropy(from_logits=True, label_smoothing=...)`: mean over the batch."""
  logits = _binary_logits(logits)
  per_example = optax.sigmoid_binary_cross_entropy(logits, _binary_targets(labels, label_smoothing))
  return _reduce(per_example, labels, class_weight)


def sigmoid_focal_loss(logits: jax.Array, labels: jax.Array, *, alpha: float | None = 0.25,
                       gamma: float = 2.0, label_smoothing: float = 0.0,
                       class_weight: Sequence[float] | None = None) -> jax.Array:
  """Focal loss (Lin et al. 2017) on one logit per example: mean over the batch."""
  logits = _binary_logits(logits)
  per_example = optax.sigmoid_focal_loss(logits, _binary_targets(labels, label_smoothing), alpha=alpha,
                                         gamma=gamma)
  return _reduce(per_example, labels, class_weight)


def sparse_categorical_cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                                     class_weight: Sequence[float] | None = None) -> jax.Array:
  """Keras `SparseCategoricalCrossentropy(from_logits=True)`: mean over the batch. With label smoothing,
  Keras's `CategoricalCrossentropy(from_logits=True, label_smoothing=...)` of the one-hot labels."""
  logits = jnp.asarray(logits, jnp.float32)
  if logits.ndim != 2 or logits.shape[-1] < 2:
    raise ValueError(f"a softmax loss needs [batch, classes>=2] logits, got shape {logits.shape}")
  labels = labels.astype(jnp.int32)
  if label_smoothing:
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes) * (1.0 - label_smoothing) + label_smoothing / num_classes
    per_example = optax.softmax_cross_entropy(logits, targets)
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return _reduce(per_example, labels, class_weight)


LOSSES: dict[str, LossFn] = {
    "binary_cross_entropy": binary_cross_entropy,
    "sigmoid_focal_loss": sigmoid_focal_loss,
    "sparse_categorical_cross_entropy": sparse_categorical_cross_entropy,
}


def get_loss(name: str, *, label_smoothing: float = 0.0, class_weight: Sequence[float] | None = None,
             **kwargs) -> LossFn:
  """The loss called `name` (see LOSSES) with Keras's label smoothing, per-class weights (w0, w1) and
  keyword options such as the focal loss's alpha/gamma. Without options: the plain function itself."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
  if not 0.0 <= float(label_smoothing) < 1.0:
    raise ValueError(f"config.train.label_smoothing must be in [0, 1), got {label_smoothing}")
  if label_smoothing:
    kwargs["label_smoothing"] = float(label_smoothing)
  if class_weight is not None:
    kwargs["class_weight"] = tuple(float(w) for w in class_weight)
  fn = LOSSES[name]
  if kwargs:
    return lambda logits, labels: fn(logits, labels, **kwargs)
  return fn


def parse_class_weight(spec: Any) -> str | tuple[float, float]:
  """config.train.class_weight as "none", "balanced" or (w0, w1) (non-COVID, COVID).

  Accepts None, the two words, a pair (tuple or list, as config.json stores it) or its text ("(1, 3)",
  "1,3": what a command-line override may leave).
  """
  if spec is None:
    return "none"
  if isinstance(spec, str):
    text = spec.strip()
    if text.lower() in ("none", "balanced", ""):
      return text.lower() or "none"
    try:
      spec = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      spec = None
  if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(
      isinstance(w, (int, float)) and not isinstance(w, bool) for w in spec):
    weights = (float(spec[0]), float(spec[1]))
    if min(weights) < 0 or not np.all(np.isfinite(weights)) or max(weights) == 0:
      raise ValueError(f"config.train.class_weight {weights}: weights must be finite, >= 0 and not both 0")
    return weights
  raise ValueError(f"config.train.class_weight must be 'none', 'balanced' or a pair (w_noncovid, w_covid), "
                   f"got {spec!r}")


def class_weights(spec: Any, slice_labels: np.ndarray) -> tuple[float, float] | None:
  """(w0, w1) for config.train.class_weight, None when off.

  "balanced": n / (2 n_c) from the class counts of the training slices (`slice_labels`, one 0/1 per slice
  the training pipeline draws from; counted by slice, not by scan), as scikit-learn's
  `compute_class_weight("balanced")`.
  """
  spec = parse_class_weight(spec)
  if spec == "none":
    return None
  if spec != "balanced":
    return spec
  counts = np.bincount(np.asarray(slice_labels, np.int64), minlength=2)
  if len(counts) != 2 or not counts.all():
    raise ValueError(f"config.train.class_weight='balanced' needs training slices of both classes, got "
                     f"{counts[0]} non-COVID and {counts[1] if len(counts) > 1 else 0} COVID slices")
  return tuple(float(counts.sum() / (2.0 * c)) for c in counts)


def from_config(train_config, slice_labels: np.ndarray) -> tuple[LossFn, tuple[float, float] | None]:
  """(loss function, resolved class weights or None) for config.train: loss, label_smoothing, class_weight.

  `slice_labels`: the 0/1 label of every training slice (only read for class_weight="balanced").
  """
  weights = class_weights(train_config.get("class_weight", "none"), slice_labels)
  return get_loss(train_config.loss, label_smoothing=train_config.get("label_smoothing", 0.0),
                  class_weight=weights), weights


def covid_probability(logits: jax.Array) -> jax.Array:
  """P(COVID) per example: sigmoid of a single logit, or softmax probability of class 1."""
  logits = jnp.asarray(logits, jnp.float32)
  if logits.ndim == 1 or logits.shape[-1] == 1:
    return jax.nn.sigmoid(logits.reshape(logits.shape[0]))
  return jax.nn.softmax(logits, axis=-1)[:, 1]


def step_metrics(loss: jax.Array, logits: jax.Array, labels: jax.Array) -> dict:
  """What a train step reports: its loss and its accuracy at threshold 0.5."""
  preds = (covid_probability(logits) > 0.5).astype(jnp.int32)
  return {"loss": loss, "accuracy": jnp.mean(preds == labels)}
