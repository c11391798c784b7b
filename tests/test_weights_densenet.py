"""DenseNet121 Keras weights into the Flax DenseNet: parity with Keras 3, tf.keras's nested names, wrong files.

The tf_keras layout rewrites Keras 3's legacy file the way the published DenseNet files are: `conv1/conv`,
`conv1/bn`, `conv1/relu` (nested HDF5 groups), `:0` variable suffixes and the top named `fc1000`.
"""

from __future__ import annotations

import h5py
import jax
import numpy as np
import pytest

import keras_fixtures as kf
import trees
from resdense_jax import models, weights

TOLERANCE = 1e-4
SQUARE, ODD = (64, 64), (65, 47)

# Each case builds and runs a full DenseNet121 in Keras (15-45 s here): one stays in the suite (the loader's
# layouts, tops and poolings are covered there by the ResNet cases, the same loader); the rest is `long`.
LONG = pytest.mark.long
PARITY = [
    ("densenet121", False, None, SQUARE, "legacy"),
    pytest.param("densenet121", False, None, SQUARE, "tf_keras", marks=LONG),
    pytest.param("densenet121", False, "avg", SQUARE, "keras3", marks=LONG),
    pytest.param("densenet121", False, "max", ODD, "legacy", marks=LONG),
    pytest.param("densenet121", True, None, ODD, "tf_keras", marks=LONG),
    pytest.param("densenet121", True, None, ODD, "keras3", marks=LONG),
]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  return kf.KerasReference(tmp_path_factory.mktemp("keras_densenet"))


def flax_model(arch, include_top=False, pooling=None, **kwargs):
  return models.BACKBONES[arch](include_top=include_top, pooling=pooling, **kwargs)


@pytest.mark.parametrize("arch,include_top,pooling,hw,layout", PARITY, ids=kf.case_id)
def test_parity_with_keras(ref, arch, include_top, pooling, hw, layout):
  expected = ref.output(arch, include_top, pooling, hw)
  model = flax_model(arch, include_top, pooling)
  variables = weights.load_keras(model, ref.files(arch, include_top, hw)[layout])
  actual = np.asarray(kf.jitted_apply(model)(variables, ref.images(hw)))
  assert actual.shape == expected.shape
  assert np.std(expected) > (1e-4 if include_top else 1e-2)  # not a vanishing output
  assert kf.relative_max_diff(actual, expected) <= TOLERANCE


def test_tf_keras_file_has_the_published_names(ref):
  # The fixture must really exercise the nested names the loader maps.
  with h5py.File(ref.files("densenet121", True, ODD)["tf_keras"], "r") as f:
    names = [n.decode() for n in f.attrs["layer_names"]]
    assert "conv1/conv" in names and "fc1000" in names and "conv1_conv" not in names
    assert isinstance(f["conv1"]["conv"], h5py.Group)
    assert [n.decode() for n in f["conv1/bn"].attrs["weight_names"]][0] == "conv1/bn/gamma:0"


@pytest.mark.parametrize("include_top", [False, True])
def test_keras_layers_and_parameter_count(ref, include_top):
  keras_model = ref.model("densenet121", include_top, None, ODD)
  model = flax_model("densenet121", include_top)
  assert [layer.name for layer in model.keras_layers()] == [layer.name for layer in keras_model.layers]
  files = ref.files("densenet121", include_top, ODD)
  expected = kf.keras_variables(keras_model, model)
  assert sum(leaf.size for leaf in jax.tree.leaves(expected)) == keras_model.count_params()
  # Every layout yields the Keras model's very weights, each in its place, nothing left out.
  for layout in kf.KerasReference.LAYOUTS:
    trees.assert_trees_equal(weights.load_keras(model, files[layout]), expected)


@pytest.mark.parametrize("layout", ["legacy", "keras3", "tf_keras"])
def test_densenet_file_into_resnet(ref, layout):
  path = ref.files("densenet121")[layout]
  with pytest.raises(weights.WeightsError, match="wrong architecture: the file holds densenet121 weights, the "
                                                 "model is resnet50") as e:
    weights.load_keras(flax_model("resnet50"), path)
  assert str(path) in str(e.value)


def test_densenet121_file_into_densenet169(ref):
  path = ref.files("densenet121")["legacy"]
  with pytest.raises(weights.WeightsError, match="holds densenet121 weights, the model is densenet169"):
    weights.load_keras(flax_model("densenet169"), path)


def test_top_mismatch(ref):
  path = ref.files("densenet121", True, ODD)["tf_keras"]
  with pytest.raises(weights.WeightsError, match="top mismatch.*include_top=False") as e:
    weights.load_keras(flax_model("densenet121", pooling="avg"), path)
  assert str(path) in str(e.value)


def test_keras3_file_without_layer_names(ref, tmp_path):
  # Keras 3 releases before the `name` attribute: matching by order still works, the architecture is told from
  # the number of Conv2D layers.
  path = tmp_path / "unnamed.weights.h5"
  path.write_bytes(ref.files("densenet121")["keras3"].read_bytes())
  with h5py.File(path, "r+") as f:
    for group in f["layers"].values():
      if "vars" in group and "name" in group["vars"].attrs:
        del group["vars"].attrs["name"]
  model = flax_model("densenet121")
  trees.assert_trees_equal(weights.load_keras(model, path), kf.keras_variables(ref.model("densenet121"), model))
  with pytest.raises(weights.WeightsError, match="holds densenet121 weights, the model is resnet50"):
    weights.load_keras(flax_model("resnet50"), path)
