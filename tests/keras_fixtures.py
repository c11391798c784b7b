"""Keras 3 reference models with random, non-trivial weights, saved in the layouts the weight loader reads.

Shared by the weight tests and benchmarks/parity.py. Weights are random but scaled so that activations keep an
O(1) size through 100+ layers (He-scaled kernels, BatchNorm moving statistics near the identity, small residual
branch gammas) and so that a softmax top is not saturated; that keeps a relative comparison meaningful.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import contextlib  # noqa: E402
import functools  # noqa: E402
import http.server  # noqa: E402
import pathlib  # noqa: E402
import threading  # noqa: E402
from unittest import mock  # noqa: E402

import h5py  # noqa: E402
import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.src.backend.jax import random as keras_jax_random  # noqa: E402
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402

import trees  # noqa: E402
from resdense_jax import weights  # noqa: E402

KERAS_APPLICATIONS = {
    "resnet50": keras.applications.ResNet50,
    "resnet101": keras.applications.ResNet101,
    "resnet152": keras.applications.ResNet152,
    "resnet50v2": keras.applications.ResNet50V2,
    "resnet101v2": keras.applications.ResNet101V2,
    "resnet152v2": keras.applications.ResNet152V2,
    "densenet121": keras.applications.DenseNet121,
    "densenet169": keras.applications.DenseNet169,
    "densenet201": keras.applications.DenseNet201,
}


def build_keras(arch: str, *, include_top: bool = False, pooling: str | None = None, input_shape=None,
                classes: int = 1000, seed: int = 0) -> keras.Model:
  """`keras.applications.<arch>(weights=None)` with random weights (input_shape defaults to (None, None, 3))."""
  keras.backend.clear_session()  # Keras's automatic layer names (zero_padding2d, ...) restart at 0
  with _zero_initializers():
    model = KERAS_APPLICATIONS[arch](weights=None, include_top=include_top, pooling=pooling, classes=classes,
                                     input_shape=input_shape or (None, None, 3))
  randomize_weights(model, seed)
  return model


@contextlib.contextmanager
def _zero_initializers():
  """Keras's JAX backend draws initial weights with jax.random, compiling one kernel per weight shape (most of
  the time it takes to build a ResNet on CPU). randomize_weights overwrites every weight right after, so the
  models are built with zeros instead."""
  def zeros(shape, *args, dtype=None, **kwargs):
    return np.zeros(shape, dtype=dtype or "float32")

  with mock.patch.multiple(keras_jax_random, uniform=zeros, normal=zeros, truncated_normal=zeros):
    yield


def randomize_weights(model: keras.Model, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  # The last BatchNorm of a residual branch: `_3_bn` in ResNet v1; `_2_bn` in v2 (pre-activation), whose
  # branch ends BN-ReLU-`_3_conv` and whose un-normalised sum would otherwise double in variance per block.
  preact = any(layer.name.endswith("_preact_bn") for layer in model.layers)
  last_branch_bn = "_2_bn" if preact else "_3_bn"
  for layer in model.layers:
    values = []
    for weight in layer.weights:
      shape, name = tuple(weight.shape), weight.name
      if name == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        # He scale for convs followed by ReLU; a small top scale keeps its softmax unsaturated.
        std = np.sqrt((2.0 if len(shape) == 4 else 1.0) / fan_in)
        values.append(rng.normal(0.0, std, shape))
      elif name == "gamma":
        # A residual branch's last BN gets small gammas, so 30+ residual additions do not blow up activations.
        low, high = (0.1, 0.2) if layer.name.endswith(last_branch_bn) else (0.8, 1.2)
        values.append(rng.uniform(low, high, shape))
      elif name in ("bias", "beta", "moving_mean"):
        values.append(rng.uniform(-0.2, 0.2, shape))
      elif name == "moving_variance":
        values.append(rng.uniform(0.5, 2.0, shape))
      else:
        raise AssertionError(f"unexpected weight {weight.path}")
    if values:
      layer.set_weights([v.astype(np.float32) for v in values])


def save_legacy(model: keras.Model, path: os.PathLike | str) -> pathlib.Path:
  """The legacy Keras-2 layout (`layer_names`, `<layer>/<layer>/<var>`), as Keras 3 writes it."""
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  return pathlib.Path(path)


def save_keras3(model: keras.Model, path: os.PathLike | str) -> pathlib.Path:
  """Keras 3's `model.save_weights` layout (`layers/<class>_<k>/vars/<i>`); `path` must end in .weights.h5."""
  model.save_weights(str(path))
  return pathlib.Path(path)


def tf_keras_name(name: str) -> str:
  """The name tf.keras / keras-applications gave a Keras 3 layer in the published files."""
  if name in ("conv1_conv", "conv1_bn", "conv1_relu"):
    return name.replace("_", "/", 1)
  return name


def to_tf_keras_layout(src: os.PathLike | str, dst: os.PathLike | str, *, densenet: bool) -> pathlib.Path:
  """Rewrites a legacy file as the published tf.keras files are: `:0` variable suffixes, DenseNet's nested
  `conv1/conv`, `conv1/bn` names, and the top named `fc1000` (DenseNet) or `probs` (ResNet)."""
  rename = {"predictions": "fc1000" if densenet else "probs"}
  with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
    names = []
    for layer_name in [n.decode() if isinstance(n, bytes) else n for n in fin.attrs["layer_names"]]:
      new = rename.get(layer_name, tf_keras_name(layer_name) if densenet else layer_name)
      names.append(new)
      group = fout.create_group(new)
      weight_names = []
      for weight_name in fin[layer_name].attrs["weight_names"]:
        weight_name = weight_name.decode() if isinstance(weight_name, bytes) else weight_name
        variable = weight_name.rsplit("/", 1)[-1]
        new_weight = f"{new}/{variable}:0"
        group.create_dataset(new_weight, data=fin[layer_name][weight_name][()])
        weight_names.append(new_weight.encode())
      group.attrs["weight_names"] = np.array(weight_names, dtype="S") if weight_names else np.array([])
    fout.attrs["layer_names"] = np.array([n.encode() for n in names], dtype="S")
    fout.attrs["keras_version"] = b"2.2.4"
    fout.attrs["backend"] = b"tensorflow"
  return pathlib.Path(dst)


def case_id(value) -> str:
  """Readable pytest ids for parity cases: resnet50-notop-avg-65x47-legacy."""
  if isinstance(value, bool):
    return "top" if value else "notop"
  if isinstance(value, tuple):
    return "x".join(map(str, value))
  return str(value)


def random_images(shape, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(0.0, 1.0, shape).astype(np.float32)


def relative_max_diff(actual, expected) -> float:
  """max |actual - expected| / max |expected|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


class KerasReference:
  """Keras models, their weight files and their outputs, each built once (tests keep one per module).

  Weights depend only on (arch, include_top): randomize_weights draws them in layer order with a fixed seed and
  pooling layers own none, so the files of one (arch, include_top) fit every pooling variant.
  """
  LAYOUTS = ("legacy", "keras3", "tf_keras")

  def __init__(self, folder: os.PathLike | str, seed: int = 0):
    self.folder = pathlib.Path(folder)
    self.seed = seed
    self._models: dict = {}
    self._files: dict = {}
    self._outputs: dict = {}

  def model(self, arch: str, include_top: bool = False, pooling: str | None = None, hw=None) -> keras.Model:
    key = (arch, include_top, None if include_top else pooling, tuple(hw) if include_top else None)
    if key not in self._models:
      self._models[key] = build_keras(arch, include_top=include_top, pooling=key[2],
                                      input_shape=(*hw, 3) if include_top else None, seed=self.seed)
    return self._models[key]

  def files(self, arch: str, include_top: bool = False, hw=(64, 64)) -> dict[str, pathlib.Path]:
    """{"legacy", "keras3", "tf_keras"} -> file, for the weights of (arch, include_top)."""
    key = (arch, include_top)
    if key not in self._files:
      model = self.model(arch, include_top, None, hw)
      stem = self.folder / f"{arch}_{'top' if include_top else 'notop'}"
      legacy = save_legacy(model, f"{stem}.h5")
      self._files[key] = {
          "legacy": legacy,
          "keras3": save_keras3(model, f"{stem}.weights.h5"),
          "tf_keras": to_tf_keras_layout(legacy, f"{stem}_tf_keras.h5", densenet=arch.startswith("densenet")),
      }
    return self._files[key]

  def images(self, hw, batch: int = 2) -> np.ndarray:
    return random_images((batch, *hw, 3), seed=self.seed + 1)

  def output(self, arch: str, include_top: bool, pooling: str | None, hw) -> np.ndarray:
    """The Keras model's inference output on `images(hw)`."""
    key = (arch, include_top, pooling, tuple(hw))
    if key not in self._outputs:
      model = self.model(arch, include_top, pooling, hw)
      call = lambda x: model(x, training=False)  # noqa: E731
      # Eager Keras compiles op by op, once per op shape: cheap for ResNets, whose ops repeat, but a DenseNet's
      # concatenations all differ, so one jit per model is faster there.
      if arch.startswith("densenet"):
        call = jax.jit(call)
      self._outputs[key] = np.asarray(call(self.images(hw)))
    return self._outputs[key]


@contextlib.contextmanager
def serve_folder(folder: os.PathLike | str):
  """Serves `folder` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL."""
  class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

  handler = functools.partial(QuietHandler, directory=str(folder))
  with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
      yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
      server.shutdown()
      thread.join()


@functools.lru_cache(maxsize=None)
def jitted_apply(model):
  """`jit(model.apply)` in inference mode, one per Flax model, so every layout's variables share one compile."""
  return jax.jit(functools.partial(model.apply, train=False))


# Keras variable name -> (Flax collection, Flax name); BatchNormalization's beta is Flax's bias.
FLAX_NAMES = {"kernel": ("params", "kernel"), "bias": ("params", "bias"), "gamma": ("params", "scale"),
              "beta": ("params", "bias"), "moving_mean": ("batch_stats", "mean"),
              "moving_variance": ("batch_stats", "var")}


def keras_variables(keras_model, model) -> dict:
  """The Keras model's own weights as the Flax model's {"params", "batch_stats"}, found without the loader.

  Checked to be the Flax model's full variable tree (every variable, shape and dtype), so a comparison with it
  fails on a loader that leaves anything out.
  """
  variables = {"params": {}, "batch_stats": {}}
  for layer in keras_model.layers:
    for weight in layer.weights:
      collection, name = FLAX_NAMES[weight.name]
      variables[collection].setdefault(layer.name, {})[name] = np.asarray(weight.value)
  # The model's variables from jax.eval_shape(model.init) (cached; the loader traced it already), as
  # zero-strided arrays of their shapes and dtypes: nothing allocated.
  shapes = weights.abstract_variables(model)
  trees.assert_same_structure(variables, jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape),
                                                      shapes))
  return variables


# ---- Small Keras ResNet v1 / DenseNet, built by Keras's own builders, and the model files users save (issue 11).

# Keras's stems are 64 wide and DenseNet's growth rate is 32; the depth and the ResNet widths are what shrink.
SMALL_RESNET_FILTERS = (4, 8, 8, 8)
# Constructor arguments of the Flax backbones (resdense_jax.models.BACKBONES) equal to `build_small_keras`.
SMALL_BACKBONE_KWARGS = {"resnet50": dict(stage_sizes=(1, 1, 1, 1), filters=SMALL_RESNET_FILTERS),
                         "densenet121": dict(blocks=(1, 1, 1, 1))}


def build_small_keras(arch: str, *, seed: int = 0, name: str | None = None, scope: str | None = None,
                      input_shape=(None, None, 3)) -> keras.Model:
  """Keras's ResNet v1 ("resnet50") or DenseNet ("densenet121") builder at one block per stage, headless, with
  random weights. `name` names the model (default `arch`); `scope` builds it inside `keras.name_scope(scope)`,
  so its weight paths carry that prefix (`resnet50/conv1_conv/kernel`)."""
  # pylint: disable=import-outside-toplevel
  from keras.src.applications import densenet as keras_densenet
  from keras.src.applications import resnet as keras_resnet

  def stack_fn(x):
    x = keras_resnet.stack_residual_blocks_v1(x, SMALL_RESNET_FILTERS[0], 1, stride1=1, name="conv2")
    for stage, filters in enumerate(SMALL_RESNET_FILTERS[1:], start=3):
      x = keras_resnet.stack_residual_blocks_v1(x, filters, 1, name=f"conv{stage}")
    return x

  builders = {
      "resnet50": lambda: keras_resnet.ResNet(stack_fn, preact=False, use_bias=True, include_top=False,
                                              weights=None, input_shape=input_shape, name=name or arch),
      "densenet121": lambda: keras_densenet.DenseNet(blocks=[1, 1, 1, 1], include_top=False, weights=None,
                                                     input_shape=input_shape, name=name or arch),
  }
  keras.backend.clear_session()  # Keras's automatic names (DenseNet's zero_padding2d) restart at 0
  with _zero_initializers(), (keras.name_scope(scope) if scope else contextlib.nullcontext()):
    model = builders[arch]()
  randomize_weights(model, seed)
  return model


def classifier(backbones, *, kind: str = "sequential", classes: int = 2) -> keras.Model:
  """A classifier around backbone model(s), as users build them for fine-tuning.

  kind "sequential": `Sequential([Input, backbone, GlobalAveragePooling2D, Dense])`, the backbone one layer of
  it; "functional" (forced for several backbones): a functional model that rescales its input and calls each
  backbone on it as a layer, pooled features added; "extended": `Model(backbone.input, head(backbone.output))`,
  the backbone's own layers followed by the head's (Keras's fine-tuning guide).
  """
  backbones = list(backbones) if isinstance(backbones, (list, tuple)) else [backbones]
  rng = np.random.default_rng(len(backbones))
  if kind == "sequential" and len(backbones) == 1:
    model = keras.Sequential([keras.Input((32, 32, 3)), backbones[0], keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(classes)])
  elif kind == "extended":
    x = keras.layers.Dense(8, activation="relu")(keras.layers.GlobalAveragePooling2D()(backbones[0].output))
    model = keras.Model(backbones[0].input, keras.layers.Dense(classes)(x))
  else:
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1.0)(inputs)
    pooled = [keras.layers.Dense(8)(keras.layers.GlobalAveragePooling2D()(b(x))) for b in backbones]
    x = keras.layers.Add()(pooled) if len(pooled) > 1 else pooled[0]
    model = keras.Model(inputs, keras.layers.Dense(classes)(x))
  for layer in model.layers:
    if isinstance(layer, keras.layers.Dense):
      layer.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32) for w in layer.get_weights()])
  return model


def save_full_h5(model: keras.Model, path: os.PathLike | str) -> pathlib.Path:
  """`model.save("x.h5")`: Keras's legacy full-model HDF5 file (config, weights under `model_weights/`)."""
  model.save(str(path))
  return pathlib.Path(path)
