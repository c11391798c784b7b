"""Parity of the Flax backbones with Keras 3 itself, per model and weight-file layout.

Each Keras Applications model gets random weights and BatchNorm statistics (tests/keras_fixtures.py), is saved
in the legacy Keras-2 HDF5 layout, Keras 3's `.weights.h5` layout and a tf.keras-style legacy file (nested
`conv1/conv` names for DenseNet, `:0` suffixes, top named probs/fc1000), loaded with `weights.load_keras` and run
on the same random input. Prints max |flax - keras| / max |keras| per model x layout, without and with top.

  JAX_PLATFORMS=cpu KERAS_BACKEND=jax .venv/bin/python benchmarks/parity.py [--arch resnet50 ...]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_fixtures as kf  # noqa: E402
from resdense_jax import models, weights  # noqa: E402

ARCHS = ("resnet50", "resnet101", "resnet152", "resnet50v2", "resnet101v2", "resnet152v2", "densenet121",
         "densenet169", "densenet201")


def _size(text: str) -> tuple[int, int]:
  height, width = text.lower().split("x")
  return int(height), int(width)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
  parser.add_argument("--size", type=_size, default=(65, 47), help="input HxW without top (default 65x47)")
  parser.add_argument("--top_size", type=_size, default=(64, 64), help="input HxW with top (default 64x64)")
  args = parser.parse_args()
  print(f"jax {jax.__version__} ({jax.default_backend()}), keras {keras.__version__} ({keras.backend.backend()}); "
        f"batch 2, no top at {args.size[0]}x{args.size[1]} (pooling=None), top at "
        f"{args.top_size[0]}x{args.top_size[1]} (softmax)")
  header = f"{'model':<12} {'top':<4} {'layout':<9} {'max|keras|':>11} {'max|diff|':>10} {'rel diff':>9}"
  print(header + "\n" + "-" * len(header))
  with tempfile.TemporaryDirectory() as folder:
    ref = kf.KerasReference(folder)
    for arch in args.arch:
      start = time.time()
      for include_top, hw in ((False, args.size), (True, args.top_size)):
        expected = ref.output(arch, include_top, None, hw)
        model = models.BACKBONES[arch](include_top=include_top)
        for layout, path in ref.files(arch, include_top, hw).items():
          variables = weights.load_keras(model, path)
          actual = np.asarray(kf.jitted_apply(model)(variables, ref.images(hw)))
          diff = float(np.max(np.abs(actual.astype(np.float64) - expected)))
          print(f"{arch:<12} {'yes' if include_top else 'no':<4} {layout:<9} {np.max(np.abs(expected)):>11.4g} "
                f"{diff:>10.3g} {kf.relative_max_diff(actual, expected):>9.2e}", flush=True)
      print(f"{'':<12} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
