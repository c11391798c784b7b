"""Losses computed from logits, and the matching slice probabilities.

Two head forms:
* one logit per slice (sigmoid, the paper's binary form): `binary_cross_entropy` or `sigmoid_focal_loss`;
* `num_classes` logits per slice (softmax): `sparse_categorical_cross_entropy`.

Every loss is the batch mean, as Keras reduces ("sum_over_batch_size"), computed in float32 even under
bf16 compute so the loss matches a float32 Keras reference.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
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


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Keras `BinaryCrossentropy(from_logits=True)`: mean over the batch."""
  logits = _binary_logits(logits)
  return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean()


def sigmoid_focal_loss(logits: jax.Array, labels: jax.Array, *, alpha: float | None = 0.25,
                       gamma: float = 2.0) -> jax.Array:
  """Focal loss (Lin et al. 2017) on one logit per example: mean over the batch."""
  logits = _binary_logits(logits)
  return optax.sigmoid_focal_loss(logits, labels.astype(jnp.float32), alpha=alpha, gamma=gamma).mean()


def sparse_categorical_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Keras `SparseCategoricalCrossentropy(from_logits=True)`: mean over the batch."""
  logits = jnp.asarray(logits, jnp.float32)
  if logits.ndim != 2 or logits.shape[-1] < 2:
    raise ValueError(f"a softmax loss needs [batch, classes>=2] logits, got shape {logits.shape}")
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32)).mean()


LOSSES: dict[str, LossFn] = {
    "binary_cross_entropy": binary_cross_entropy,
    "sigmoid_focal_loss": sigmoid_focal_loss,
    "sparse_categorical_cross_entropy": sparse_categorical_cross_entropy,
}


def get_loss(name: str, **kwargs) -> LossFn:
  """The loss called `name` (see LOSSES), with keyword options such as the focal loss's alpha/gamma."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
  fn = LOSSES[name]
  if kwargs:
    return lambda logits, labels: fn(logits, labels, **kwargs)
  return fn


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
