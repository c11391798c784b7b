"""Losses from logits against Keras's definitions."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax.numpy as jnp
import keras
import numpy as np
import pytest

from resdense_jax import losses

RNG = np.random.default_rng(0)


def test_binary_cross_entropy_equals_keras():
  logits = RNG.normal(size=(16, 1)).astype(np.float32) * 3
  labels = RNG.integers(0, 2, size=16)
  expected = keras.losses.BinaryCrossentropy(from_logits=True)(labels[:, None].astype(np.float32), logits)
  np.testing.assert_allclose(losses.binary_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                             np.asarray(expected), rtol=1e-6)
  # A [B] logit vector gives the same.
  np.testing.assert_allclose(losses.binary_cross_entropy(jnp.asarray(logits[:, 0]), jnp.asarray(labels)),
                             np.asarray(expected), rtol=1e-6)


def test_sparse_categorical_cross_entropy_equals_keras():
  logits = RNG.normal(size=(16, 2)).astype(np.float32) * 3
  labels = RNG.integers(0, 2, size=16)
  expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
  np.testing.assert_allclose(losses.sparse_categorical_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                             np.asarray(expected), rtol=1e-6)


def test_two_logit_softmax_is_the_sigmoid_of_the_logit_difference():
  # With two classes, softmax[:, 1] = sigmoid(z1 - z0), so the softmax head's loss and P(COVID) have closed forms:
  # loss = mean(log(1 + exp(-s * (z1 - z0)))) with s = +1 for COVID, -1 otherwise; p = 1 / (1 + exp(-(z1 - z0))).
  logits = RNG.normal(size=(16, 2)).astype(np.float32) * 3
  labels = np.array([0, 1] * 8)
  margin = (logits[:, 1] - logits[:, 0]).astype(np.float64)
  sign = np.where(labels == 1, 1.0, -1.0)
  loss = losses.get_loss("sparse_categorical_cross_entropy")(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-sign * margin))), rtol=1e-6)
  np.testing.assert_allclose(losses.covid_probability(jnp.asarray(logits)), 1 / (1 + np.exp(-margin)), rtol=1e-5)
  # The same numbers as the one-logit head fed the difference.
  np.testing.assert_allclose(loss, losses.binary_cross_entropy(jnp.asarray(margin, jnp.float32), jnp.asarray(labels)),
                             rtol=1e-5)


def test_sigmoid_focal_loss_equals_keras():
  logits = RNG.normal(size=(16, 1)).astype(np.float32) * 3
  labels = RNG.integers(0, 2, size=16)
  expected = keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=0.25, gamma=2.0,
                                                  from_logits=True)(labels[:, None].astype(np.float32), logits)
  np.testing.assert_allclose(losses.sigmoid_focal_loss(jnp.asarray(logits), jnp.asarray(labels)),
                             np.asarray(expected), rtol=1e-5)


def test_covid_probability_both_head_forms():
  logit = jnp.asarray([[0.0], [2.0]])
  np.testing.assert_allclose(losses.covid_probability(logit), [0.5, 1 / (1 + np.exp(-2.0))], rtol=1e-6)
  two = jnp.asarray([[0.0, 0.0], [0.0, 2.0]])
  np.testing.assert_allclose(losses.covid_probability(two), [0.5, np.exp(2) / (1 + np.exp(2))], rtol=1e-6)


def test_bad_shapes_and_names_fail_clearly():
  with pytest.raises(ValueError, match="one logit"):
    losses.binary_cross_entropy(jnp.zeros((4, 2)), jnp.zeros(4))
  with pytest.raises(ValueError, match="unknown loss"):
    losses.get_loss("hinge")
