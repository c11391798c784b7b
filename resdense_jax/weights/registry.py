"""The ImageNet weight files Keras Applications publishes for ResNet v1, ResNet v2 and DenseNet.

File names, URLs and MD5 hashes are the ones Keras 3 uses (keras/src/applications/resnet.py, densenet.py), so a
file Keras already downloaded into `~/.keras/models` is found and reused as is.
"""

from __future__ import annotations

import dataclasses

RESNET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
DENSENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/densenet/"

# arch -> (base URL, MD5 of the file with top, MD5 of the file without top)
_HASHES = {
    "resnet50": (RESNET_URL, "2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"),
    "resnet101": (RESNET_URL, "f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21"),
    "resnet152": (RESNET_URL, "100835be76be38e30d865e96f2aaae62", "ee4c566cf9a93f14d82f913c2dc6dd0c"),
    "resnet50v2": (RESNET_URL, "3ef43a0b657b3be2300d5770ece849e0", "fac2f116257151a9d068a22e544a4917"),
    "resnet101v2": (RESNET_URL, "6343647c601c52e1368623803854d971", "c0ed64b8031c3730f411d2eb4eea35b5"),
    "resnet152v2": (RESNET_URL, "a49b44d1979771252814e80f8ec446f9", "ed17cf2e0169df9d443503ef94b23b33"),
    "densenet121": (DENSENET_URL, "9d60b8095a5708f2dcce2bca79d332c7", "30ee3e1110167f948a6b9946edeeb738"),
    "densenet169": (DENSENET_URL, "d699b8f76981ab1b30698df4c175e90b", "b8c4d4c20dd625c148057b9ff1c1176b"),
    "densenet201": (DENSENET_URL, "1ceb130c1ea1b78c3bf6114dbdfd8807", "c13680b51ded0fb44dff2d8f86ac8bb1"),
}


@dataclasses.dataclass(frozen=True)
class KerasWeightsFile:
  """One published file: which backbone it fits, with or without the 1000-class `predictions` top."""
  arch: str
  include_top: bool
  file_name: str
  url: str
  md5: str


def _entries() -> dict[str, KerasWeightsFile]:
  entries = {}
  for arch, (base_url, md5_top, md5_notop) in _HASHES.items():
    for include_top, md5 in ((True, md5_top), (False, md5_notop)):
      file_name = f"{arch}_weights_tf_dim_ordering_tf_kernels{'' if include_top else '_notop'}.h5"
      entries[file_name] = KerasWeightsFile(arch, include_top, file_name, base_url + file_name, md5)
  return entries


# file name -> entry, in Keras's order (ResNets v1, v2, then DenseNets; top before no-top).
REGISTRY: dict[str, KerasWeightsFile] = _entries()


def registry_entry(arch: str, include_top: bool) -> KerasWeightsFile:
  """The published file for `arch` ("resnet101", ...) with or without top."""
  for entry in REGISTRY.values():
    if entry.arch == arch and entry.include_top == include_top:
      return entry
  raise KeyError(f"no published Keras ImageNet weights for {arch!r}; known: {sorted(_HASHES)}")
