"""Optimizers against Keras, and freezing label masks (rules, Keras layer boundaries, no frozen state)."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import keras
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from keras_fixtures import build_keras
from resdense_jax import models, optim
from resdense_jax.models.resdense import ResDenseNet

SMALL = {"resnet50": dict(stage_sizes=(1, 1, 1, 1), filters=(4, 8, 8, 8), stem_filters=8),
         "densenet121": dict(blocks=(1, 1, 1, 1), growth_rate=4, stem_filters=8)}


def _keras_step(optimizer, params, grads):
  variables = [keras.Variable(np.asarray(p)) for p in params]
  optimizer.apply_gradients(zip([np.asarray(g) for g in grads], variables))
  return [np.asarray(v.numpy()) for v in variables]


def _grads_sequence(rng, shapes, steps):
  return [[rng.normal(size=s).astype(np.float32) * 10.0 ** rng.uniform(-4, 0) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("name", ["rmsprop", "adam"])
def test_optimizer_steps_equal_keras(name):
  rng = np.random.default_rng(0)
  shapes = [(3, 3, 4, 5), (5,), (7, 2)]
  params = [rng.normal(size=s).astype(np.float32) for s in shapes]
  config = ml_collections.ConfigDict({"name": name, "learning_rate": 1e-3})
  tx = optim.base_optimizer(config, num_steps=10)
  keras_opt = (keras.optimizers.RMSprop(learning_rate=1e-3) if name == "rmsprop"
               else keras.optimizers.Adam(learning_rate=1e-3))
  ours = [jnp.asarray(p) for p in params]
  theirs = [p.copy() for p in params]
  state = tx.init(ours)
  variables = [keras.Variable(p) for p in theirs]
  for grads in _grads_sequence(rng, shapes, 3):
    updates, state = tx.update([jnp.asarray(g) for g in grads], state, ours)
    ours = optax.apply_updates(ours, updates)
    keras_opt.apply_gradients(zip(grads, variables))
  for a, v, p0 in zip(ours, variables, params):
    np.testing.assert_allclose(np.asarray(a), v.numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(a), p0)  # the step moved the weights


def test_rmsprop_keras_helper_is_one_keras_step():
  rng = np.random.default_rng(1)
  p = rng.normal(size=(6, 4)).astype(np.float32)
  g = rng.normal(size=(6, 4)).astype(np.float32) * 1e-3
  tx = optim.rmsprop_keras(1e-4)
  updates, _ = tx.update(jnp.asarray(g), tx.init(jnp.asarray(p)))
  expected = _keras_step(keras.optimizers.RMSprop(learning_rate=1e-4), [p], [g])[0]
  np.testing.assert_allclose(np.asarray(optax.apply_updates(jnp.asarray(p), updates)), expected, rtol=1e-6)


def test_decoupled_weight_decay_on_kernels_only_equals_keras():
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(4, 3)).astype(np.float32)
  bias = rng.normal(size=(3,)).astype(np.float32)
  gk, gb = (rng.normal(size=kernel.shape).astype(np.float32), rng.normal(size=bias.shape).astype(np.float32))
  config = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-2, "weight_decay": 0.1})
  tx = optim.base_optimizer(config, 1)
  params = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
  updates, _ = tx.update({"kernel": jnp.asarray(gk), "bias": jnp.asarray(gb)}, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  keras_opt = keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.1)
  vk, vb = keras.Variable(kernel), keras.Variable(bias)
  keras_opt.exclude_from_weight_decay(var_list=[vb])
  keras_opt.apply_gradients([(gk, vk), (gb, vb)])
  np.testing.assert_allclose(np.asarray(new["kernel"]), vk.numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(new["bias"]), vb.numpy(), rtol=1e-5, atol=1e-7)


def _small_model():
  return ResDenseNet(backbones=("resnet50", "densenet121"), fusion_filters=8, pooling="gem", backbone_kwargs=SMALL)


@pytest.fixture(scope="module")
def small_params():
  model = _small_model()
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  return model, variables["params"]


def _frozen_paths(labels):
  return {"/".join(k) for k, v in traverse_util.flatten_dict(labels).items() if v == optim.FROZEN}


def test_rules_cover_every_parameter_exactly_once(small_params):
  model, params = small_params
  keras_layers = model.keras_layers()
  all_paths = {"/".join(k) for k in traverse_util.flatten_dict(params)}
  head = {p for p in all_paths if not p.startswith(("resnet50/", "densenet121/"))}
  assert head == {"resnet50_fusion_conv/kernel", "resnet50_fusion_conv/bias", "densenet121_fusion_conv/kernel",
                  "densenet121_fusion_conv/bias", "gem_pool/p", "predictions/kernel", "predictions/bias"}
  labels = optim.freeze_labels(params, ("backbones",), keras_layers)
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  assert _frozen_paths(labels) == all_paths - head
  assert _frozen_paths(optim.freeze_labels(params, ("densenet121",), keras_layers)) == {
      p for p in all_paths if p.startswith("densenet121/")}
  assert _frozen_paths(optim.freeze_labels(params, ("all",), keras_layers)) == all_paths
  assert _frozen_paths(optim.freeze_labels(params, (), keras_layers)) == set()
  assert _frozen_paths(optim.freeze_labels(params, (r"re:.*_bn/.*",), keras_layers)) == {
      p for p in all_paths if "_bn/" in p}
  counts = optim.count(labels, params)
  assert counts[optim.FROZEN] + counts[optim.TRAINABLE] == sum(p.size for p in jax.tree.leaves(params))


def test_first_n_keras_layers_rule(small_params):
  model, params = small_params
  keras_layers = model.keras_layers()
  n = 12
  labels = optim.freeze_labels(params, (f"resnet50:{n}",), keras_layers)
  expected = {"/".join(("resnet50", *w[1:])) for layer in keras_layers["resnet50"][:n] for w in layer.weights
              if w[0] == "params"}
  assert expected and _frozen_paths(labels) == expected
  frozen_bn = optim.frozen_batchnorm(labels, keras_layers)
  assert frozen_bn["densenet121"] == ()
  assert frozen_bn["resnet50"] == tuple(l.name for l in keras_layers["resnet50"][:n]
                                        if l.class_name == "BatchNormalization")


def test_bad_rules_fail_clearly(small_params):
  model, params = small_params
  keras_layers = model.keras_layers()
  with pytest.raises(ValueError, match="not a backbone"):
    optim.freeze_labels(params, ("resnet101",), keras_layers)
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.freeze_labels(params, ("re:nothing_like_this",), keras_layers)
  with pytest.raises(ValueError, match="more layers than"):
    optim.freeze_labels(params, ("densenet121:100000",), keras_layers)


def test_frozen_parameters_have_no_optimizer_state(small_params):
  model, params = small_params
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  labels = optim.freeze_labels(params, ("backbones",), model.keras_layers())
  trainable, frozen = optim.split(params, labels)
  tx = optim.create_optimizer(ml_collections.ConfigDict({"name": "rmsprop", "learning_rate": 1e-4}), labels, 10)
  state = tx.init(params)
  state_sizes = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  # RMSprop keeps one accumulator per trainable scalar and nothing for the frozen backbones.
  assert state_sizes == sum(p.size for p in trainable.values())
  assert sum(p.size for p in frozen.values()) > 0


@pytest.mark.parametrize("arch", ["resnet101", "densenet121"])
def test_first_100_keras_layers_match_keras_model_layers(arch):
  keras_model = build_keras(arch, input_shape=(32, 32, 3))
  ours = models.BACKBONES[arch]().keras_layers()
  theirs = keras_model.layers
  assert [l.class_name for l in ours] == [type(l).__name__ for l in theirs]
  # Keras names parameter-free padding layers automatically; every layer with weights has a fixed name.
  assert [l.name for l in ours[:100] if l.weights] == [l.name for l in theirs[:100] if l.weights]
  model = ResDenseNet(backbones=(arch,), fusion_filters=8)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
  labels = optim.freeze_labels(params, ("backbones:100",), model.keras_layers())
  frozen = {k[1] for k, v in traverse_util.flatten_dict(labels).items() if v == optim.FROZEN}
  trainable = {k[1] for k, v in traverse_util.flatten_dict(labels).items() if v == optim.TRAINABLE and k[0] == arch}
  keras_frozen = {l.name for l in theirs[:100] if l.weights}
  keras_trainable = {l.name for l in theirs[100:] if l.weights}
  assert frozen == keras_frozen and trainable == keras_trainable
