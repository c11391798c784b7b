"""config.model.pretrained="imagenet" through the engine (train.load_pretrained): Keras-written weight files,
served on 127.0.0.1 under registry entries, downloaded and MD5-verified by train_and_evaluate, end up in each
backbone's sub-tree of the trained checkpoint exactly as weights.load_keras reads them."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import demo_configs  # noqa: E402
import jax  # noqa: E402
import keras  # noqa: E402
import keras_fixtures as kf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import trees  # noqa: E402
from keras.src.applications import densenet as keras_densenet  # noqa: E402
from keras.src.applications import resnet as keras_resnet  # noqa: E402

from resdense_jax import checkpoints, train, weights  # noqa: E402

# Keras's stems are 64 wide and DenseNet's growth rate is 32; the depth and the ResNet widths are what we shrink.
RESNET_FILTERS = (4, 8, 8, 8)
BACKBONE_KWARGS = {"resnet50": dict(stage_sizes=(1, 1, 1, 1), filters=RESNET_FILTERS),
                   "densenet121": dict(blocks=(1, 1, 1, 1))}


def _keras_backbones() -> dict[str, keras.Model]:
  """Keras's own ResNet v1 and DenseNet builders at the depth above, with random (non-zero) weights."""
  def stack_fn(x):
    x = keras_resnet.stack_residual_blocks_v1(x, RESNET_FILTERS[0], 1, stride1=1, name="conv2")
    for stage, filters in enumerate(RESNET_FILTERS[1:], start=3):
      x = keras_resnet.stack_residual_blocks_v1(x, filters, 1, name=f"conv{stage}")
    return x

  built = {}
  for name, build in (
      ("resnet50", lambda: keras_resnet.ResNet(stack_fn, preact=False, use_bias=True, include_top=False,
                                               weights=None, input_shape=(None, None, 3))),
      ("densenet121", lambda: keras_densenet.DenseNet(blocks=[1, 1, 1, 1], include_top=False, weights=None,
                                                      input_shape=(None, None, 3)))):
    keras.backend.clear_session()  # Keras's automatic names (DenseNet's zero_padding2d) restart at 0
    with kf._zero_initializers():  # pylint: disable=protected-access
      built[name] = build()
    kf.randomize_weights(built[name], seed=len(built) + 1)
  return built


@pytest.mark.slow
def test_imagenet_weights_are_downloaded_verified_and_loaded_into_each_backbone(tmp_path, monkeypatch):
  config = demo_configs.tiny_config()
  config.model.backbone_kwargs = BACKBONE_KWARGS
  config.model.pretrained = "imagenet"
  config.model.weights_dir = str(tmp_path / "weights")  # empty: the engine has to download
  config.data.root = str(demo_configs.tiny_collection(tmp_path / "ct"))
  # One phase with both backbones frozen (weights and BatchNorm statistics), so after training their
  # sub-trees must still be exactly what was loaded.
  config.phases = [demo_configs.common.phase("head", 1, ("backbones",), learning_rate=1e-3)]
  model = train.create_model(config.model)

  served = tmp_path / "served"
  served.mkdir()
  files = {name: kf.save_legacy(m, served / f"tiny_{name}_notop.h5") for name, m in _keras_backbones().items()}
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))  # never the user's cache
  with kf.serve_folder(served) as base_url:
    for name, backbone in model.backbone_modules().items():
      # The tiny architectures' own registry entries: the same look-up ("imagenet" -> architecture -> file),
      # download and MD5 check as the published files go through.
      arch = weights.describe_architecture([layer.name for layer in backbone.keras_layers()])
      file_name = files[name].name
      monkeypatch.setitem(weights.REGISTRY, file_name, weights.KerasWeightsFile(
          arch, False, file_name, f"{base_url}/{file_name}", weights.md5sum(files[name])))
    result = train.train_and_evaluate(config, tmp_path / "run")

  downloaded = tmp_path / "weights"
  assert sorted(p.name for p in downloaded.iterdir()) == sorted(f.name for f in files.values())
  for name, path in files.items():
    assert (downloaded / path.name).read_bytes() == path.read_bytes()

  _, variables, _ = checkpoints.load_for_inference(tmp_path / "run" / "checkpoints" / str(result["step"]))
  for name, backbone in model.backbone_modules().items():
    expected = weights.load_keras(backbone, files[name])
    trees.assert_trees_equal(variables["params"][name], expected["params"])
    trees.assert_trees_equal(variables["batch_stats"][name], expected["batch_stats"])
  # The head did train on top of them: it left the initial weights the run started from (same seed).
  initial = train.initialized(jax.random.key(config.seed, impl="rbg"), model, config.data.image_size)
  assert result["step"] == 3
  assert not np.allclose(variables["params"]["predictions"]["kernel"], initial["params"]["predictions"]["kernel"])


def test_unknown_pretrained_value_is_refused(tmp_path):
  config = demo_configs.tiny_config()
  config.model.pretrained = "imagenett"
  model = train.create_model(config.model)
  with pytest.raises(ValueError, match="config.model.pretrained must be 'imagenet' or 'none'"):
    train.load_pretrained(model, {"params": {}, "batch_stats": {}}, config.model)
