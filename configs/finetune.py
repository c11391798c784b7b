"""The paper's setup: Res-Dense Net (ResNet101 + DenseNet121, ImageNet weights) on COV19-CT-DB.

    python -m resdense_jax.main --config=configs/finetune.py --workdir=runs/resdense \
        --config.data.root=/path/to/COV19-CT-DB

256x256 slices, batch 32, RMSprop 1e-4, 20 epochs in two phases (head only, then all but the first 100 Keras
layers of each backbone). The ImageNet weights are Keras Applications' published files, found in the Keras
cache (~/.keras/models) or --config.model.weights_dir, and downloaded when missing.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config():
  config = common.get_base_config()
  config.data.image_size = 256
  config.train.batch_size = 32
  return config
