"""Keras-exact backbones (ResNet v1, DenseNet) and the fused Res-Dense Net, as Flax linen modules."""

from resdense_jax.models.densenet import DenseNet, DenseNet121, DenseNet169, DenseNet201
from resdense_jax.models.keras_layers import KerasLayer
from resdense_jax.models.preprocessing import preprocess_input
from resdense_jax.models.resnet import ResNet, ResNet50, ResNet101, ResNet152

BACKBONES = {
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "densenet121": DenseNet121,
    "densenet169": DenseNet169,
    "densenet201": DenseNet201,
}

# The Keras preprocessing mode each family's ImageNet weights were trained with.
PREPROCESSING_MODE = {name: ("caffe" if name.startswith("resnet") else "torch") for name in BACKBONES}

# The fused model reads BACKBONES and PREPROCESSING_MODE from this module, so it is imported last.
from resdense_jax.models.resdense import GeMPool, ResDenseNet  # noqa: E402

__all__ = [
    "BACKBONES", "DenseNet", "GeMPool", "ResDenseNet", "DenseNet121", "DenseNet169", "DenseNet201", "KerasLayer", "PREPROCESSING_MODE",
    "ResNet", "ResNet50", "ResNet101", "ResNet152", "preprocess_input",
]
