"""Keras-exact backbones (ResNet v1, ResNet v2, DenseNet) and the fused Res-Dense Net, as Flax linen modules."""

from resdense_jax.models.backbones import BACKBONES, PREPROCESSING_MODE
from resdense_jax.models.densenet import DenseNet, DenseNet121, DenseNet169, DenseNet201
from resdense_jax.models.keras_layers import KerasLayer
from resdense_jax.models.preprocessing import preprocess_input
from resdense_jax.models.resdense import GeMPool, ResDenseNet
from resdense_jax.models.resnet import ResNet, ResNet50, ResNet101, ResNet152
from resdense_jax.models.resnet_v2 import ResNet50V2, ResNet101V2, ResNet152V2, ResNetV2

__all__ = [
    "BACKBONES", "DenseNet", "GeMPool", "ResDenseNet", "DenseNet121", "DenseNet169", "DenseNet201", "KerasLayer", "PREPROCESSING_MODE",
    "ResNet", "ResNet50", "ResNet101", "ResNet152", "ResNetV2", "ResNet50V2", "ResNet101V2", "ResNet152V2",
    "preprocess_input",
]
