"""README's API example runs as written: the published file is fetched (from a local server standing in for
Keras's), verified, loaded, and the features equal Keras's own."""

import dataclasses
import pathlib
import re

import numpy as np

from resdense_jax import weights
from resdense_jax.weights import registry
import keras_fixtures

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
