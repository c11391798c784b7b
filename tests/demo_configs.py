"""Tiny configs and collections shared by the engine tests (no pretrained weights, 32x32 slices)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import common  # noqa: E402

from resdense_jax import data  # noqa: E402

TINY_BACKBONES = {"resnet50": dict(stage_sizes=(1, 1, 1, 1), filters=(4, 8, 8, 8), stem_filters=8),
                  "densenet121": dict(blocks=(1, 1, 1, 1), growth_rate=4, stem_filters=8)}


def tiny_config():
  config = common.get_base_config()
  config.data.image_size = 32
  config.model.backbones = ("resnet50", "densenet121")
  config.model.backbone_kwargs = TINY_BACKBONES
  config.model.fusion_filters = 8
  config.model.pretrained = "none"
  config.train.batch_size = 8
  config.train.log_every_steps = 2
  config.phases = [common.phase("head", 1, ("backbones",), optimizer="rmsprop", learning_rate=1e-3),
                   common.phase("finetune", 2, ("backbones:10",), optimizer="adam", learning_rate=1e-3)]
  config.eval.batch_size = 16
  return config


def tiny_collection(root: pathlib.Path) -> pathlib.Path:
  return data.synthetic.write_collection(root, num_scans={"train": (3, 3), "validation": (2, 2), "test": 0},
                                         slice_size=32, num_slices=(4, 6), seed=0, progress=False)
