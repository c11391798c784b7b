"""Readers for the two HDF5 layouts Keras writes weights in.

Legacy (Keras 2 / tf.keras `save_weights("x.h5")`, the published ImageNet files): the root (or `model_weights` in a
full-model file) lists `layer_names`; each layer's group lists `weight_names`, datasets at `<layer>/<weight name>`,
e.g. `conv1_conv/conv1_conv/kernel:0`. tf.keras DenseNet files name the stem `conv1/conv`, `conv1/bn`, which
Keras 3 calls `conv1_conv`, `conv1_bn`; top layers were `probs` (ResNet) and `fc1000` (DenseNet), Keras 3 calls
both `predictions`.

Keras 3 (`save_weights("x.weights.h5")`): `layers/<class in snake case>[_<k>]/vars/<i>`, where k counts the
earlier layers of the same class in `model.layers` order; newer Keras also stores the layer name as the `name`
attribute of `vars`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Literal

import h5py
import numpy as np

from resdense_jax.weights.errors import WeightsError

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# tf.keras / keras-applications names of the classification top.
TOP_ALIASES = {"probs": "predictions", "fc1000": "predictions"}


@dataclasses.dataclass(frozen=True)
class FileLayer:
  """A layer with weights as stored in a file.

  `name` is the Keras 3 layer name ("/" mapped to "_", top aliases resolved), or None where a Keras 3 file does
  not record it; `key` is where the file keeps it (legacy group path, or `<class>_<k>` for Keras 3);
  `weight_names` are the stored variable names without the `:0` suffix (Keras 3: "0", "1", ...).
  """
  name: str | None
  key: str
  weight_names: tuple[str, ...]
  values: tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class KerasWeightsH5:
  path: pathlib.Path
  layout: Literal["legacy", "keras3"]
  layers: tuple[FileLayer, ...]  # layers with weights, in file order

  @property
  def names(self) -> list[str]:
    return [layer.name for layer in self.layers if layer.name is not None]


def read(path: os.PathLike | str) -> KerasWeightsH5:
  """Reads every weight of a Keras HDF5 weight file of either layout into memory."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: no such file")
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    with open(path, "rb") as raw:
      head = raw.read(len(_HDF5_SIGNATURE))
    if head == _HDF5_SIGNATURE:
      raise WeightsError(f"{path}: truncated or corrupt HDF5 file ({e})") from e
    raise WeightsError(f"{path}: not an HDF5 file (starts with {head!r}); expected a Keras .h5 weight file") from e
  try:
    with f:
      if "layers" in f and "layer_names" not in f.attrs:
        return KerasWeightsH5(path, "keras3", _read_keras3(f))
      root = f["model_weights"] if "model_weights" in f else f
      if "layer_names" not in root.attrs:
        raise WeightsError(f"{path}: HDF5 file without Keras weights (no `layer_names` attribute and no `layers` "
                           "group)")
      return KerasWeightsH5(path, "legacy", _read_legacy(root))
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


def _read_legacy(root: h5py.Group) -> tuple[FileLayer, ...]:
  layers = []
  for layer_name in _attribute_list(root, "layer_names"):
    group = root[layer_name]
    weight_names = _attribute_list(group, "weight_names")
    if not weight_names:
      continue
    values = tuple(np.asarray(group[w]) for w in weight_names)
    layers.append(FileLayer(keras3_layer_name(layer_name), layer_name, tuple(map(_variable_name, weight_names)),
                            values))
  return tuple(layers)


def _read_keras3(f: h5py.File) -> tuple[FileLayer, ...]:
  layers = []
  for key, group in f["layers"].items():
    if "vars" not in group or not len(group["vars"]):
      continue
    variables = group["vars"]
    indices = [str(i) for i in range(len(variables))]
    if sorted(variables) != sorted(indices):
      raise WeightsError(f"{f.filename}: layers/{key}/vars holds {sorted(variables)}, expected {indices}")
    name = variables.attrs.get("name")
    name = name.decode("utf8") if isinstance(name, bytes) else name
    layers.append(FileLayer(name, key, tuple(indices), tuple(np.asarray(variables[i]) for i in indices)))
  return tuple(layers)
