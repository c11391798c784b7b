"""README's API example runs as written: the published file is fetched (from a local server standing in for
Keras's), verified, loaded, and the features equal Keras's own."""

import dataclasses
import functools
import pathlib
import re

import numpy as np

import keras_fixtures
import trees
from resdense_jax import models, weights
from resdense_jax.weights import registry

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FILE_NAME = "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5"


def _api_example() -> str:
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  example = [b for b in blocks if "weights.load_keras" in b]
  assert example, f"{README}: no python example calling weights.load_keras"
  return example[0]


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch):
  reference = keras_fixtures.build_keras("resnet101", pooling="avg")
  served = tmp_path / "served"
  served.mkdir()
  keras_fixtures.save_legacy(reference, served / FILE_NAME)
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))  # empty cache: the example must download
  images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
  with keras_fixtures.serve_folder(served) as url:
    entry = registry.REGISTRY[FILE_NAME]
    monkeypatch.setitem(registry.REGISTRY, FILE_NAME, dataclasses.replace(
        entry, url=f"{url}/{FILE_NAME}", md5=weights.md5sum(served / FILE_NAME)))
    namespace = {"images": images}
    exec(compile(_api_example(), str(README), "exec"), namespace)  # pylint: disable=exec-used
  assert (tmp_path / "keras_home" / "models" / FILE_NAME).is_file()
  from keras.applications import resnet as keras_resnet
  expected = np.asarray(reference(keras_resnet.preprocess_input(images.copy()), training=False))
  features = np.asarray(namespace["features"])
  assert features.shape == (2, 2048)
  assert np.abs(features - expected).max() <= 1e-4 * np.abs(expected).max()


# ---- "Use it from Python": the own-loop example, on small models of the same classes, served locally.

SMALL_RESNET = dict(stage_sizes=(1, 1, 1, 1), filters=keras_fixtures.SMALL_RESNET_FILTERS)
SMALL_DENSENET = dict(blocks=(1, 1, 1, 1))


def _own_loop_example() -> str:
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  example = [b for b in blocks if "optim.freeze" in b and "train_step" in b]
  assert example, f"{README}: no python example of an own optax loop with optim.freeze"
  return example[0]


def test_readme_own_loop_example_runs_as_written(tmp_path, monkeypatch):
  """The block runs unchanged; only the classes it names are swapped for one-block-per-stage variants (the same
  code, smaller stage sizes) and the published files for Keras-written files of those variants."""
  keras_resnet = keras_fixtures.build_small_keras("resnet50", seed=1)
  keras_densenet = keras_fixtures.build_small_keras("densenet121", seed=2)
  served = tmp_path / "served"
  served.mkdir()
  files = {"resnet": keras_fixtures.save_legacy(keras_resnet, served / "small_resnet_notop.h5"),
           "densenet": keras_fixtures.save_legacy(keras_densenet, served / "small_densenet_notop.h5")}
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))

  class ResNet101(models.ResNet101):  # the README's class, at one block per stage
    stage_sizes: tuple = SMALL_RESNET["stage_sizes"]
    filters: tuple = SMALL_RESNET["filters"]

  monkeypatch.setattr(models, "ResNet101", ResNet101)
  monkeypatch.setattr(models, "ResDenseNet", functools.partial(
      models.ResDenseNet, fusion_filters=8,
      backbone_kwargs={"resnet101": SMALL_RESNET, "densenet121": SMALL_DENSENET}))
  small = {"resnet": ResNet101(), "densenet": models.DenseNet121(**SMALL_DENSENET)}
  with keras_fixtures.serve_folder(served) as url:
    # The small architectures' own registry entries: "imagenet" -> architecture -> file, downloaded and
    # MD5-checked as the published files are.
    for family, path in files.items():
      arch = weights.describe_architecture([layer.name for layer in small[family].keras_layers()])
      monkeypatch.setitem(registry.REGISTRY, path.name, weights.KerasWeightsFile(
          arch, False, path.name, f"{url}/{path.name}", weights.md5sum(path)))
    namespace = {}
    exec(compile(_own_loop_example(), str(README), "exec"), namespace)  # pylint: disable=exec-used

  from keras.applications import resnet as keras_resnet_app
  images = namespace["images"]
  expected = np.asarray(keras_resnet(keras_resnet_app.preprocess_input(images.copy()), training=False))
  assert keras_fixtures.relative_max_diff(namespace["pooled"], expected.mean(axis=(1, 2))) <= 1e-4
  # Keras's own block outputs, at the strides Keras has them (conv2 at 1/4, conv4 at 1/16 of 224).
  assert {name: np.shape(v) for name, v in namespace["maps"].items()} == {
      "conv2_block1_out": (8, 56, 56, 4 * SMALL_RESNET["filters"][0]),
      "conv4_block1_out": (8, 14, 14, 4 * SMALL_RESNET["filters"][2])}
  assert np.isfinite(float(namespace["loss"]))
  # Phase 1 as the example sets it up: the backbones are still their Keras weights, bitwise, batch statistics
  # included; the fusion convs and the head moved.
  params, batch_stats = namespace["params"], namespace["batch_stats"]
  assert sorted(p.name for p in (tmp_path / "keras_home" / "models").iterdir()) == sorted(
      p.name for p in files.values())
  loaded = {"resnet101": weights.load_keras(small["resnet"], files["resnet"]),
            "densenet121": weights.load_keras(small["densenet"], files["densenet"])}
  for name, variables in loaded.items():
    trees.assert_trees_equal({"params": params[name], "batch_stats": batch_stats[name]}, variables)
  start = namespace["variables"]["params"]
  assert not np.array_equal(params["predictions"]["kernel"], start["predictions"]["kernel"])
  assert not np.array_equal(params["resnet101_fusion_conv"]["kernel"], start["resnet101_fusion_conv"]["kernel"])
