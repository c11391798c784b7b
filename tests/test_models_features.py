"""`model.apply(variables, x, features=names)`: any Keras layer's output by its Keras name, against Keras's own
`keras.Model(base.input, base.get_layer(name).output)`, for ResNet v1, ResNet v2, DenseNet and inside the fused
model ("<backbone>/<layer>"); names that do not exist; and the default call's program unchanged by the feature
and input-check machinery.

Keras models: Keras's own builders at small depth with random weights (keras_fixtures), loaded into the Flax
models through their files.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras.src.applications import resnet as keras_resnet  # noqa: E402

import keras_fixtures as kf  # noqa: E402
from keras_fixtures import _zero_initializers as zero_initializers  # noqa: E402
from resdense_jax import models, weights  # noqa: E402
from resdense_jax.models import keras_layers as kl  # noqa: E402
from resdense_jax.models.features import requested  # noqa: E402

TOLERANCE = 1e-4
HW = (64, 48)
V2_KWARGS = dict(stage_sizes=(2, 2, 2, 2), filters=(4, 8, 8, 8))


def _small_keras_v2() -> keras.Model:
  """Keras's ResNet v2 builder (ResNet50V2's code path) at 2 blocks per stage, random weights."""
  def stack_fn(x):
    for stage, filters in enumerate(V2_KWARGS["filters"][:-1], start=2):
      x = keras_resnet.stack_residual_blocks_v2(x, filters, 2, name=f"conv{stage}")
    return keras_resnet.stack_residual_blocks_v2(x, V2_KWARGS["filters"][-1], 2, stride1=1, name="conv5")

  keras.backend.clear_session()  # the unnamed MaxPooling2D shortcuts are max_pooling2d, max_pooling2d_1, ...
  with zero_initializers():
    model = keras_resnet.ResNet(stack_fn, preact=True, use_bias=True, include_top=False, weights=None,
                                input_shape=(None, None, 3), name="resnet50v2")
  kf.randomize_weights(model, seed=5)
  return model


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
  """{family: (Keras model, Flax model, Flax variables loaded from the Keras model's file)}."""
  folder = tmp_path_factory.mktemp("features")
  built = {"resnet": (kf.build_small_keras("resnet50", seed=1), models.ResNet50(**kf.SMALL_BACKBONE_KWARGS["resnet50"])),
           "resnet_v2": (_small_keras_v2(), models.ResNet50V2(**V2_KWARGS)),
           "densenet": (kf.build_small_keras("densenet121", seed=2),
                        models.DenseNet121(**kf.SMALL_BACKBONE_KWARGS["densenet121"]))}
  return {family: (keras_model, model, weights.load_keras(model, kf.save_legacy(keras_model, folder / f"{family}.h5")))
          for family, (keras_model, model) in built.items()}


def _keras_features(keras_model: keras.Model, names, x) -> dict[str, np.ndarray]:
  """Keras's outputs of the named layers: keras.Model(base.input, [base.get_layer(n).output ...])."""
  outputs = [keras_model.get_layer(n).output for n in names]
  extractor = keras.Model(keras_model.input, outputs)
  values = jax.jit(lambda x: extractor(x, training=False))(x)
  values = values if isinstance(values, (list, tuple)) else [values]  # Keras unwraps a one-output list
  return {n: np.asarray(v) for n, v in zip(names, values)}


# Layers Keras users take, among each small model's layers.
NAMED_OUTPUTS = {"resnet": ("conv1_relu", "pool1_pool", "conv3_block1_out", "conv5_block1_out"),
                 "resnet_v2": ("conv2_block1_preact_relu", "max_pooling2d_1", "conv4_block2_out", "post_relu"),
                 "densenet": ("zero_padding2d_1", "pool3_relu", "conv5_block1_concat", "relu")}


@pytest.mark.parametrize("family", list(NAMED_OUTPUTS))
def test_every_keras_layer_output_equals_keras(backbones, family):
  keras_model, model, variables = backbones[family]
  names = [layer.name for layer in model.keras_layers()]
  assert names == [layer.name for layer in keras_model.layers]  # every Keras layer, input and paddings included
  assert set(NAMED_OUTPUTS[family]) <= set(names)
  x = kf.random_images((2, *HW, 3), seed=3)
  expected = _keras_features(keras_model, names, x)
  # One program for both calls (one compile).
  ours, output = jax.jit(lambda v, x: (model.apply(v, x, features=names), model.apply(v, x)))(variables, x)
  assert set(ours) == set(names)
  for name in names:
    assert ours[name].shape == expected[name].shape, name
    assert np.std(expected[name]) > 1e-3, name  # a real activation, not a vanishing one
    assert kf.relative_max_diff(ours[name], expected[name]) <= TOLERANCE, name
  # The last layer is the model's own output.
  np.testing.assert_allclose(ours[names[-1]], output, rtol=1e-6, atol=1e-6)


def test_head_layers_and_one_name():
  model = models.ResNet(stage_sizes=(1,), filters=(4,), stem_filters=8, include_top=True, num_classes=3)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
  ours, one, output = jax.jit(lambda v, x: (
      model.apply(v, x, features=("avg_pool", "predictions")),
      model.apply(v, x, features="conv1_relu"),  # one name: a str
      model.apply(v, x)))(variables, x)
  # Keras's `predictions` Dense carries the softmax: its output is the model's probabilities.
  np.testing.assert_allclose(ours["predictions"], output, rtol=1e-6)
  assert ours["avg_pool"].shape == (2, 16) and np.ptp(np.asarray(output)) > 0
  assert list(one) == ["conv1_relu"] and one["conv1_relu"].shape == (2, 16, 16, 8)
  assert requested(["a", "b"]) == ("a", "b") and requested(None) is None
  with pytest.raises(TypeError, match="features: expected Keras layer names"):
    requested(["a", 3])


def test_fused_model_features_by_backbone_and_its_own(backbones, tmp_path):
  (resnet_keras, _, _), (densenet_keras, _, _) = backbones["resnet"], backbones["densenet"]
  model = models.ResDenseNet(backbones=("resnet50", "densenet121"), fusion_filters=8,
                             backbone_kwargs=kf.SMALL_BACKBONE_KWARGS)
  files = {"resnet50": kf.save_legacy(resnet_keras, tmp_path / "r.h5"),
           "densenet121": kf.save_legacy(densenet_keras, tmp_path / "d.h5")}
  variables = model.pretrained(files, rng=0)
  raw = np.random.default_rng(4).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
  names = ("resnet50/conv3_block1_out", "densenet121/pool3_relu", "resnet50/conv5_block1_out",
           "resnet50_fusion_conv", "densenet121_fusion_conv", "add", "avg_pool", "predictions")
  # One program for the three calls (one compile).
  ours, maps, logits = jax.jit(lambda v, x: (model.apply(v, x, features=names),
                                             model.apply(v, x, method="backbone_features"),
                                             model.apply(v, x)))(variables, raw)
  assert set(ours) == set(names)
  # Each backbone's layers inside the fused model: Keras's on that backbone's own preprocess_input.
  for prefixed, keras_model, keras_input in (
      ("resnet50/conv3_block1_out", resnet_keras, keras.applications.resnet.preprocess_input(raw.copy())),
      ("densenet121/pool3_relu", densenet_keras, keras.applications.densenet.preprocess_input(raw.copy()))):
    layer = prefixed.split("/", 1)[1]
    expected = _keras_features(keras_model, [layer], keras_input)[layer]
    assert kf.relative_max_diff(ours[prefixed], expected) <= TOLERANCE, prefixed
  # The fused model's own names are the values its forward pass uses.
  np.testing.assert_allclose(ours["resnet50/conv5_block1_out"], maps["resnet50"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours["add"], ours["resnet50_fusion_conv"] + ours["densenet121_fusion_conv"], rtol=1e-6)
  np.testing.assert_allclose(ours["avg_pool"], np.mean(ours["add"], axis=(1, 2)), rtol=1e-5)
  np.testing.assert_allclose(ours["predictions"], logits, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- errors

TINY = {"resnet50": dict(stage_sizes=(1, 1, 1, 1), filters=(4, 8, 8, 8), stem_filters=8),
        "densenet121": dict(blocks=(1, 1, 1, 1), growth_rate=4, stem_filters=8)}


def _trace(model, **kwargs):
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x, **kwargs)[0], x)


def test_unknown_names_raise_with_close_matches():
  with pytest.raises(ValueError, match=r"^ResNet50: no Keras layer 'conv3_block1_ot'; did you mean 'conv3_block1_out'"
                                       r".*model.keras_layers\(\) lists them"):
    _trace(models.ResNet50(**TINY["resnet50"]), features=("conv1_relu", "conv3_block1_ot"))
  fused = models.ResDenseNet(backbones=("resnet50", "densenet121"), fusion_filters=4, backbone_kwargs=TINY)
  with pytest.raises(ValueError, match=r"^ResDenseNet backbone 'resnet50': no Keras layer 'conv3_block1_ot'; did "
                                       r"you mean 'conv3_block1_out'"):
    _trace(fused, features=("resnet50/conv3_block1_ot",))
  with pytest.raises(ValueError, match=r"features 'densnet121/pool3_relu': unknown backbone \(not one of backbones\) "
                                       r"'densnet121' \(did you mean 'densenet121'\?\)"):
    _trace(fused, features=("densnet121/pool3_relu",))
  with pytest.raises(ValueError, match=r"^ResDenseNet: no feature 'pool3_relu'; did you mean "
                                       r"'densenet121/pool3_relu'.*'<backbone>/<Keras layer name>'"):
    _trace(fused, features=("pool3_relu",))
  with pytest.raises(ValueError, match=r"features=... needs part='all', got part='backbones'"):
    _trace(fused, features=("add",), part="backbones")
  assert set(_trace(fused, features=("add", "densenet121/relu"))) == {"add", "densenet121/relu"}


# ------------------------------------------------------------------------------ the default call's program


PROGRAM_CASES = {
    "resnet": models.ResNet(**TINY["resnet50"], pooling="avg"),
    "resnet_v2": models.ResNetV2(stage_sizes=(2, 2), filters=(4, 8), stem_filters=8),
    "densenet": models.DenseNet(**TINY["densenet121"], include_top=True, num_classes=3),
    "fused": models.ResDenseNet(backbones=("resnet50", "densenet121"), fusion_filters=4, backbone_kwargs=TINY),
}


def _programs(model) -> tuple[str, ...]:
  """The jaxprs of init, inference and a training forward pass of the default call (no features)."""
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  rngs = {"dropout": jax.random.PRNGKey(1)}
  return (str(jax.make_jaxpr(lambda x: model.init(jax.random.PRNGKey(0), x))(x)),
          str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)),
          str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], rngs=rngs))(
              variables, x)))


@pytest.mark.parametrize("case", list(PROGRAM_CASES))
def test_features_and_checks_add_nothing_to_the_default_program(case, monkeypatch):
  model = PROGRAM_CASES[case]
  with_machinery = _programs(model)
  # The same model with the per-layer hand-off and the input checks taken out.
  monkeypatch.setattr(kl, "emit", lambda name, value: value)
  monkeypatch.setattr(kl.KerasApplication, "check_input", lambda self, x, train, features: requested(features))
  monkeypatch.setattr(models.ResDenseNet, "check_input", lambda self, x, train, part="all": None)
  assert _programs(model) == with_machinery
