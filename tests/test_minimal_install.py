"""`pip install resdense-jax` without extras: the models and the weight loader with flax + h5py only.

The library's own dependencies are jax, flax, numpy and h5py. In an environment holding only those and what they
depend on, `resdense_jax.models` and `resdense_jax.weights` import, a small backbone loads a Keras-written
weights file and equals Keras's output, and the fused model runs; none of the full stack (grain, TFDS, OpenCV,
pydicom, nibabel, matplotlib, tensorboardX, tqdm, ml_collections, Pillow; Keras) is importable there, so an
import of any of them from these modules fails the test.

Two such environments: in the suite, a folder of links to exactly those distributions of this environment
(interpreter started with -S: no site-packages); behind `long`, a real virtual environment that pip fills from
the registry (1.5-3.5 minutes here, mostly waiting on the network).
"""

import importlib.metadata
import pathlib
import subprocess
import sys
import textwrap
import tomllib

import numpy as np
import pytest
from packaging.requirements import Requirement

import keras_fixtures as kf

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ("jax", "flax", "numpy", "h5py")
FULL_STACK = ("grain", "tensorflow_datasets", "cv2", "pydicom", "nibabel", "matplotlib", "tensorboardX", "tqdm",
              "ml_collections", "keras", "PIL", "sklearn")

CHECK = """
import importlib.util, sys
{path_setup}
import numpy as np
import jax, jax.numpy as jnp
absent = [m for m in {full_stack!r} if importlib.util.find_spec(m) is not None]
assert not absent, f"not a minimal environment: {{absent}}"
from resdense_jax import models, weights
assert models.__file__.startswith({expect_from!r}), models.__file__
model = models.ResNet(include_top=False, pooling="avg", stage_sizes=(1, 1, 1, 1), filters={filters!r})
variables = weights.load_keras(model, {weights_file!r})
images = np.load({images!r})
out = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
np.save({out!r}, out)
fused = models.ResDenseNet(fusion_filters=8, backbone_kwargs={backbone_kwargs!r})
fused_variables = fused.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
logits = fused.apply(fused_variables, jnp.zeros((2, 32, 32, 3)), train=False)
assert logits.shape == (2, 1), logits.shape
after = sorted({{name.split(".")[0] for name in sys.modules}} & set({full_stack!r}))
assert not after, after
print("minimal install ok")
"""


def test_the_declared_dependencies_are_the_core_only():
  """What `pip install resdense-jax` brings is jax, flax, numpy and h5py; the rest is the `full` extra."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert sorted(Requirement(r).name for r in project["dependencies"]) == sorted(CORE)
  full = {Requirement(r).name for r in project["optional-dependencies"]["full"]}
  assert {"grain", "tensorflow-datasets", "opencv-python-headless", "pydicom", "optax"} <= full
  assert "resdense-jax[full]" in project["optional-dependencies"]["test"]


def _closure(names) -> dict[str, importlib.metadata.Distribution]:
  """The installed distributions `names` need, recursively (markers evaluated, no extras)."""
  found, todo = {}, list(names)
  while todo:
    name = todo.pop()
    key = name.lower().replace("_", "-")
    if key in found:
      continue
    found[key] = dist = importlib.metadata.distribution(name)
    for text in dist.requires or ():
      req = Requirement(text)
      if not req.marker or req.marker.evaluate({"extra": ""}):
        todo.append(req.name)
  return found


def _link_distributions(dists, site: pathlib.Path) -> None:
  """A folder holding (links to) the top-level entries of `dists` only: packages, modules, .libs, dist-info."""
  site.mkdir()
  for dist in dists.values():
    base = pathlib.Path(dist.locate_file(""))
    for top in {pathlib.Path(f).parts[0] for f in dist.files or ()}:
      source = base / top
      if top not in ("..", "__pycache__") and source.exists() and not (site / top).exists():
        (site / top).symlink_to(source)


def _reference(tmp_path):
  keras_model = kf.build_small_keras("resnet50")
  weights_file = kf.save_legacy(keras_model, tmp_path / "small_resnet.h5")
  images = kf.random_images((2, 40, 36, 3))
  np.save(tmp_path / "images.npy", images)
  expected = np.asarray(kf.keras.layers.GlobalAveragePooling2D()(keras_model(images)))
  return weights_file, expected


def _check(python_args, tmp_path, *, path_setup: str, expect_from: str):
  weights_file, expected = _reference(tmp_path)
  code = CHECK.format(full_stack=FULL_STACK, filters=kf.SMALL_RESNET_FILTERS, weights_file=str(weights_file),
                      images=str(tmp_path / "images.npy"), out=str(tmp_path / "out.npy"), path_setup=path_setup,
                      expect_from=expect_from,
                      backbone_kwargs={"resnet101": dict(stage_sizes=(1, 1, 1, 1), filters=(4, 8, 8, 8)),
                                       "densenet121": dict(blocks=(1, 1, 1, 1))})
  # Outside the checkout, so nothing is imported from the working folder by accident.
  proc = subprocess.run([*python_args, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                        cwd=tmp_path, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "minimal install ok" in proc.stdout
  assert kf.relative_max_diff(np.load(tmp_path / "out.npy"), expected) <= 1e-4


def test_models_and_weights_work_with_the_core_distributions_only(tmp_path):
  dists = _closure(CORE)
  assert not {"grain", "opencv-python-headless", "tqdm", "ml-collections", "keras", "pillow"} & set(dists)
  site = tmp_path / "site"
  _link_distributions(dists, site)
  (site / "resdense_jax").symlink_to(ROOT / "resdense_jax")
  # -S: no site-packages at all; sys.path is the standard library and this folder.
  _check([sys.executable, "-S"], tmp_path, path_setup=f"sys.path.insert(0, {str(site)!r})",
         expect_from=str(site))


@pytest.mark.long  # pip fills a virtual environment from the registry: 1.5-3.5 minutes here
def test_models_and_weights_work_in_a_fresh_virtual_environment(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("jax", "jaxlib", "flax", "h5py")]
  # The project is built by the new environment's setuptools (setuptools is a build tool, not a dependency).
  for args in ([*pins, "setuptools>=68"], ["--no-deps", "--no-build-isolation", str(ROOT)]):
    proc = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
  _check([python], tmp_path, path_setup="", expect_from=str(venv))
