"""The backbones by name, and the Keras preprocessing mode each family's ImageNet weights were trained with."""

from resdense_jax.models.densenet import DenseNet121, DenseNet169, DenseNet201
from resdense_jax.models.resnet import ResNet50, ResNet101, ResNet152
from resdense_jax.models.resnet_v2 import ResNet50V2, ResNet101V2, ResNet152V2

BACKBONES = {
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "resnet50v2": ResNet50V2,
    "resnet101v2": ResNet101V2,
    "resnet152v2": ResNet152V2,
    "densenet121": DenseNet121,
    "densenet169": DenseNet169,
    "densenet201": DenseNet201,
}


def _preprocessing_mode(name: str) -> str:
  """Keras's `<family>.preprocess_input` mode: resnet_v2 "tf" ([-1, 1]), resnet "caffe", densenet "torch"."""
  if name.startswith("resnet"):
    return "tf" if name.endswith("v2") else "caffe"
  if name.startswith("densenet"):
    return "torch"
  raise ValueError(f"backbones.py: no Keras preprocessing mode known for backbone {name!r}; add it here")


PREPROCESSING_MODE = {name: _preprocessing_mode(name) for name in BACKBONES}
