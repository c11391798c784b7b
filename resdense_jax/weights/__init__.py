"""Keras Applications weight files (ImageNet ResNet v1 / DenseNet) as Flax variables for `resdense_jax.models`.

    variables = weights.load_keras(model, "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5")

reads the legacy Keras-2 HDF5 layout of the published files and the Keras 3 `.weights.h5` layout, finds
published files in `~/.keras/models` (downloading and MD5-verifying them when absent), and returns
`{"params", "batch_stats"}` only when every variable of the model is filled.
"""

from resdense_jax.weights.checkpoint import load_converted, read_metadata, restore, save_converted
from resdense_jax.weights.download import get_file, keras_cache_dir, md5sum
from resdense_jax.weights.errors import WeightsError
from resdense_jax.weights.h5 import read as read_h5
from resdense_jax.weights.loader import abstract_variables, assign, describe_architecture, load_keras
from resdense_jax.weights.registry import REGISTRY, KerasWeightsFile, registry_entry

__all__ = [
    "REGISTRY",
    "KerasWeightsFile",
    "WeightsError",
    "abstract_variables",
    "assign",
    "describe_architecture",
    "get_file",
    "keras_cache_dir",
    "load_converted",
    "load_keras",
    "md5sum",
    "read_h5",
    "read_metadata",
    "registry_entry",
    "restore",
    "save_converted",
]
