"""The backbones by name, and the Keras preprocessing mode each family's ImageNet weights were trained with."""

from resdense_jax.models.densenet import DenseNet121, DenseNet169, DenseNet201
from resdense_jax.models.resnet import ResNet50, ResNet101, ResNet152

BACKBONES = {
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "densenet121": DenseNet121,
    "densenet169": DenseNet169,
    "densenet201": DenseNet201,
}

PREPROCESSING_MODE = {name: ("caffe" if name.startswith("resnet") else "torch") for name in BACKBONES}
