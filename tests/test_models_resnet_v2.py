"""ResNet50V2/101V2/152V2 against Keras Applications itself: layer lists, parameter counts, forward parity with
random weights loaded from Keras-written files, the registry, and a V2 backbone inside the fused model.

Fast: the layer lists and parameter counts of all three and of a small 3-stage variant built by Keras's own
`resnet.ResNet(preact=True)`, ResNet50V2's forward with and without top on an odd input. `long`: each model as
keras.applications builds it, with and without top (ResNet101V2/152V2 cost seconds per Keras build and compile),
and the small variant's forward.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402

import flax.linen as nn  # noqa: E402
import h5py  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras.src.applications import resnet as keras_resnet  # noqa: E402

import keras_fixtures as kf  # noqa: E402
import trees  # noqa: E402
from keras_fixtures import _zero_initializers as zero_initializers  # noqa: E402
from resdense_jax import models, optim, train, weights  # noqa: E402
from resdense_jax.models.resdense import ResDenseNet  # noqa: E402

V2_ARCHS = ("resnet50v2", "resnet101v2", "resnet152v2")
TOLERANCE = 1e-4
ODD, TOP_HW = (65, 47), (64, 64)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  return kf.KerasReference(tmp_path_factory.mktemp("keras_resnet_v2"))


# ---- structure: Keras's model.layers and count_params ----

@functools.lru_cache(maxsize=None)
def _keras_model(arch: str) -> keras.Model:
  """keras.applications.<arch>(weights=None, include_top=True), all-zero weights (structure only)."""
  keras.backend.clear_session()  # the unnamed MaxPooling2D shortcuts are max_pooling2d, max_pooling2d_1, ...
  with zero_initializers():
    return kf.KERAS_APPLICATIONS[arch](weights=None, include_top=True, input_shape=(32, 32, 3))


def _variable_count(model) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(weights.abstract_variables(model)))


@pytest.mark.parametrize("arch", V2_ARCHS)
def test_keras_layer_list_and_parameter_count_equal_keras(arch, request):
  # ResNet50V2's Keras build is the parity fixture's (the same layers at another input size).
  reference = request.getfixturevalue("resnet50v2")["keras"][True] if arch == "resnet50v2" else _keras_model(arch)
  model = models.BACKBONES[arch](include_top=True)
  layers = model.keras_layers()
  assert [layer.name for layer in layers] == [layer.name for layer in reference.layers]
  assert [layer.class_name for layer in layers] == [type(layer).__name__ for layer in reference.layers]
  assert [len(layer.weights) for layer in layers] == [len(layer.weights) for layer in reference.layers]
  assert _variable_count(model) == reference.count_params()
  # (Without top, Keras drops avg_pool and predictions: ResNet50V2's parity test checks that list.)
  # Keras's layer names (what a weights file records) tell the architecture: "imagenet" finds this file.
  assert weights.describe_architecture([layer.name for layer in reference.layers]) == arch
  assert models.BACKBONES[arch]().num_features == reference.get_layer("post_relu").output.shape[-1] == 2048
  # The weights each layer lists are exactly the model's variables, each once.
  listed = [path for layer in layers for path in layer.weights]
  flat = {tuple(k.key for k in path) for path, _ in
          jax.tree_util.tree_flatten_with_path(weights.abstract_variables(model))[0]}
  assert len(listed) == len(set(listed)) and set(listed) == flat


def test_stages_need_two_blocks():
  with pytest.raises(ValueError, match=r"stage_sizes \(2, 1\): every ResNet v2 stage needs at least 2 blocks"):
    models.ResNetV2(stage_sizes=(2, 1), filters=(4, 8)).keras_layers()


# ---- small variants built by Keras's own ResNet(preact=True): layer list, count and forward ----

SMALL_STAGES, SMALL_FILTERS = (2, 3, 2), (4, 8, 8)


def _small_keras(pooling, hw):
  def stack_fn(x):
    x = keras_resnet.stack_residual_blocks_v2(x, SMALL_FILTERS[0], SMALL_STAGES[0], name="conv2")
    x = keras_resnet.stack_residual_blocks_v2(x, SMALL_FILTERS[1], SMALL_STAGES[1], name="conv3")
    return keras_resnet.stack_residual_blocks_v2(x, SMALL_FILTERS[2], SMALL_STAGES[2], stride1=1, name="conv4")

  keras.backend.clear_session()
  with zero_initializers():
    model = keras_resnet.ResNet(stack_fn, preact=True, use_bias=True, include_top=False, weights=None,
                                input_shape=(*hw, 3), pooling=pooling)
  kf.randomize_weights(model, seed=3)
  return model


def test_small_resnet_v2_layers_match_keras():
  # Three stages: the unnamed pools are max_pooling2d, max_pooling2d_1, beside the explicit `max_pool`.
  reference = _small_keras("max", ODD)
  model = models.ResNetV2(stage_sizes=SMALL_STAGES, filters=SMALL_FILTERS, pooling="max")
  assert [layer.name for layer in model.keras_layers()] == [layer.name for layer in reference.layers]
  assert _variable_count(model) == reference.count_params()


@pytest.mark.long
def test_small_resnet_v2_equals_keras(tmp_path):
  """The small variant's forward (ResNet50V2's parity test is the fast check of the same code)."""
  reference = _small_keras(None, ODD)
  model = models.ResNetV2(stage_sizes=SMALL_STAGES, filters=SMALL_FILTERS)
  x = kf.random_images((2, *ODD, 3), seed=5)
  expected = np.asarray(jax.jit(lambda x: reference(x, training=False))(x))
  variables = weights.load_keras(model, kf.save_legacy(reference, tmp_path / "small.h5"))
  actual = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  assert actual.shape == expected.shape and np.std(expected) > 1e-2
  assert kf.relative_max_diff(actual, expected) <= TOLERANCE


# ---- ResNet50V2 forward parity and weight files (legacy .h5 and Keras 3 .weights.h5) ----
# One Keras build and one compiled program per side serve both outputs: the headless Keras model is Keras's own
# graph cut at post_relu (the layers of ResNet50V2(include_top=False), sharing the top model's weights), and the
# Flax top model also returns its `post_bn` output, whose ReLU is the headless model's output.

@pytest.fixture(scope="module")
def resnet50v2(tmp_path_factory):
  """Keras ResNet50V2 with random weights: the top and headless models, their outputs on ODD images, files."""
  folder = tmp_path_factory.mktemp("resnet50v2")
  top = kf.build_keras("resnet50v2", include_top=True, input_shape=(*ODD, 3))
  features = top.get_layer("post_relu").output
  headless = keras.Model(top.inputs, features, name="resnet50v2")
  both = keras.Model(top.inputs, [features, top.output])
  images = kf.random_images((2, *ODD, 3), seed=1)
  outputs = jax.jit(lambda x: both(x, training=False))(images)
  legacy = kf.save_legacy(top, folder / "top.h5")
  files = {
      True: {"legacy": legacy, "keras3": kf.save_keras3(top, folder / "top.weights.h5"),
             "tf_keras": kf.to_tf_keras_layout(legacy, folder / "top_tf_keras.h5", densenet=False)},
      False: {"legacy": kf.save_legacy(headless, folder / "notop.h5"),
              "keras3": kf.save_keras3(headless, folder / "notop.weights.h5")},
  }
  return {"keras": {True: top, False: headless}, "images": images,
          "outputs": {False: np.asarray(outputs[0]), True: np.asarray(outputs[1])}, "files": files}


def test_resnet50v2_parity_with_keras(resnet50v2):
  model = models.ResNet50V2(include_top=True)
  headless = models.ResNet50V2()
  for include_top, flax_model in ((True, model), (False, headless)):
    assert [layer.name for layer in flax_model.keras_layers()] == [
        layer.name for layer in resnet50v2["keras"][include_top].layers]
  variables = weights.load_keras(model, resnet50v2["files"][True]["keras3"])
  # The headless model's variables, from the no-top file, are the top model's without `predictions`.
  headless_variables = weights.load_keras(headless, resnet50v2["files"][False]["legacy"])
  trees.assert_trees_equal(headless_variables, {"params": {k: v for k, v in variables["params"].items()
                                                           if k != "predictions"},
                                                "batch_stats": variables["batch_stats"]})

  @jax.jit
  def forward(variables, x):
    probabilities, captured = model.apply(variables, x, train=False, mutable=["intermediates"],
                                          capture_intermediates=lambda module, _: module.name == "post_bn")
    return probabilities, jax.nn.relu(captured["intermediates"]["post_bn"]["__call__"][0])

  probabilities, features = forward(variables, resnet50v2["images"])
  _check_close(np.asarray(probabilities), resnet50v2["outputs"][True], include_top=True)
  _check_close(np.asarray(features), resnet50v2["outputs"][False], include_top=False)


def _check_close(actual, expected, include_top):
  assert actual.shape == expected.shape and np.all(np.isfinite(expected))
  # The random weights keep activations O(1): neither vanishing nor exploding, and the softmax not saturated.
  if include_top:
    assert np.std(expected) > 1e-4 and expected.max() < 0.9
  else:
    assert np.std(expected) > 1e-2 and np.max(np.abs(expected)) < 1e3
  assert kf.relative_max_diff(actual, expected) <= TOLERANCE


LONG_PARITY = [(arch, top, hw, layout) for arch in V2_ARCHS
               for top, hw, layout in ((False, ODD, "keras3"), (True, TOP_HW, "legacy"))]


@pytest.mark.long
@pytest.mark.parametrize("arch,include_top,hw,layout", LONG_PARITY, ids=kf.case_id)
def test_parity_with_keras_applications(ref, arch, include_top, hw, layout):
  """Each model as keras.applications builds it, with and without top (ResNet101V2/152V2: seconds each)."""
  expected = ref.output(arch, include_top, None, hw)
  model = models.BACKBONES[arch](include_top=include_top)
  variables = weights.load_keras(model, ref.files(arch, include_top, hw)[layout])
  _check_close(np.asarray(kf.jitted_apply(model)(variables, ref.images(hw))), expected, include_top)


def test_every_layout_loads_the_keras_weights(resnet50v2):
  for include_top, files in resnet50v2["files"].items():
    model = models.ResNet50V2(include_top=include_top)
    expected = kf.keras_variables(resnet50v2["keras"][include_top], model)
    assert sum(leaf.size for leaf in jax.tree.leaves(expected)) == resnet50v2["keras"][include_top].count_params()
    for path in files.values():
      trees.assert_trees_equal(weights.load_keras(model, path), expected)


def test_keras3_file_without_layer_names_and_wrong_family(resnet50v2, tmp_path):
  # Keras 3 releases before the `name` attribute: the architecture is told from the Conv2D and BatchNorm
  # counts (ResNet50 and ResNet50V2 both have 53 convs).
  path = tmp_path / "unnamed.weights.h5"
  path.write_bytes(resnet50v2["files"][False]["keras3"].read_bytes())
  with h5py.File(path, "r+") as f:
    for group in f["layers"].values():
      if "vars" in group and "name" in group["vars"].attrs:
        del group["vars"].attrs["name"]
  model = models.ResNet50V2()
  trees.assert_trees_equal(weights.load_keras(model, path), kf.keras_variables(resnet50v2["keras"][False], model))
  for source in (path, resnet50v2["files"][False]["legacy"]):
    with pytest.raises(weights.WeightsError, match="wrong architecture: the file holds resnet50v2 weights, the "
                                                   "model is resnet50$"):
      weights.load_keras(models.ResNet50(), source)
  v1_names = [layer.name for layer in models.ResNet50().keras_layers()]
  assert weights.describe_architecture(v1_names) == "resnet50"


# ---- the registry ----

def test_registry_has_the_published_v2_files():
  entries = [e for e in weights.REGISTRY.values() if e.arch in V2_ARCHS]
  assert sorted((e.arch, e.include_top) for e in entries) == sorted(
      (arch, top) for arch in V2_ARCHS for top in (True, False))
  for entry in entries:
    suffix = "" if entry.include_top else "_notop"
    assert entry.file_name == f"{entry.arch}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
    assert entry.url == "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + entry.file_name
    assert entry.url == keras_resnet.BASE_WEIGHTS_PATH + entry.file_name
    assert re.fullmatch(r"[0-9a-f]{32}", entry.md5)
    assert entry.md5 == keras_resnet.WEIGHTS_HASHES[entry.arch][0 if entry.include_top else 1]
  for arch in V2_ARCHS:
    for include_top in (True, False):
      assert weights.registry_entry(arch, include_top).url.endswith(
          f"/{arch}_weights_tf_dim_ordering_tf_kernels{'' if include_top else '_notop'}.h5")
  assert weights.describe_architecture(
      [layer.name for layer in models.ResNetV2(stage_sizes=(2, 2), filters=(4, 8)).keras_layers()]) == \
      "a ResNet v2 with stage sizes (2, 2)"


def test_imagenet_finds_the_v2_file_in_the_cache(resnet50v2, tmp_path, monkeypatch):
  # The registry's own file name and lookup; the MD5 is the Keras-written stand-in's (the real file is 90 MB).
  name = "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
  cached = tmp_path / name
  cached.write_bytes(resnet50v2["files"][False]["legacy"].read_bytes())
  monkeypatch.setitem(weights.REGISTRY, name, dataclasses.replace(weights.REGISTRY[name],
                                                                  md5=weights.md5sum(cached)))
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
  model = models.ResNet50V2(pooling="avg")
  variables = weights.load_keras(model, "imagenet", cache_dir=tmp_path, download=False)
  trees.assert_trees_equal(variables, kf.keras_variables(resnet50v2["keras"][False], model))


def test_keras_constructor_names_in_messages():
  assert train._keras_name("resnet101v2") == "ResNet101V2"
  assert train._keras_name("densenet169") == "DenseNet169"
  for name in models.BACKBONES:
    assert hasattr(keras.applications, train._keras_name(name)), name


# ---- a V2 backbone in the fused model: preprocessing, forward, freezing rules ----

TINY_V2 = dict(stage_sizes=(2, 2, 2, 2), filters=(4, 8, 8, 8), stem_filters=8)
TINY_DENSENET = dict(blocks=(1, 1, 1, 1), growth_rate=4, stem_filters=8)


def test_preprocessing_modes():
  assert models.PREPROCESSING_MODE["resnet50v2"] == models.PREPROCESSING_MODE["resnet152v2"] == "tf"
  assert models.PREPROCESSING_MODE["resnet101"] == "caffe" and models.PREPROCESSING_MODE["densenet169"] == "torch"
  x = np.random.default_rng(0).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
  fused = ResDenseNet(backbones=("resnet101v2", "densenet169"))
  expected = np.asarray(keras.applications.resnet_v2.preprocess_input(x.copy()))
  np.testing.assert_allclose(np.asarray(fused.preprocess(jnp.asarray(x), "resnet101v2")), expected,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(expected, x / 127.5 - 1.0, rtol=1e-6, atol=1e-6)


def _random_variables(shapes, seed: int = 0):
  """He-scaled kernels, small biases, BatchNorm near the identity, from numpy (no init program to compile)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(leaf.dtype)
    if name in ("scale", "var"):
      return rng.uniform(0.8, 1.2, leaf.shape).astype(leaf.dtype)
    return rng.uniform(-0.1, 0.1, leaf.shape).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_fused_model_with_a_v2_backbone():
  model = ResDenseNet(backbones=("resnet101v2", "densenet169"), fusion_filters=8,
                      backbone_kwargs={"resnet101v2": TINY_V2, "densenet169": TINY_DENSENET})
  x = jnp.asarray(np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)), jnp.float32)
  variables = _random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  assert variables["params"]["resnet101v2_fusion_conv"]["kernel"].shape == (3, 3, 4 * 8, 8)
  assert "post_bn" in variables["params"]["resnet101v2"] and "post_bn" in variables["batch_stats"]["resnet101v2"]

  @jax.jit
  def forward(variables, x):
    # What each backbone module is called with and returns, seen from outside the model.
    seen = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and context.module.name in model.backbones:
        seen[context.module.name] = (args[0], out)
      return out

    with nn.intercept_methods(record):
      logits = model.apply(variables, x)
    return logits, seen

  logits, seen = forward(variables, x)
  assert logits.shape == (2, 1) and np.all(np.isfinite(logits))
  (v2_input, v2_features), (densenet_input, _) = seen["resnet101v2"], seen["densenet169"]
  assert v2_features.shape == (2, 1, 1, 32) and np.all(np.isfinite(v2_features)) and np.std(v2_features) > 0
  # Each branch gets its own Keras preprocessing: "tf" ([-1, 1]) for the V2, "torch" for the DenseNet.
  np.testing.assert_allclose(v2_input, keras.applications.resnet_v2.preprocess_input(np.array(x)),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(densenet_input, keras.applications.densenet.preprocess_input(np.array(x)),
                             rtol=1e-5, atol=1e-5)


def test_freezing_the_first_keras_layers_of_a_v2_backbone():
  keras_model = _keras_model("resnet101v2")
  model = ResDenseNet(backbones=("resnet101v2", "densenet169"), fusion_filters=8,
                      backbone_kwargs={"densenet169": TINY_DENSENET})
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  labels = optim.freeze_labels(params["params"], ("resnet101v2:100",), model.keras_layers())
  frozen = {path for path, label in jax.tree_util.tree_flatten_with_path(labels)[0] if label == optim.FROZEN}
  frozen = {tuple(k.key for k in path) for path in frozen}
  # Exactly the parameters (not the moving statistics) of Keras's first 100 model.layers.
  trainable_names = {"kernel": "kernel", "bias": "bias", "gamma": "scale", "beta": "bias"}
  expected = {("resnet101v2", layer.name, trainable_names[w.name]) for layer in keras_model.layers[:100]
              for w in layer.weights if w.name in trainable_names}
  assert frozen == expected and len(expected) > 50
  frozen_bn = optim.frozen_batchnorm(labels, model.keras_layers())
  assert frozen_bn["resnet101v2"] == tuple(layer.name for layer in keras_model.layers[:100]
                                           if isinstance(layer, keras.layers.BatchNormalization))
  assert frozen_bn["densenet169"] == ()
