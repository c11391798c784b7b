"""Keras-exact backbones (ResNet v1, DenseNet) and the fused Res-Dense Net, as Flax linen modules."""

from resdense_jax.models.backbones import BACKBONES, PREPROCESSING_MODE
from resdense_jax.models.densenet import DenseNet, DenseNet121, DenseNet169, DenseNet201
from resdense_jax.models.keras_layers import KerasLayer
from resdense_jax.models.preprocessing import preprocess_input
from resdense_jax.models.resdense import GeMPool, ResDenseNet
from resdense_jax.models.resnet import ResNet, ResNet50, ResNet101, ResNet152

__all__ = [
    "BACKBONES", "DenseNet", "GeMPool", "ResDenseNet", "DenseNet121", "DenseNet169", "DenseNet201", "KerasLayer", "PREPROCESSING_MODE",
    "ResNet", "ResNet50", "ResNet101", "ResNet152", "preprocess_input",
]
