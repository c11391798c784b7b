"""Readers for the HDF5 layouts Keras writes weights in, nested models included.

Legacy (Keras 2 / tf.keras `save_weights("x.h5")`, the published ImageNet files): the root (or `model_weights` in a
full-model file, `model.save("x.h5")`) lists `layer_names`; each layer's group lists `weight_names`, datasets at
`<layer>/<weight name>`, e.g. `conv1_conv/conv1_conv/kernel:0`. tf.keras DenseNet files name the stem `conv1/conv`,
`conv1/bn`, which Keras 3 calls `conv1_conv`, `conv1_bn`; top layers were `probs` (ResNet) and `fc1000`
(DenseNet), Keras 3 calls both `predictions`. A model used as one layer of another (a backbone inside a
classifier) is one entry of `layer_names` whose weight names span its own layers (`conv1_conv/kernel`, or with a
prefix `resnet50/conv1_conv/kernel:0`), trainable weights first, then the non-trainable ones.

Keras 3 (`save_weights("x.weights.h5")`, and `model.weights.h5` inside a `.keras` zip): `layers/<class in snake
case>[_<k>]/vars/<i>`, where k counts the earlier layers of the same class in `model.layers` order; newer Keras
also stores the layer name as the `name` attribute of `vars`. A nested model has its own `layers/` group
(`layers/functional/layers/conv2d/vars`), with counters restarting inside it.

`read` returns the file's top level and every nested model (`KerasWeightsH5.submodels`); the loader picks the one
that fits.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import re
import zipfile
from typing import Literal

import h5py
import numpy as np

from resdense_jax.weights.errors import WeightsError

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# tf.keras / keras-applications names of the classification top.
TOP_ALIASES = {"probs": "predictions", "fc1000": "predictions"}
# The weights inside a Keras 3 `.keras` zip.
KERAS_ZIP_WEIGHTS = "model.weights.h5"


@dataclasses.dataclass(frozen=True)
class FileLayer:
  """A layer with weights as stored in a file.

  `name` is the Keras 3 layer name ("/" mapped to "_", top aliases resolved, a nested model's common prefix
  dropped), or None where a Keras 3 file does not record it; `key` is where the file keeps it (legacy group path
  or weight-name prefix, `<class>_<k>` for Keras 3); `weight_names` are the stored variable names without the
  `:0` suffix (Keras 3: "0", "1", ...).
  """
  name: str | None
  key: str
  weight_names: tuple[str, ...]
  values: tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class KerasWeightsH5:
  """The weights of one model in a file: its own layers, and the models nested in it as layers."""
  path: pathlib.Path
  layout: Literal["legacy", "keras3"]
  layers: tuple[FileLayer, ...]  # layers with weights, in file order (nested models excluded)
  # None for the file's top level; a nested model's layer name (legacy) or key path (Keras 3: "functional").
  submodel: str | None = None
  submodels: tuple[KerasWeightsH5, ...] = ()
  # The top level of a legacy full-model file (`model.save("x.h5")`, with `model_config`): its layers are the
  # whole model's, a classifier head after the backbone's layers included.
  full_model: bool = False

  @property
  def names(self) -> list[str]:
    return [layer.name for layer in self.layers if layer.name is not None]

  @property
  def source(self) -> str:
    """How messages name these weights: the file, and the nested model they come from."""
    return str(self.path) if self.submodel is None else f"{self.path} (sub-model {self.submodel!r})"

  def candidates(self) -> list[KerasWeightsH5]:
    """This model and every model nested in it, depth first."""
    return [self, *(c for sub in self.submodels for c in sub.candidates())]


def read(path: os.PathLike | str) -> KerasWeightsH5:
  """Reads every weight of a Keras weights or model file (.h5, .weights.h5, .keras) into memory."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: no such file")
  with open(path, "rb") as raw:
    head = raw.read(len(_HDF5_SIGNATURE))
  # The HDF5 signature first: weight bytes near a file's end could pass zipfile's end-of-archive probe.
  if head != _HDF5_SIGNATURE and zipfile.is_zipfile(path):
    return _read_keras_zip(path)
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    if head == _HDF5_SIGNATURE:
      raise WeightsError(f"{path}: truncated or corrupt HDF5 file ({e})") from e
    raise WeightsError(f"{path}: not an HDF5 file (starts with {head!r}); expected a Keras .h5 weight file, "
                       "a .weights.h5 file or a .keras zip") from e
  with f:
    return _read_hdf5(f, path)


def _read_keras_zip(path: pathlib.Path) -> KerasWeightsH5:
  """A Keras 3 `.keras` file: a zip holding config.json and the weights as `model.weights.h5`."""
  try:
    with zipfile.ZipFile(path) as archive:
      if KERAS_ZIP_WEIGHTS not in archive.namelist():
        raise WeightsError(f"{path}: a zip file without {KERAS_ZIP_WEIGHTS} (holds {sorted(archive.namelist())[:5]}); "
                           "expected a Keras 3 .keras model file")
      data = archive.read(KERAS_ZIP_WEIGHTS)
  except (zipfile.BadZipFile, OSError) as e:
    raise WeightsError(f"{path}: truncated or corrupt zip file ({e})") from e
  try:
    f = h5py.File(io.BytesIO(data), "r")
  except OSError as e:
    raise WeightsError(f"{path}: {KERAS_ZIP_WEIGHTS} inside is not a readable HDF5 file ({e})") from e
  with f:
    if "layers" not in f:
      raise WeightsError(f"{path}: {KERAS_ZIP_WEIGHTS} inside has no `layers` group")
    return _read_hdf5(f, path)


def _read_hdf5(f: h5py.File, path: pathlib.Path) -> KerasWeightsH5:
  try:
    if "layers" in f and "layer_names" not in f.attrs:
      return _read_keras3(f["layers"], path, None)
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
      raise WeightsError(f"{path}: HDF5 file without Keras weights (no `layer_names` attribute and no `layers` "
                         "group)")
    return _read_legacy(root, path, full_model="model_config" in f.attrs)
  except (OSError, KeyError, RuntimeError) as e:
    # h5py reports a file cut short inside a dataset or group as one of these when it is read.
    raise WeightsError(f"{path}: truncated or corrupt HDF5 file ({e})") from e


def _attribute_list(group: h5py.Group, name: str) -> list[str]:
  """A string-list attribute, also in the chunked form (`name0`, `name1`, ...) Keras uses for long lists."""
  if name in group.attrs:
    chunks = [group.attrs[name]]
  else:
    chunks = []
    while f"{name}{len(chunks)}" in group.attrs:
      chunks.append(group.attrs[f"{name}{len(chunks)}"])
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for chunk in chunks for v in np.atleast_1d(chunk)]


def keras3_layer_name(legacy_name: str) -> str:
  name = legacy_name.replace("/", "_")
  return TOP_ALIASES.get(name, name)


def _variable_name(weight_name: str) -> str:
  """`conv1/bn/gamma:0` -> `gamma`."""
  return re.sub(r":\d+$", "", weight_name.rsplit("/", 1)[-1])


def _layer_path(weight_name: str) -> str:
  """`resnet50/conv1_bn/gamma:0` -> `resnet50/conv1_bn`: the scope of the layer that owns the weight."""
  return weight_name.rpartition("/")[0]


def _without_common_prefix(paths: list[str]) -> list[str]:
  """Drops the leading path components every path shares (`resnet50/conv1_conv`, `resnet50/conv1_bn`, ...:
  a nested model's name scope), never a path's last component."""
  parts = [p.split("/") for p in paths]
  n = 0
  while all(len(p) > n + 1 and p[n] == parts[0][n] for p in parts):
    n += 1
  return ["/".join(p[n:]) for p in parts]


def _read_legacy(root: h5py.Group, path: pathlib.Path, *, full_model: bool = False) -> KerasWeightsH5:
  layers, submodels = [], []
  for layer_name in _attribute_list(root, "layer_names"):
    group = root[layer_name]
    weight_names = _attribute_list(group, "weight_names")
    if not weight_names:
      continue
    if len({_layer_path(w) for w in weight_names}) > 1:
      # The weights of several layers under one entry: a model nested as a layer.
      submodels.append(_read_legacy_submodel(group, layer_name, weight_names, path))
      continue
    values = tuple(np.asarray(group[w]) for w in weight_names)
    layers.append(FileLayer(keras3_layer_name(layer_name), layer_name, tuple(map(_variable_name, weight_names)),
                            values))
  return KerasWeightsH5(path, "legacy", tuple(layers), submodels=tuple(submodels), full_model=full_model)


def _read_legacy_submodel(group: h5py.Group, name: str, weight_names: list[str],
                          path: pathlib.Path) -> KerasWeightsH5:
  """A nested model's entry: its weights grouped by the layer each belongs to, in first-appearance order (the
  layer order: each layer's trainable weights come first)."""
  by_layer: dict[str, list[str]] = {}
  for w in weight_names:
    by_layer.setdefault(_layer_path(w), []).append(w)
  keys = list(by_layer)
  layers = tuple(
      FileLayer(keras3_layer_name(short), key, tuple(map(_variable_name, by_layer[key])),
                tuple(np.asarray(group[w]) for w in by_layer[key]))
      for key, short in zip(keys, _without_common_prefix(keys)))
  return KerasWeightsH5(path, "legacy", layers, submodel=name)


def _read_keras3(layers_group: h5py.Group, path: pathlib.Path, submodel: str | None) -> KerasWeightsH5:
  layers, submodels = [], []
  for key, group in layers_group.items():
    if "layers" in group and isinstance(group["layers"], h5py.Group):
      submodels.append(_read_keras3(group["layers"], path, key if submodel is None else f"{submodel}/{key}"))
    if "vars" not in group or not len(group["vars"]):
      continue
    variables = group["vars"]
    indices = [str(i) for i in range(len(variables))]
    if sorted(variables) != sorted(indices):
      raise WeightsError(f"{path}: {variables.name.lstrip('/')} holds {sorted(variables)}, expected {indices}")
    name = variables.attrs.get("name")
    name = name.decode("utf8") if isinstance(name, bytes) else name
    layers.append(FileLayer(name, key, tuple(indices), tuple(np.asarray(variables[i]) for i in indices)))
  return KerasWeightsH5(path, "keras3", tuple(layers), submodel, tuple(submodels))
