"""Res-Dense Net: structure, options, and one full train step against a Keras reference built the same way."""

import functools
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import keras
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from keras.src.applications import densenet as keras_densenet
from keras.src.applications import resnet as keras_resnet

from keras_fixtures import _zero_initializers as zero_initializers
from keras_fixtures import randomize_weights
from resdense_jax import losses, models, optim, train
from resdense_jax.models.resdense import GeMPool, ResDenseNet

SIZE = 64
RESNET_FILTERS = (8, 16, 16, 16)
# Keras's ResNet/DenseNet stems are 64 wide and DenseNet's growth rate is 32; the depth is what we shrink.
SMALL = {"resnet50": dict(stage_sizes=(1, 1, 1, 1), filters=RESNET_FILTERS),
         "densenet121": dict(blocks=(1, 1, 1, 1))}
FUSION = 16
FREEZE_FIRST = 12  # Keras layers frozen per backbone in the train-step check
# Structure and option checks need no Keras widths: narrow stems and growth, 32x32 inputs.
TINY_SIZE = 32
TINY = {"resnet50": dict(stage_sizes=(1, 1, 1, 1), filters=RESNET_FILTERS, stem_filters=8),
        "densenet121": dict(blocks=(1, 1, 1, 1), growth_rate=4, stem_filters=8)}


def small_resdense(**kwargs):
  return ResDenseNet(backbones=("resnet50", "densenet121"), fusion_filters=FUSION, backbone_kwargs=SMALL, **kwargs)


def tiny_resdense(**kwargs):
  return ResDenseNet(backbones=("resnet50", "densenet121"), fusion_filters=FUSION, backbone_kwargs=TINY, **kwargs)


def _init(model, x):
  # One XLA program instead of op-by-op dispatch; the RBG generator compiles far faster than threefry on CPU.
  return jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), x)


def test_structure_names_and_output():
  model = tiny_resdense(pooling="gem")
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, TINY_SIZE, TINY_SIZE, 3)), jnp.float32)
  variables = _init(model, x)
  assert set(variables["params"]) == {"resnet50", "densenet121", "resnet50_fusion_conv",
                                      "densenet121_fusion_conv", "gem_pool", "predictions"}
  assert set(variables["batch_stats"]) == {"resnet50", "densenet121"}
  assert variables["params"]["resnet50_fusion_conv"]["kernel"].shape == (3, 3, 4 * RESNET_FILTERS[-1], FUSION)
  assert variables["params"]["predictions"]["kernel"].shape == (FUSION, 1)
  # Each branch sees its own Keras preprocessing: the backbone in the fused model equals the backbone alone.
  resnet = models.ResNet50(**TINY["resnet50"])

  @jax.jit
  def outputs(variables, x):
    logits, captured = model.apply(variables, x, capture_intermediates=lambda m, _: m.name == "resnet50",
                                   mutable=["intermediates"])
    alone = resnet.apply({"params": variables["params"]["resnet50"],
                          "batch_stats": variables["batch_stats"]["resnet50"]},
                         models.preprocess_input(x, "caffe"), train=False)
    return logits, captured["intermediates"]["resnet50"]["__call__"][0], alone

  logits, captured, alone = outputs(variables, x)
  assert logits.shape == (2, 1) and logits.dtype == jnp.float32
  np.testing.assert_allclose(captured, alone, rtol=1e-6)


def test_single_backbone_baseline_and_softmax_head():
  model = ResDenseNet(backbones=("densenet121",), fusion_filters=FUSION, num_outputs=2, backbone_kwargs=TINY)
  x = jnp.zeros((1, TINY_SIZE, TINY_SIZE, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert set(variables["params"]) == {"densenet121", "densenet121_fusion_conv", "predictions"}
  assert jax.eval_shape(model.apply, variables, x).shape == (1, 2)


def test_gem_pooling_equation_and_avg_limit():
  x = jnp.asarray(np.random.default_rng(1).uniform(0.1, 2.0, (2, 3, 3, 4)), jnp.float32)
  out = GeMPool().apply({"params": {"p": jnp.asarray([3.0])}}, x)
  np.testing.assert_allclose(out, np.mean(np.asarray(x) ** 3, axis=(1, 2)) ** (1 / 3), rtol=1e-5)
  out1 = GeMPool().apply({"params": {"p": jnp.asarray([1.0])}}, x)
  np.testing.assert_allclose(out1, np.mean(np.asarray(x), axis=(1, 2)), rtol=1e-6)


def test_authors_preprocessing_and_bf16():
  x = jnp.full((1, TINY_SIZE, TINY_SIZE, 3), 128.0)
  model = tiny_resdense(preprocessing="authors")
  np.testing.assert_allclose(model.preprocess(x, "densenet121"),
                             models.preprocess_input(x, "caffe") / 127.5 - 1.0, rtol=1e-6)
  bf16 = tiny_resdense(dtype=jnp.bfloat16)
  variables = _init(bf16, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  assert jax.jit(bf16.apply)(variables, x).dtype == jnp.float32
  with pytest.raises(ValueError, match="unknown preprocessing"):
    jax.eval_shape(tiny_resdense(preprocessing="nope").init, jax.random.PRNGKey(0), x)


# ---------------------------------------------------------------------------------- the Keras reference


def keras_small_resdense():
  """Keras: the same small ResNet v1 and DenseNet, each after its preprocessing, fused the same way."""
  keras.backend.clear_session()
  shape = (SIZE, SIZE, 3)

  def stack_fn(x):
    x = keras_resnet.stack_residual_blocks_v1(x, RESNET_FILTERS[0], 1, stride1=1, name="conv2")
    for i, filters in enumerate(RESNET_FILTERS[1:], start=3):
      x = keras_resnet.stack_residual_blocks_v1(x, filters, 1, name=f"conv{i}")
    return x

  # Built with zero initial weights (fast: no random kernel compiled per shape), then randomized.
  with zero_initializers():
    resnet = keras_resnet.ResNet(stack_fn, preact=False, use_bias=True, include_top=False, weights=None,
                                 input_shape=shape, name="resnet50")
    densenet = keras_densenet.DenseNet([1, 1, 1, 1], include_top=False, weights=None, input_shape=shape,
                                       name="densenet121")
  randomize_weights(resnet, seed=1)
  randomize_weights(densenet, seed=2)
  inputs = keras.Input(shape)
  caffe = keras.ops.flip(inputs, axis=-1) - np.array([103.939, 116.779, 123.68], np.float32)
  torch = (inputs / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225],
                                                                                      np.float32)
  r = keras.layers.Conv2D(FUSION, 3, padding="same", name="resnet50_fusion_conv")(resnet(caffe))
  d = keras.layers.Conv2D(FUSION, 3, padding="same", name="densenet121_fusion_conv")(densenet(torch))
  x = keras.layers.Add(name="add")([r, d])
  x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
  x = keras.layers.Dropout(0.0, name="dropout")(x)
  outputs = keras.layers.Dense(1, name="predictions")(x)
  return keras.Model(inputs, outputs), {"resnet50": resnet, "densenet121": densenet}


def flax_variables_from_keras(model: ResDenseNet, keras_model, backbones) -> dict:
  """Copy every Keras weight into the Flax tree by layer name (the backbones through keras_layers())."""
  flat = {}
  for name, layers in model.keras_layers().items():
    for layer in layers:
      if layer.weights:
        for path, value in zip(layer.weights, backbones[name].get_layer(layer.name).get_weights()):
          flat[(path[0], name, *path[1:])] = jnp.asarray(value)
  for head in ("resnet50_fusion_conv", "densenet121_fusion_conv", "predictions"):
    kernel, bias = keras_model.get_layer(head).get_weights()
    flat[("params", head, "kernel")], flat[("params", head, "bias")] = jnp.asarray(kernel), jnp.asarray(bias)
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def reference():
  keras_model, backbones = keras_small_resdense()
  model = small_resdense(dropout=0.0)
  variables = flax_variables_from_keras(model, keras_model, backbones)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))
  assert jax.tree.structure(variables) == jax.tree.structure(expected)
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (8, SIZE, SIZE, 3)).astype(np.uint8)
  labels = np.array([0, 1, 1, 0, 1, 0, 0, 1], np.int32)
  return keras_model, backbones, model, variables, images, labels


def test_inference_equals_keras(reference):
  keras_model, _, model, variables, images, _ = reference
  ours = model.apply(variables, jnp.asarray(images), train=False)
  theirs = keras_model(images.astype(np.float32), training=False)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-5)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_one_train_step_equals_keras(reference):
  keras_model, backbones, model, variables, images, labels = reference
  # Ours: phase rules, frozen BatchNorms in inference mode, RMSprop 1e-4, binary cross-entropy from logits.
  params = variables["params"]
  labels_tree = optim.freeze_labels(params, (f"backbones:{FREEZE_FIRST}",), model.keras_layers())
  frozen_bn = optim.frozen_batchnorm(labels_tree, model.keras_layers())
  assert frozen_bn["resnet50"] and frozen_bn["densenet121"]
  phase_model = model.clone(frozen_bn=tuple(frozen_bn.items()))
  tx = optim.create_optimizer(ml_collections.ConfigDict({"name": "rmsprop", "learning_rate": 1e-4}),
                              labels_tree, 1)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                           opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(train.train_step, model=phase_model, tx=tx, labels=labels_tree,
                                   loss_fn=losses.binary_cross_entropy))
  new_state, metrics = step(state, {"image": jnp.asarray(images), "label": jnp.asarray(labels)})

  # Keras: the same layers frozen (layer.trainable = False also puts their BatchNorm in inference mode).
  for backbone in backbones.values():
    for layer in backbone.layers[:FREEZE_FIRST]:
      layer.trainable = False
  keras_model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=1e-4),
                      loss=keras.losses.BinaryCrossentropy(from_logits=True))
  keras_loss = keras_model.train_on_batch(images.astype(np.float32), labels[:, None].astype(np.float32))
  assert float(metrics["loss"]) == pytest.approx(float(keras_loss), rel=1e-4)

  updated = flax_variables_from_keras(model, keras_model, backbones)
  flat_new = traverse_util.flatten_dict({"params": new_state.params, "batch_stats": new_state.batch_stats})
  flat_old = traverse_util.flatten_dict(variables)
  flat_keras = traverse_util.flatten_dict(updated)
  flat_labels = traverse_util.flatten_dict(labels_tree)
  moved = 0
  for path, theirs in flat_keras.items():
    ours, before = np.asarray(flat_new[path]), np.asarray(flat_old[path])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6, err_msg="/".join(path))
    if path[0] == "params" and flat_labels[path[1:]] == optim.FROZEN:
      assert np.array_equal(ours, before), "/".join(path)
    delta_theirs = np.asarray(theirs) - before
    if np.abs(delta_theirs).max() > 1e-6:
      moved += 1
      # The step itself (not only its endpoint) agrees.
      assert _rel(ours - before, delta_theirs) < 2e-3, "/".join(path)
  assert moved > 20
