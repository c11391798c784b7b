"""ResNet50/101 Keras weights into the Flax ResNets: parity with Keras 3 itself, and the loader's errors.

Keras models get random weights and BatchNorm statistics (keras_fixtures), are saved in the legacy Keras-2
layout, Keras 3's `.weights.h5` layout and a tf.keras-style rewrite of the legacy file, loaded into the Flax model
and compared on random inputs: square and odd non-square, every pooling, with and without the top.
"""

from __future__ import annotations

import dataclasses
import shutil

import h5py
import jax
import numpy as np
import pytest

import keras_fixtures as kf
import trees
from resdense_jax import models, weights
from resdense_jax.weights import __main__ as cli

TOLERANCE = 1e-4
SQUARE, ODD = (64, 64), (65, 47)

# (arch, include_top, pooling, input height/width, layout): every pooling, top and no top, both input kinds and
# every layout for each model, without the full product.
PARITY = [
    ("resnet50", False, None, SQUARE, "legacy"),
    ("resnet50", False, None, ODD, "keras3"),
    ("resnet50", False, "avg", ODD, "legacy"),
    ("resnet50", False, "max", SQUARE, "keras3"),
    ("resnet50", True, None, ODD, "tf_keras"),
    ("resnet50", True, None, ODD, "keras3"),
    ("resnet101", False, None, ODD, "keras3"),
    pytest.param("resnet101", False, "max", ODD, "tf_keras", marks=pytest.mark.long),
    pytest.param("resnet101", False, "avg", ODD, "legacy", marks=pytest.mark.long),
    ("resnet101", True, None, ODD, "legacy"),
]
CASES = [c.values if hasattr(c, "values") else c for c in PARITY]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  return kf.KerasReference(tmp_path_factory.mktemp("keras_resnet"))


def flax_model(arch, include_top=False, pooling=None, **kwargs):
  return models.BACKBONES[arch](include_top=include_top, pooling=pooling, **kwargs)


def test_parity_cover_every_combination():
  assert {c[2] for c in CASES} == {None, "avg", "max"} and {c[1] for c in CASES} == {True, False}
  for arch in ("resnet50", "resnet101"):
    assert {c[4] for c in CASES if c[0] == arch} == set(kf.KerasReference.LAYOUTS)
  # What stays in the 10-minute suite still covers every pooling, top and layout (for resnet50).
  fast = [c for c in PARITY if not hasattr(c, "values")]
  assert {c[2] for c in fast} == {None, "avg", "max"} and {c[4] for c in fast} == set(kf.KerasReference.LAYOUTS)


@pytest.mark.parametrize("arch,include_top,pooling,hw,layout", PARITY, ids=kf.case_id)
def test_parity_with_keras(ref, arch, include_top, pooling, hw, layout):
  expected = ref.output(arch, include_top, pooling, hw)
  model = flax_model(arch, include_top, pooling)
  variables = weights.load_keras(model, ref.files(arch, include_top, hw)[layout])
  actual = np.asarray(model.apply(variables, ref.images(hw), train=False))
  assert actual.shape == expected.shape
  # The random weights keep activations O(1): a vanishing or saturated output would make the check trivial.
  assert np.std(expected) > (1e-4 if include_top else 1e-2)
  if include_top:
    assert expected.max() < 0.9  # nor a saturated softmax
  assert kf.relative_max_diff(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("arch,include_top", [("resnet50", False), ("resnet101", True)])
def test_keras_layers_parameter_count_and_layouts(ref, arch, include_top):
  keras_model = ref.model(arch, include_top, None, ODD)
  model = flax_model(arch, include_top)
  assert [layer.name for layer in model.keras_layers()] == [layer.name for layer in keras_model.layers]
  files = ref.files(arch, include_top, ODD)
  expected = kf.keras_variables(keras_model, model)
  assert sum(leaf.size for leaf in jax.tree.leaves(expected)) == keras_model.count_params()
  # Every layout yields the Keras model's very weights, each in its place, nothing left out.
  for layout in kf.KerasReference.LAYOUTS:
    trees.assert_trees_equal(weights.load_keras(model, files[layout]), expected)


# ---- errors: each names the file and the problem ----

def _edit_copy(src, dst, edit):
  shutil.copy(src, dst)
  with h5py.File(dst, "r+") as f:
    edit(f)
  return dst


def _set_layer_names(f, names):
  f.attrs["layer_names"] = np.array([n.encode() for n in names], dtype="S")


def _decoded(names):
  return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _layer_names(f):
  return _decoded(f.attrs["layer_names"])


def test_missing_layer(ref, tmp_path):
  def drop(f):
    del f["conv3_block2_2_conv"]
    _set_layer_names(f, [n for n in _layer_names(f) if n != "conv3_block2_2_conv"])
  path = _edit_copy(ref.files("resnet50")["legacy"], tmp_path / "missing.h5", drop)
  with pytest.raises(weights.WeightsError, match="missing layer.*conv3_block2_2_conv") as e:
    weights.load_keras(flax_model("resnet50"), path)
  assert str(path) in str(e.value)


def test_missing_layer_keras3_layout(ref, tmp_path):
  def drop(f):
    del f["layers/batch_normalization_7"]
  path = tmp_path / "missing.weights.h5"
  _edit_copy(ref.files("resnet50")["keras3"], path, drop)
  with pytest.raises(weights.WeightsError, match=r"missing layer.*layers/batch_normalization_7") as e:
    weights.load_keras(flax_model("resnet50"), path)
  assert str(path) in str(e.value)


def test_extra_layer(ref, tmp_path):
  def add(f):
    group = f.create_group("extra_conv")
    group.create_dataset("extra_conv/kernel", data=np.zeros((1, 1, 3, 4), np.float32))
    group.attrs["weight_names"] = np.array([b"extra_conv/kernel"], dtype="S")
    _set_layer_names(f, _layer_names(f) + ["extra_conv"])
  path = _edit_copy(ref.files("resnet50")["legacy"], tmp_path / "extra.h5", add)
  with pytest.raises(weights.WeightsError, match="extra layer.*extra_conv") as e:
    weights.load_keras(flax_model("resnet50"), path)
  assert str(path) in str(e.value)


def test_shape_mismatch(ref):
  path = ref.files("resnet50", True, ODD)["legacy"]
  with pytest.raises(weights.WeightsError,
                     match=r"shape mismatch in layer 'predictions', weight 'kernel': the model expects "
                           r"\(2048, 10\), the file has \(2048, 1000\)") as e:
    weights.load_keras(flax_model("resnet50", True, num_classes=10), path)
  assert str(path) in str(e.value)


def test_shape_mismatch_inside_backbone(ref, tmp_path):
  def shrink(f):
    name = "conv4_block3_2_conv/conv4_block3_2_conv/bias"
    del f[name]
    f.create_dataset(name, data=np.zeros((7,), np.float32))
  path = _edit_copy(ref.files("resnet50")["legacy"], tmp_path / "shape.h5", shrink)
  with pytest.raises(weights.WeightsError, match=r"shape mismatch in layer 'conv4_block3_2_conv', weight 'bias': "
                                                 r"the model expects \(256,\), the file has \(7,\)"):
    weights.load_keras(flax_model("resnet50"), path)


def test_swapped_variables_are_caught(ref, tmp_path):
  # gamma and beta have equal shapes: only the stored names reveal the swap.
  def swap(f):
    f["conv1_bn"].attrs["weight_names"] = np.array(
        [b"conv1_bn/beta", b"conv1_bn/gamma", b"conv1_bn/moving_mean", b"conv1_bn/moving_variance"], dtype="S")
  path = _edit_copy(ref.files("resnet50")["legacy"], tmp_path / "swapped.h5", swap)
  with pytest.raises(weights.WeightsError, match="conv1_bn.*'beta' where Keras order has 'gamma'"):
    weights.load_keras(flax_model("resnet50"), path)


@pytest.mark.parametrize("file_top", [True, False])
def test_top_mismatch(ref, file_top):
  path = ref.files("resnet50", file_top, ODD)["legacy"]
  with pytest.raises(weights.WeightsError, match=f"top mismatch.*include_top={not file_top}") as e:
    weights.load_keras(flax_model("resnet50", include_top=not file_top), path)
  assert str(path) in str(e.value)


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_wrong_depth(ref, layout):
  path = ref.files("resnet101")[layout]
  with pytest.raises(weights.WeightsError, match="wrong architecture: the file holds resnet101 weights, the model "
                                                 "is resnet50") as e:
    weights.load_keras(flax_model("resnet50"), path)
  assert str(path) in str(e.value)


def test_keras3_layer_order_is_checked(ref, tmp_path):
  def rename(f):
    f["layers/conv2d_3/vars"].attrs["name"] = "somewhere_else"
  path = tmp_path / "order.weights.h5"
  _edit_copy(ref.files("resnet50")["keras3"], path, rename)
  with pytest.raises(weights.WeightsError, match="layers/conv2d_3 is layer 'somewhere_else' in the file"):
    weights.load_keras(flax_model("resnet50"), path)


def test_legacy_names_unknown_to_the_model_load_by_order(ref, tmp_path):
  # An older naming scheme (no name in common with the model): Keras loads by layer order, so does the loader.
  source = ref.files("resnet50")["legacy"]
  path = tmp_path / "renamed.h5"
  with h5py.File(source, "r") as fin, h5py.File(path, "w") as fout:
    names = [f"layer{i:03d}" for i in range(len(_layer_names(fin)))]
    for old, new in zip(_layer_names(fin), names):
      group = fout.create_group(new)
      stored = _decoded(fin[old].attrs["weight_names"])
      renamed = [f"{new}/{w.rsplit('/', 1)[-1]}:0" for w in stored]
      for w, r in zip(stored, renamed):
        group.create_dataset(r, data=fin[old][w][()])
      group.attrs["weight_names"] = np.array([r.encode() for r in renamed], dtype="S")
    _set_layer_names(fout, names)
  model = flax_model("resnet50")
  trees.assert_trees_equal(weights.load_keras(model, path), kf.keras_variables(ref.model("resnet50"), model))


# ---- by name through the registry, downloaded from a local server; the converter ----

def test_load_by_published_name_downloads(ref, tmp_path, monkeypatch):
  served = tmp_path / "served"
  served.mkdir()
  name = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
  shutil.copy(ref.files("resnet50")["legacy"], served / name)
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
  model = flax_model("resnet50", pooling="avg")
  with kf.serve_folder(served) as base_url:
    entry = dataclasses.replace(weights.REGISTRY[name], url=f"{base_url}/{name}", md5=weights.md5sum(served / name))
    monkeypatch.setitem(weights.REGISTRY, name, entry)
    variables = weights.load_keras(model, name)  # "imagenet" picks the same file for this model
  assert (tmp_path / "keras_home" / "models" / name).is_file()
  again = weights.load_keras(model, "imagenet", download=False)  # now from the cache, no server
  expected = kf.keras_variables(ref.model("resnet50"), model)
  trees.assert_trees_equal(variables, expected)
  trees.assert_trees_equal(again, expected)


def test_convert_cli_and_restore(ref, tmp_path, capsys):
  out = tmp_path / "converted"
  source = ref.files("resnet50", True, ODD)["keras3"]
  assert cli.main(["convert", f"--keras={source}", "--arch=resnet50", "--include_top", f"--out={out}"]) == 0
  assert "wrote" in capsys.readouterr().out
  model = flax_model("resnet50", True)
  expected = kf.keras_variables(ref.model("resnet50", True, None, ODD), model)
  for restored in (weights.load_converted(out, model), weights.load_converted(out)):
    trees.assert_trees_equal(restored, expected)
  metadata = weights.read_metadata(out)
  assert metadata["arch"] == "resnet50" and metadata["include_top"] is True
  assert metadata["source_md5"] == weights.md5sum(source)
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
  # An existing folder is not overwritten silently; a wrong model is refused on restore.
  assert cli.main(["convert", f"--keras={source}", "--arch=resnet50", "--include_top", f"--out={out}"]) == 1
  assert "already exists" in capsys.readouterr().err
  with pytest.raises(weights.WeightsError, match="do not fit the model"):
    weights.load_converted(out, flax_model("resnet50", True, num_classes=10))


def test_convert_cli_reports_wrong_file(ref, tmp_path, capsys):
  source = ref.files("resnet50")["legacy"]
  assert cli.main(["convert", f"--keras={source}", "--arch=resnet101", f"--out={tmp_path / 'x'}"]) == 1
  err = capsys.readouterr().err
  assert str(source) in err and "wrong architecture" in err
  assert not (tmp_path / "x").exists()
