"""The backbones against Keras Applications itself: layer lists, parameter counts, shapes, preprocessing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trees
from resdense_jax import models

keras = pytest.importorskip("keras")

KERAS_CONSTRUCTORS = {
    "resnet50": "ResNet50", "resnet101": "ResNet101", "resnet152": "ResNet152",
    "densenet121": "DenseNet121", "densenet169": "DenseNet169", "densenet201": "DenseNet201",
}


def _variable_count(model, size=32):
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


# The paper's pair in the suite; the other four build 7-26 s each here and sit behind `long` (the same code
# builds them: depth is a constructor argument, and benchmarks/parity.py compares all six to Keras).
PAPER_PAIR = ("resnet101", "densenet121")


@pytest.mark.parametrize("arch", [a if a in PAPER_PAIR else pytest.param(a, marks=pytest.mark.long)
                                  for a in KERAS_CONSTRUCTORS])
def test_keras_layer_list_and_parameter_count_equal_keras(arch):
  keras.backend.clear_session()  # Keras's automatic names (input_layer, zero_padding2d) start afresh.
  reference = getattr(keras.applications, KERAS_CONSTRUCTORS[arch])(
      weights=None, include_top=True, input_shape=(32, 32, 3))
  model = models.BACKBONES[arch](include_top=True)
  layers = model.keras_layers()
  assert [layer.name for layer in layers] == [layer.name for layer in reference.layers]
  assert [layer.class_name for layer in layers] == [type(layer).__name__ for layer in reference.layers]
  for ours, theirs in zip(layers, reference.layers):
    assert len(ours.weights) == len(theirs.weights), ours.name
  assert _variable_count(model) == reference.count_params()
  # Without top, Keras drops exactly avg_pool and predictions.
  assert [layer.name for layer in models.BACKBONES[arch]().keras_layers()] == [
      layer.name for layer in reference.layers[:-2]]


def test_keras_layer_weights_point_at_real_variables():
  model = models.DenseNet(blocks=(1, 2), growth_rate=4, include_top=True, num_classes=3)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  listed = [path for layer in model.keras_layers() for path in layer.weights]
  flat = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}
  assert len(listed) == len(set(listed)) == len(flat)
  assert set(listed) == flat


@pytest.mark.parametrize("pooling", [None, "avg", "max"])
def test_small_resnet_matches_keras_layers_and_odd_input_shapes(pooling):
  from keras.src.applications import resnet as keras_resnet

  def stack_fn(x):
    x = keras_resnet.stack_residual_blocks_v1(x, 4, 1, stride1=1, name="conv2")
    return keras_resnet.stack_residual_blocks_v1(x, 8, 2, name="conv3")

  keras.backend.clear_session()
  reference = keras_resnet.ResNet(stack_fn, preact=False, use_bias=True, include_top=False, weights=None,
                                  input_shape=(65, 47, 3), pooling=pooling)
  model = models.ResNet(stage_sizes=(1, 2), filters=(4, 8), stem_filters=64, pooling=pooling)
  assert [layer.name for layer in model.keras_layers()] == [layer.name for layer in reference.layers]
  assert _variable_count(model) == reference.count_params()
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False)[0],
                       jax.ShapeDtypeStruct((2, 65, 47, 3), jnp.float32))
  assert out.shape == (2, *reference.output.shape[1:])


def test_small_variants_match_keras_small_models():
  from keras.src.applications import densenet as keras_densenet
  keras.backend.clear_session()
  reference = keras_densenet.DenseNet(blocks=[1, 2, 1, 1], include_top=False, weights=None,
                                      input_shape=(32, 32, 3))
  model = models.DenseNet(blocks=(1, 2, 1, 1))
  assert [layer.name for layer in model.keras_layers()] == [layer.name for layer in reference.layers]
  assert _variable_count(model) == reference.count_params()
  assert model.num_features == reference.output.shape[-1]


# A few blocks of each backbone family: enough depth for bfloat16 rounding to compound.
SMALL_BACKBONES = {
    "resnet": lambda **kw: models.ResNet(stage_sizes=(1, 1, 1), filters=(4, 8, 8), stem_filters=8, **kw),
    "densenet": lambda **kw: models.DenseNet(blocks=(1, 2, 1), growth_rate=4, **kw),
}


@pytest.mark.parametrize("family", list(SMALL_BACKBONES))
def test_bfloat16_compute_follows_float32(family):
  f32 = SMALL_BACKBONES[family](pooling="avg")
  bf16 = SMALL_BACKBONES[family](pooling="avg", dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  # bfloat16 compute keeps float32 parameters: both models have the very same variables. (An RBG key: its
  # init program compiles faster on CPU.)
  variables = jax.jit(lambda x: f32.init(jax.random.key(0, impl="rbg"), x, train=False))(x)
  shapes = jax.eval_shape(lambda x: bf16.init(jax.random.PRNGKey(0), x, train=False), x)
  trees.assert_same_structure(jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), shapes),
                              variables)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  apply = lambda model: jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True))
  expected, f32_intermediates = apply(f32)(variables, x)
  actual, bf16_intermediates = apply(bf16)(variables, x)
  # Every conv, BatchNorm (and the output) computes in bfloat16, not in float32 with a cast at the end.
  computed = jax.tree_util.tree_flatten_with_path(bf16_intermediates)[0]
  assert len(computed) == len(jax.tree.leaves(f32_intermediates)) > 10
  not_bfloat16 = {jax.tree_util.keystr(path): str(leaf.dtype) for path, leaf in computed
                  if leaf.dtype != jnp.bfloat16}
  assert not not_bfloat16, not_bfloat16
  assert actual.dtype == jnp.bfloat16 and expected.dtype == jnp.float32
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  # A float32 computation rounded once at the end would give exactly this; bfloat16 all the way does not.
  assert not np.array_equal(actual, np.asarray(expected.astype(jnp.bfloat16), np.float32)), \
      "the bfloat16 output is the float32 output rounded once: computed in float32"
  # Values: bfloat16 keeps 8 significant bits (rounding up to 2^-8 relative per op); through a few blocks the
  # output stays within 2e-2 of float32, relative to its largest value.
  assert np.std(expected) > 1e-2  # a real, non-vanishing output
  relative = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert relative <= 2e-2, relative


def test_frozen_batchnorm_keeps_statistics_in_training():
  model = models.ResNet(stage_sizes=(1,), filters=(4,), stem_filters=4, frozen_bn=("conv1_bn",))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  stats, new_stats = variables["batch_stats"], updates["batch_stats"]
  np.testing.assert_array_equal(new_stats["conv1_bn"]["mean"], stats["conv1_bn"]["mean"])
  np.testing.assert_array_equal(new_stats["conv1_bn"]["var"], stats["conv1_bn"]["var"])
  assert not np.array_equal(new_stats["conv2_block1_1_bn"]["mean"], stats["conv2_block1_1_bn"]["mean"])


@pytest.mark.parametrize("mode, keras_fn", [
    ("caffe", lambda x: keras.applications.resnet.preprocess_input(x)),
    ("torch", lambda x: keras.applications.densenet.preprocess_input(x)),
    ("tf", lambda x: keras.applications.imagenet_utils.preprocess_input(x, mode="tf")),
])
def test_preprocess_input_equals_keras(mode, keras_fn):
  x = np.random.default_rng(0).uniform(0, 255, (2, 7, 5, 3)).astype(np.float32)
  expected = np.asarray(keras_fn(x.copy()))
  np.testing.assert_allclose(np.asarray(models.preprocess_input(x, mode)), expected, rtol=1e-6, atol=1e-5)
  jitted = jax.jit(models.preprocess_input, static_argnums=1)(x, mode)
  np.testing.assert_allclose(np.asarray(jitted), expected, rtol=1e-6, atol=1e-5)


def test_preprocess_input_rejects_unknown_mode():
  with pytest.raises(ValueError, match="mode must be one of"):
    models.preprocess_input(np.zeros((1, 2, 2, 3)), "bgr")
