"""Res-Dense Net: structure, options, bf16 compute, and inference and one train step of each head form (sigmoid,
softmax) against a Keras reference built the same way."""

import dataclasses
import functools
import os
import pathlib
import sys
from typing import Callable, Mapping

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

import trees
from keras_fixtures import _zero_initializers as zero_initializers
from keras_fixtures import randomize_weights
from resdense_jax import losses, models, optim, train
from resdense_jax.models.resdense import GeMPool, ResDenseNet

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import common  # noqa: E402  the engine's config fields and phases

SIZE = 64
RESNET_FILTERS = (8, 16, 16, 16)
# Keras's ResNet/DenseNet stems are 64 wide and DenseNet's growth rate is 32; the depth is what we shrink.
SMALL = {"resnet50": dict(stage_sizes=(1, 1, 1, 1), filters=RESNET_FILTERS),
         "densenet121": dict(blocks=(1, 1, 1, 1))}
FUSION = 16
FREEZE_FIRST = 12  # Keras layers frozen per backbone in the sigmoid head's train-step check
# Structure and option checks need no Keras widths: narrow stems and growth, 32x32 inputs.
TINY_SIZE = 32
TINY = {"resnet50": dict(stage_sizes=(1, 1, 1, 1), filters=RESNET_FILTERS, stem_filters=8),
        "densenet121": dict(blocks=(1, 1, 1, 1), growth_rate=4, stem_filters=8)}


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
  model = ResDenseNet(backbones=("densenet121",), fusion_filters=FUSION, num_outputs=2,
                      backbone_kwargs={"densenet121": TINY["densenet121"]})
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


def test_authors_preprocessing():
  x = jnp.asarray(np.random.default_rng(5).uniform(0, 255, (1, TINY_SIZE, TINY_SIZE, 3)), jnp.float32)
  model = tiny_resdense(preprocessing="authors")
  expected = models.preprocess_input(x, "caffe") / 127.5 - 1.0
  for backbone in ("resnet50", "densenet121"):
    np.testing.assert_allclose(model.preprocess(x, backbone), expected, rtol=1e-6, err_msg=backbone)
  with pytest.raises(ValueError, match="unknown preprocessing"):
    jax.eval_shape(tiny_resdense(preprocessing="nope").init, jax.random.PRNGKey(0), x)


def _relative_max_error(ours, reference):
  """max |ours - reference| / max |reference|: one number for a whole tensor, not inflated by near-zero entries."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return np.abs(ours - reference).max() / np.abs(reference).max()


def test_bf16_compute_is_close_to_float32():
  # Fixed, non-constant slices: a constant image hides errors that depend on the content (e.g. lost preprocessing).
  x = jnp.asarray(np.random.default_rng(4).uniform(0, 255, (4, TINY_SIZE, TINY_SIZE, 3)), jnp.float32)
  float32 = tiny_resdense()
  bfloat16 = float32.clone(dtype=jnp.bfloat16)
  # bf16 compute keeps float32 parameters, so one set of variables runs in both.
  bf16_shapes = jax.eval_shape(bfloat16.init, jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_shapes["params"]))
  variables = _init(float32, x)
  fusion = ("resnet50_fusion_conv", "densenet121_fusion_conv")

  def run(model):
    logits, captured = model.apply(variables, x, capture_intermediates=lambda m, _: m.name in fusion,
                                   mutable=["intermediates"])
    return logits, {name: captured["intermediates"][name]["__call__"][0] for name in fusion}

  logits32, maps32 = jax.jit(lambda: run(float32))()
  logits16, maps16 = jax.jit(lambda: run(bfloat16))()
  assert logits16.dtype == jnp.float32
  assert all(maps16[name].dtype == jnp.bfloat16 for name in fusion)  # the compute really was bf16
  # bf16 keeps 8 mantissa bits (~0.4% per rounding); measured 0.9% / 0.6% on the branches, 1.0% on the logits.
  errors = {name: _relative_max_error(maps16[name], maps32[name]) for name in fusion}
  errors["logits"] = _relative_max_error(logits16, logits32)
  assert max(errors.values()) < 2e-2, errors
  assert np.ptp(np.asarray(logits32)) > 0.1  # the slices give different logits: the comparison is not trivial


# ---------------------------------------------------------------------------------- the Keras reference


@dataclasses.dataclass(frozen=True)
class Head:
  """One head form, the loss the engine trains it with, and what the train-step check freezes."""
  num_outputs: int
  loss: str
  keras_loss: Callable[[], keras.losses.Loss]
  keras_labels: Callable[[np.ndarray], np.ndarray]
  keras_probability: Callable[[np.ndarray], np.ndarray]  # P(COVID) from Keras's logits
  freeze_first: Mapping[str, int]  # per backbone, the Keras layers frozen in the train-step check


def _sigmoid(logits):
  return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)[:, 0]))


def _softmax_class_1(logits):
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return (e / e.sum(axis=-1, keepdims=True))[:, 1]


HEADS = {
    # The paper's head: one logit, binary cross-entropy; the first 12 Keras layers of each backbone frozen, so
    # the step reaches deep into both backbones.
    "sigmoid": Head(1, "binary_cross_entropy", lambda: keras.losses.BinaryCrossentropy(from_logits=True),
                    lambda y: y[:, None].astype(np.float32), _sigmoid,
                    {"resnet50": FREEZE_FIRST, "densenet121": FREEZE_FIRST}),
    # The softmax head (config.model.num_outputs=2): only the last stage of each backbone trains; the backbone
    # gradients are what the sigmoid case checks, this one checks the head, its loss and its BatchNorms' updates.
    "softmax": Head(2, "sparse_categorical_cross_entropy",
                    lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True), lambda y: y,
                    _softmax_class_1, {"resnet50": 43, "densenet121": 40}),
}


def head_config(head: Head) -> ml_collections.ConfigDict:
  """The engine's config for the small model with this head: one phase, RMSprop 1e-4, dropout off."""
  config = common.get_base_config()
  config.model.backbones = ("resnet50", "densenet121")
  config.model.backbone_kwargs = SMALL
  config.model.fusion_filters = FUSION
  config.model.dropout = 0.0
  config.model.num_outputs = head.num_outputs
  config.model.pretrained = "none"
  config.train.loss = head.loss
  rules = tuple(f"{name}:{n}" for name, n in head.freeze_first.items())
  config.phases = [common.phase("step", 1, rules, optimizer="rmsprop", learning_rate=1e-4)]
  return config


def keras_small_resdense(num_outputs: int = 1):
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
  outputs = keras.layers.Dense(num_outputs, name="predictions")(x)
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


@dataclasses.dataclass(frozen=True)
class Reference:
  head: Head
  config: ml_collections.ConfigDict
  keras_model: keras.Model
  backbones: dict
  model: ResDenseNet
  variables: dict
  images: np.ndarray
  labels: np.ndarray
  keras_logits: np.ndarray  # Keras's inference output on `images`, before any train step changes its weights


@pytest.fixture(scope="module", params=list(HEADS))
def reference(request):
  head = HEADS[request.param]
  config = head_config(head)
  keras_model, backbones = keras_small_resdense(head.num_outputs)
  model = train.create_model(config.model)
  assert model.num_outputs == head.num_outputs
  variables = flax_variables_from_keras(model, keras_model, backbones)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))
  shapes = lambda tree: {path: tuple(v.shape) for path, v in traverse_util.flatten_dict(tree).items()}
  assert shapes(variables) == shapes(expected)  # every Flax variable, and only those, filled from Keras
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (8, SIZE, SIZE, 3)).astype(np.uint8)
  labels = np.array([0, 1, 1, 0, 1, 0, 0, 1], np.int32)
  # Keras's jit-compiled inference (training=False); its train step below then changes the weights.
  keras_logits = np.asarray(keras_model.predict_on_batch(images.astype(np.float32)))
  assert keras_logits.shape == (8, head.num_outputs)
  return Reference(head, config, keras_model, backbones, model, variables, images, labels, keras_logits)


def test_inference_and_probability_equal_keras(reference):
  r = reference

  @jax.jit
  def ours(variables, images):
    return r.model.apply(variables, images, train=False), train.eval_step(variables, images, model=r.model)

  logits, probability = ours(r.variables, jnp.asarray(r.images))
  np.testing.assert_allclose(np.asarray(logits), r.keras_logits, rtol=1e-4, atol=1e-5)
  # The eval step's P(COVID): sigmoid of the one logit, or softmax[:, 1] of two.
  expected = r.head.keras_probability(r.keras_logits)
  np.testing.assert_allclose(np.asarray(probability), expected, rtol=1e-4, atol=1e-6)
  # Away from 1/2, so class 0's probability (1 - p) would not pass for class 1's.
  assert np.abs(expected - 0.5).max() > 0.05


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# The softmax head's step (36 s here) is `long`; its inference and P(COVID) = softmax[:, 1] stay in the suite.
@pytest.mark.parametrize("reference", ["sigmoid", pytest.param("softmax", marks=pytest.mark.long)],
                         indirect=True)
def test_one_train_step_equals_keras(reference):
  r = reference
  # Ours, as the engine builds it: the phase's rules, frozen BatchNorms in inference mode, RMSprop 1e-4, the
  # config's loss from logits.
  params = r.variables["params"]
  phase = train.create_phase(0, train.plan_phases(r.config, steps_per_epoch=1), r.config, params)
  frozen_bn = dict(phase.model.frozen_bn)
  assert frozen_bn["resnet50"] and frozen_bn["densenet121"]
  state = train.create_train_state(jax.random.PRNGKey(0), r.variables, phase)
  step = jax.jit(functools.partial(train.train_step, model=phase.model, tx=phase.tx, labels=phase.labels,
                                   loss_fn=losses.get_loss(r.config.train.loss)))
  new_state, metrics = step(state, {"image": jnp.asarray(r.images), "label": jnp.asarray(r.labels)})

  # Keras: the same layers frozen (layer.trainable = False also puts their BatchNorm in inference mode).
  for name, backbone in r.backbones.items():
    for layer in backbone.layers[:r.head.freeze_first[name]]:
      layer.trainable = False
  r.keras_model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=1e-4), loss=r.head.keras_loss())
  keras_loss = r.keras_model.train_on_batch(r.images.astype(np.float32), r.head.keras_labels(r.labels))
  assert float(metrics["loss"]) == pytest.approx(float(keras_loss), rel=1e-4)

  updated = flax_variables_from_keras(r.model, r.keras_model, r.backbones)
  ours_after = {"params": new_state.params, "batch_stats": new_state.batch_stats}
  trees.assert_same_structure(ours_after, updated)
  flat_new = traverse_util.flatten_dict(ours_after)
  flat_old = traverse_util.flatten_dict(r.variables)
  flat_keras = traverse_util.flatten_dict(updated)
  flat_labels = traverse_util.flatten_dict(phase.labels)
  moved = {"params": 0, "batch_stats": 0}
  for path, theirs in flat_keras.items():
    ours, before = np.asarray(flat_new[path]), np.asarray(flat_old[path])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6, err_msg="/".join(path))
    if path[0] == "params" and flat_labels[path[1:]] == optim.FROZEN:
      assert np.array_equal(ours, before), "/".join(path)
    if path[0] == "batch_stats" and path[2] in frozen_bn[path[1]]:
      assert np.array_equal(ours, before), "/".join(path)  # a frozen BatchNorm keeps its statistics
    delta_theirs = np.asarray(theirs) - before
    if np.abs(delta_theirs).max() > 1e-6:
      moved[path[0]] += 1
      # The step itself (not only its endpoint) agrees.
      assert _rel(ours - before, delta_theirs) < 2e-3, "/".join(path)
  # Both the trained parameters and the trained BatchNorms' statistics moved.
  assert moved["params"] > 10 and moved["batch_stats"] > 4, moved
