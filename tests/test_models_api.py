"""The models as a JAX researcher imports them (issue 12): pretrained in one line, named models that describe
themselves, one `train` default, and errors that say what is wrong with an input or a constructor argument.

Nothing downloads: "imagenet" resolves through registry entries pointed at a local HTTP server (as
test_train_pretrained does), serving small Keras-built backbones with random weights.
"""

from __future__ import annotations

import functools
import inspect
import pydoc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import demo_configs
import keras_fixtures as kf
import trees
from resdense_jax import models, train, weights
from resdense_jax.models import build, checks, densenet, loading, resnet, resnet_v2
from resdense_jax.weights import pretrained as pretrained_weights

SMALL = kf.SMALL_BACKBONE_KWARGS  # the Flax twins of kf.build_small_keras
# Keras Applications' names, stage sizes / blocks and preprocessing mode of every named model.
NAMED = {
    "resnet50": ("ResNet50", resnet.ResNet, (3, 4, 6, 3), "caffe"),
    "resnet101": ("ResNet101", resnet.ResNet, (3, 4, 23, 3), "caffe"),
    "resnet152": ("ResNet152", resnet.ResNet, (3, 8, 36, 3), "caffe"),
    "resnet50v2": ("ResNet50V2", resnet_v2.ResNetV2, (3, 4, 6, 3), "tf"),
    "resnet101v2": ("ResNet101V2", resnet_v2.ResNetV2, (3, 4, 23, 3), "tf"),
    "resnet152v2": ("ResNet152V2", resnet_v2.ResNetV2, (3, 8, 36, 3), "tf"),
    "densenet121": ("DenseNet121", densenet.DenseNet, (6, 12, 24, 16), "torch"),
    "densenet169": ("DenseNet169", densenet.DenseNet, (6, 12, 32, 32), "torch"),
    "densenet201": ("DenseNet201", densenet.DenseNet, (6, 12, 48, 32), "torch"),
}
TINY_RESNET = dict(stage_sizes=(1, 1), filters=(4, 8), stem_filters=8)
TINY = {"resnet50": dict(stage_sizes=(1, 1, 1, 1), filters=(4, 8, 8, 8), stem_filters=8),
        "densenet121": dict(blocks=(1, 1, 1, 1), growth_rate=4, stem_filters=8)}


def _shapes(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _init_shapes(model, shape, dtype=jnp.float32, **kwargs):
  """Traces model.init abstractly: every trace-time check runs, nothing is computed."""
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, **kwargs), _shapes(shape, dtype))


# ---------------------------------------------------------------------------------- named models, defaults


@pytest.mark.parametrize("arch", list(NAMED))
def test_named_models_are_classes_with_keras_defaults_and_their_own_docs(arch):
  keras_name, family, depth, mode = NAMED[arch]
  cls = models.BACKBONES[arch]
  assert isinstance(cls, type) and issubclass(cls, family) and cls.__name__ == keras_name
  assert getattr(models, keras_name) is cls
  model = cls()
  assert (model.blocks if family is densenet.DenseNet else model.stage_sizes) == depth
  assert type(model.clone(pooling="avg")) is cls and model.clone(pooling="avg").pooling == "avg"
  small = cls(**({"blocks": (1, 1)} if family is densenet.DenseNet else {"stage_sizes": (2, 2), "filters": (4, 8)}))
  assert type(small) is cls and small != model
  doc = pydoc.render_doc(cls)  # what help(models.ResNet50) prints
  for text in (f"keras.applications.{keras_name}", "include_top", "pooling", "classes", "classifier_activation",
               f'preprocess_input(rgb_0_255, "{mode}")', "NHWC", f"models.{keras_name}.pretrained"):
    assert text in cls.__doc__, text
  assert f"keras.applications.{keras_name}" in doc and "functools.partial" not in doc
  assert models.PREPROCESSING_MODE[arch] == mode


@pytest.mark.parametrize("cls", [models.ResNet, models.ResNetV2, models.DenseNet, models.ResDenseNet])
def test_call_is_documented_and_train_defaults_to_inference(cls):
  parameters = inspect.signature(cls.__call__).parameters
  assert parameters["train"].default is False
  assert parameters["features"].default is None
  doc = inspect.getdoc(cls.__call__)
  assert "train" in doc and "features" in doc and "Returns" in doc


def test_the_default_call_is_inference():
  model = models.ResNet(**TINY_RESNET)
  x = _shapes((2, 32, 32, 3))
  variables = _init_shapes(model, (1, 32, 32, 3))
  program = lambda **kw: str(jax.make_jaxpr(lambda v, x: model.apply(v, x, **kw))(variables, x))  # noqa: E731
  # Without `train`: the program of train=False (moving statistics, as Keras's model(x)), not of train=True.
  assert program() == program(train=False)
  assert program() != str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x))


# ------------------------------------------------------------------------------------------------ pretrained


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
  """Small Keras ResNet v1 / DenseNet backbones with random weights, saved as legacy .h5 files."""
  folder = tmp_path_factory.mktemp("served")
  return {arch: kf.save_legacy(kf.build_small_keras(arch, seed=i + 3), folder / f"tiny_{arch}_notop.h5")
          for i, arch in enumerate(SMALL)}


@pytest.fixture
def served(keras_files, tmp_path, monkeypatch):
  """Registry entries for the small architectures, served on 127.0.0.1; an empty Keras cache; the cache_dir."""
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
  with kf.serve_folder(next(iter(keras_files.values())).parent) as base_url:
    for arch, path in keras_files.items():
      names = [layer.name for layer in models.BACKBONES[arch](**SMALL[arch]).keras_layers()]
      monkeypatch.setitem(weights.REGISTRY, path.name, weights.KerasWeightsFile(
          weights.describe_architecture(names), False, path.name, f"{base_url}/{path.name}", weights.md5sum(path)))
    yield tmp_path / "cache"


def _small_fused():
  """The fused model over the backbones of keras_files."""
  return models.ResDenseNet(backbones=("resnet50", "densenet121"), fusion_filters=8, pooling="gem",
                            backbone_kwargs=SMALL)


@pytest.fixture(scope="module")
def tiny_fused():
  """A tiny fused model (no Keras twin) and its variables from a full jit-compiled model.init(key, x)."""
  model = models.ResDenseNet(backbones=("resnet50", "densenet121"), fusion_filters=4, pooling="gem",
                             backbone_kwargs=TINY)
  key = jax.random.key(7, impl="rbg")  # its init compiles ~3x faster than threefry's on CPU
  return model, key, jax.jit(functools.partial(model.init, train=False))(key, jnp.zeros((1, 32, 32, 3)))


def test_backbone_pretrained_in_one_line(served, keras_files):
  model, variables = models.ResNet50.pretrained("imagenet", cache_dir=served, **SMALL["resnet50"], pooling="avg")
  assert type(model) is models.ResNet50 and model.pooling == "avg" and model.stage_sizes == (1, 1, 1, 1)
  # Downloaded into cache_dir through the registry (MD5-checked), loaded with every check of load_keras.
  assert (served / keras_files["resnet50"].name).read_bytes() == keras_files["resnet50"].read_bytes()
  trees.assert_trees_equal(variables, weights.load_keras(model, keras_files["resnet50"]))
  # On a model: the variables of that very model (its own fields, not the class defaults).
  on_instance = models.DenseNet121(**SMALL["densenet121"]).pretrained(keras_files["densenet121"])
  trees.assert_trees_equal(on_instance, weights.load_keras(models.DenseNet121(**SMALL["densenet121"]),
                                                           keras_files["densenet121"]))
  assert set(on_instance) == {"params", "batch_stats"}


def test_backbone_pretrained_none_and_refusals(tmp_path):
  model = models.ResNet(**TINY_RESNET)
  variables = model.pretrained("none", rng=3)
  # An int seed is the engine's key (train.initialized): jax.random.key(seed, impl="rbg").
  expected = train.initialized(jax.random.key(3, impl="rbg"), model, 32)
  trees.assert_trees_equal(variables, dict(expected))
  with pytest.raises(ValueError, match="is one backbone and takes one source"):
    model.pretrained({"resnet50": "imagenet"})
  with pytest.raises(weights.WeightsError, match=r"absent.h5: no such file \(weights for backbone 'ResNet'"):
    model.pretrained(tmp_path / "absent.h5")
  with pytest.raises(weights.WeightsError, match="ImageNet weights for ResNet: imagenet: no published Keras "
                                                 r"weights for a model that is a ResNet with stage sizes \(1, 1\)"):
    model.pretrained("imagenet", download=False)


def test_fused_pretrained_fills_each_backbone_from_its_keras_file(served, keras_files):
  model = _small_fused()
  variables = model.pretrained("imagenet", rng=7, cache_dir=served)
  trees.assert_same_structure(variables, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                                      dict(_init_shapes(model, (1, 32, 32, 3)))))
  for arch, path in keras_files.items():
    loaded = weights.load_keras(model.backbone_modules()[arch], path)
    trees.assert_trees_equal(variables["params"][arch], loaded["params"])
    trees.assert_trees_equal(variables["batch_stats"][arch], loaded["batch_stats"])


def _stub_backbone_files(monkeypatch, reference, files):
  """load_backbone reads nothing: each backbone named in `files` gets `reference`'s sub-trees scaled by 2."""
  def load_backbone(name, module, source, **kwargs):
    assert source == files[name]
    return {c: jax.tree.map(lambda a: 2 * a, reference[c][name]) for c in ("params", "batch_stats")}
  monkeypatch.setattr(pretrained_weights, "load_backbone", load_backbone)


def test_fused_pretrained_initialises_the_head_as_init_does(tiny_fused, monkeypatch):
  model, key, initial = tiny_fused
  files = {"resnet50": "/w/r.h5", "densenet121": "/w/d.h5"}
  _stub_backbone_files(monkeypatch, initial, files)
  variables = model.pretrained(files, rng=key)
  trees.assert_same_structure(variables, dict(initial))
  # The fusion convs, GeM's p and the head: exactly what model.init(key, x) gives them (without compiling the
  # backbones' init); the backbones: what the files hold.
  for name in ("resnet50_fusion_conv", "densenet121_fusion_conv", "gem_pool", "predictions"):
    trees.assert_trees_equal(variables["params"][name], initial["params"][name])
  for collection in ("params", "batch_stats"):
    trees.assert_trees_equal(variables[collection]["densenet121"],
                             jax.tree.map(lambda a: 2 * a, initial[collection]["densenet121"]))


def test_fused_pretrained_per_backbone_on_the_class(tiny_fused, monkeypatch):
  model, key, initial = tiny_fused
  _stub_backbone_files(monkeypatch, initial, {"resnet50": "/w/r.h5"})
  built, variables = models.ResDenseNet.pretrained({"resnet50": "/w/r.h5", "densenet121": "none"}, rng=key,
                                                   backbones=model.backbones, fusion_filters=4, pooling="gem",
                                                   backbone_kwargs=TINY)
  assert built == model
  trees.assert_same_structure(variables, dict(initial))
  # "none": the backbone keeps its initial weights, the same as model.init(key, x); so does the head.
  for collection in ("params", "batch_stats"):
    trees.assert_trees_equal(variables[collection]["densenet121"], initial[collection]["densenet121"])
    trees.assert_trees_equal(variables[collection]["resnet50"],
                             jax.tree.map(lambda a: 2 * a, initial[collection]["resnet50"]))
  trees.assert_trees_equal(variables["params"]["predictions"], initial["params"]["predictions"])
  with pytest.raises(ValueError, match=r"weights: key 'resnet101' is not one of the model's backbones"):
    model.pretrained({"resnet101": "imagenet", "densenet121": "none"})


def test_train_load_pretrained_runs_the_same_code(keras_files, monkeypatch):
  model = _small_fused()
  calls = []
  shared = pretrained_weights.load_backbones

  def spy(*args, **kwargs):
    calls.append(kwargs.get("field"))
    return shared(*args, **kwargs)

  monkeypatch.setattr(pretrained_weights, "load_backbones", spy)
  config = demo_configs.tiny_config()
  config.model.backbone_kwargs = SMALL
  config.model.pretrained = {arch: str(path) for arch, path in keras_files.items()}
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(_init_shapes(model, (1, 32, 32, 3))))
  from_engine = train.load_pretrained(model, zeros, config.model)
  from_model = model.pretrained(dict(config.model.pretrained), rng=0)
  assert calls == [None, "weights"]  # the engine's (config field by default), then the model's
  for collection in ("params", "batch_stats"):
    for arch in keras_files:
      trees.assert_trees_equal(from_engine[collection][arch], from_model[collection][arch])


def test_load_keras_on_the_fused_model_names_pretrained():
  for source in ("imagenet", "/w/file.h5"):
    with pytest.raises(weights.WeightsError, match=r"load_keras fills one Keras backbone, but ResDenseNet holds "
                                                   r"the backbones \['resnet50', 'densenet121'\].*"
                                                   r"model\.pretrained\("):
      weights.load_keras(_small_fused(), source)


# -------------------------------------------------------------------------------------------- input errors

# (shape, dtype, message) for both a backbone and the fused model.
BAD_INPUTS = [
    ((40, 40, 3), jnp.float32, r"expected NHWC images .* got shape \(40, 40, 3\); add a batch axis: x\[None\]"),
    ((2, 3, 40, 40), jnp.float32, r"looks channels-first \(N, C, H, W\).*x.transpose\(0, 2, 3, 1\)"),
    ((2, 40, 40, 1), jnp.float32, r"got 1 channel .*repeat the grey channel, jnp.repeat\(x, 3, axis=-1\)"),
    ((2, 40, 40, 4), jnp.float32, r"expected 3 \(RGB\) channels in the last axis, got 4"),
    ((2, 40, 40, 3), jnp.bool_, r"got dtype bool; expected floating point or uint8 images"),
    ((2, 40, 40, 3), jnp.int32, r"got dtype int32; expected floating point or uint8 images"),
    ((2, 31, 40, 3), jnp.float32, r"input 31x40 is smaller than 32x32, the smallest Keras accepts"),
]


def _tiny_fused(**kwargs):
  return models.ResDenseNet(backbones=("resnet50", "densenet121"), fusion_filters=4, backbone_kwargs=TINY, **kwargs)


@pytest.mark.parametrize("shape,dtype,message", BAD_INPUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("which", ["backbone", "fused"])
def test_bad_inputs_say_what_is_wrong(which, shape, dtype, message):
  model, where = (models.ResNet50(**TINY["resnet50"]), "ResNet50") if which == "backbone" else (_tiny_fused(),
                                                                                                "ResDenseNet")
  with pytest.raises(ValueError, match=f"^{where}: .*{message}"):
    _init_shapes(model, shape, dtype)


def test_accepted_inputs_and_the_empty_batch():
  backbone, fused = models.DenseNet121(**TINY["densenet121"]), _tiny_fused()
  for model in (backbone, fused):
    for dtype in (jnp.uint8, jnp.float32, jnp.bfloat16):
      _init_shapes(model, (2, 32, 32, 3), dtype)
    variables = _init_shapes(model, (1, 32, 32, 3))
    empty = _shapes((0, 32, 32, 3))
    # An empty batch is fine for inference; with train=True BatchNorm's statistics of it would be NaN.
    assert _apply_shapes(model, variables, empty, train=False).shape[0] == 0
    with pytest.raises(ValueError, match=r"an empty batch \(shape \(0, 32, 32, 3\)\) with train=True: "
                                         r"BatchNorm's batch statistics of 0 images are NaN"):
      _apply_shapes(model, variables, empty, train=True, mutable=["batch_stats"])
  # With every backbone BatchNorm in inference mode, an empty training batch has no statistics to spoil.
  frozen = _tiny_fused(backbone_bn_inference=True)
  assert _apply_shapes(frozen, _init_shapes(frozen, (1, 32, 32, 3)), empty, train=True).shape == (0, 1)


def _apply_shapes(model, variables, x, **kwargs):
  """model.apply traced abstractly (dropout key given); the output, without any updated collections."""
  out = jax.eval_shape(lambda v, x: model.apply(v, x, rngs={"dropout": jax.random.PRNGKey(0)}, **kwargs),
                       variables, x)
  return out[0] if "mutable" in kwargs else out


# The families and small variants whose analytic feature_size is checked against a trace.
SIZE_MODELS = {
    "resnet": models.ResNet(**TINY["resnet50"]),
    "resnet_2_stages": models.ResNet(**TINY_RESNET),
    "resnet_v2": models.ResNetV2(stage_sizes=(2, 2, 2), filters=(4, 8, 8), stem_filters=8),
    "densenet": models.DenseNet(**TINY["densenet121"]),
    "densenet_2_blocks": models.DenseNet(blocks=(1, 1), growth_rate=4, stem_filters=8),
}


@pytest.mark.parametrize("name", list(SIZE_MODELS))
def test_feature_size_is_the_traced_size(name):
  model = SIZE_MODELS[name]
  variables = _init_shapes(model, (1, 32, 32, 3))
  for h, w in ((32, 33), (47, 61), (64, 65), (95, 97)):
    out = _apply_shapes(model, variables, _shapes((1, h, w, 3)))
    assert out.shape[1:3] == (model.feature_size(h), model.feature_size(w)), (h, w)


def test_fused_sizes_that_differ_name_the_nearest_that_work():
  model = _tiny_fused()  # 4 stages each: the strides, hence the sizes, of ResNet101 + DenseNet121
  with pytest.raises(ValueError, match=r"^ResDenseNet: the backbones' feature maps differ for a 33x47 input "
                                       r"\(resnet50 2x2, densenet121 1x1\) and must be equal to be added; nearest "
                                       r"sizes that work: height 33: 32 or 61; width 47: 32 or 61 \(e.g. 32x61\)"):
    _init_shapes(model, (1, 33, 47, 3))
  _init_shapes(model, (1, 32, 61, 3))  # the size suggested works
  default = models.ResDenseNet()
  fns = {name: module.feature_size for name, module in default.backbone_modules().items()}
  assert checks.agreeing_sizes(fns, 33) == (32, 61) and checks.agreeing_sizes(fns, 100) == (96, 125)
  assert default.min_input_size == model.min_input_size == 32
  # One-stage backbones: a ResNet stage does not stride, a DenseNet transition does not exist; any size fuses.
  one_stage = models.ResDenseNet(backbones=("resnet50", "densenet121"), backbone_kwargs={
      "resnet50": dict(stage_sizes=(1,), filters=(4,)), "densenet121": dict(blocks=(1,))})
  assert checks.agreeing_sizes({n: m.feature_size for n, m in one_stage.backbone_modules().items()}, 33) == (33, 33)


# ----------------------------------------------------------------------------------- constructor arguments


def test_misspelt_backbone_is_a_value_error_with_the_close_match():
  with pytest.raises(ValueError, match=r"^ResDenseNet: unknown backbone 'densnet121' \(did you mean "
                                       r"'densenet121'\?\); choose from \('densenet121', 'densenet169'"):
    models.ResDenseNet(backbones=("resnet101", "densnet121"))
  with pytest.raises(ValueError, match=r"backbones must be one or more distinct names"):
    models.ResDenseNet(backbones=("resnet50", "resnet50"))
  with pytest.raises(ValueError, match=r"unknown backbone \(not one of backbones\) 'resnet50'.*; choose from "
                                       r"\('resnet101', 'densenet121'\)"):
    models.ResDenseNet().backbone_config("resnet50")


def test_backbone_kwargs_must_fit_the_backbones():
  with pytest.raises(ValueError, match=r"backbone_kwargs has an entry for 'densenet121', which is not one of "
                                       r"backbones \('resnet50',\): it would be ignored"):
    models.ResDenseNet(backbones=("resnet50",), backbone_kwargs=TINY)
  with pytest.raises(ValueError, match=r"backbone_kwargs\['resnet50'\]: unknown field of ResNet50 'stage_size' "
                                       r"\(did you mean 'stage_sizes'\?\)"):
    models.ResDenseNet(backbones=("resnet50",), backbone_kwargs={"resnet50": {"stage_size": (1,)}})
  with pytest.raises(ValueError, match=r"backbone_kwargs\['resnet50'\]\['pooling'\]: set by the fused model"):
    models.ResDenseNet(backbones=("resnet50",), backbone_kwargs={"resnet50": {"pooling": "avg"}})
  # A config may carry overrides for other backbones (a config file's, then --config.model.backbones=...):
  # create_model passes on only those of the configured backbones.
  config = demo_configs.tiny_config()
  config.model.backbones = ("resnet50",)
  assert build.create_model(config.model).backbone_kwargs == {"resnet50": dict(demo_configs.TINY_BACKBONES[
      "resnet50"])}


def test_pretrained_is_a_constructor_on_the_class_and_a_method_on_a_model():
  assert isinstance(vars(models.ResDenseNet)["pretrained"], loading.class_or_instance_method)
  assert models.ResNet50.pretrained.__qualname__ == "ResNet50.pretrained"
  assert "(model, variables)" in models.ResNet50.pretrained.__doc__
  assert "weights:" in models.ResDenseNet.pretrained.__doc__
  model = models.ResNet(**TINY_RESNET)
  assert model.pretrained.args == (model,)  # bound to that model: its own fields, not the class defaults
