"""Keras weight files into the flat Flax variables of `resdense_jax.models`.

The model's `keras_layers()` says which Flax variables each Keras layer's weights go to, in Keras weight order.
Legacy files are matched to it by layer name (by layer order, as Keras does, if no name at all matches: an
older naming scheme), Keras 3 files by layer order (class and counter), as Keras itself loads them. The result
is built in a fresh dict and returned only once every variable of the model is filled exactly once with the
model's shape and dtype; any problem is a WeightsError naming the file.

A file may hold more than the backbone: a full model whose backbone is one nested layer (a classifier), several
nested models, or a head after the backbone's layers. `select` takes the part whose architecture fits (or the
one named by `path#name`); a full-model file's layers after the backbone's last one are its head and skipped.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import re
from typing import Any, Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from resdense_jax.weights import download, h5, registry
from resdense_jax.weights.errors import WeightsError

_RESNETS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101", (3, 8, 36, 3): "resnet152"}
_RESNETS_V2 = {sizes: f"{arch}v2" for sizes, arch in _RESNETS.items()}
_DENSENETS = {(6, 12, 24, 16): "densenet121", (6, 12, 32, 32): "densenet169", (6, 12, 48, 32): "densenet201"}
# (Conv2D, BatchNormalization) layers of each named backbone; identifies a Keras 3 file that does not record
# layer names. Convs: ResNet v1 and v2 1 + 3 per block + 4 shortcuts, DenseNet 1 + 2 per block + 3 transitions.
# BatchNorms tell the ResNets apart: v1 one per conv, v2 3 per block + post_bn; DenseNet 2 per block + 5.
_LAYER_COUNTS = {**{(1 + 3 * sum(s) + 4, 1 + 3 * sum(s) + 4): a for s, a in _RESNETS.items()},
                 **{(1 + 3 * sum(s) + 4, 3 * sum(s) + 1): a for s, a in _RESNETS_V2.items()},
                 **{(1 + 2 * sum(b) + 3, 2 * sum(b) + 5): a for b, a in _DENSENETS.items()}}
# Keras variable names of a Flax leaf, per Keras class (BatchNormalization's beta is Flax's bias).
_KERAS_VARIABLE = {"scale": "gamma", "mean": "moving_mean", "var": "moving_variance"}
_SHOWN = 5
_log = logging.getLogger(__name__)


def describe_architecture(layer_names: Sequence[str]) -> str | None:
  """"resnet101", "resnet50v2", "densenet121", "a ResNet with stage sizes (1, 1, 1, 1)", ... from layer names."""
  kind = None
  if any(re.fullmatch(r"conv\d+_block\d+_preact_bn", n) for n in layer_names):
    kind, pattern, known = "ResNet v2", r"conv(\d+)_block(\d+)_3_conv", _RESNETS_V2
  elif any(re.fullmatch(r"conv\d+_block\d+_3_conv", n) for n in layer_names):
    kind, pattern, known = "ResNet", r"conv(\d+)_block(\d+)_3_conv", _RESNETS
  elif any(re.fullmatch(r"conv\d+_block\d+_2_conv", n) for n in layer_names):
    kind, pattern, known = "DenseNet", r"conv(\d+)_block(\d+)_2_conv", _DENSENETS
  if kind is None:
    return None
  blocks: dict[int, int] = {}
  for n in layer_names:
    if m := re.fullmatch(pattern, n):
      blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]))
  sizes = tuple(blocks[s] for s in sorted(blocks))
  return known.get(sizes, f"a {kind} with {'stage sizes' if kind.startswith('ResNet') else 'blocks'} {sizes}")


def _describe_file(weights: h5.KerasWeightsH5) -> str | None:
  if len(weights.names) == len(weights.layers):
    return describe_architecture(weights.names)
  convs = sum(1 for layer in weights.layers if re.fullmatch(r"conv2d(_\d+)?", layer.key))
  batch_norms = sum(1 for layer in weights.layers if re.fullmatch(r"batch_normalization(_\d+)?", layer.key))
  return _LAYER_COUNTS.get((convs, batch_norms))


def _has_top(weights: h5.KerasWeightsH5) -> bool:
  return any(layer.name == "predictions" or (layer.name is None and re.fullmatch(r"dense(_\d+)?", layer.key))
             for layer in weights.layers)


def _snake_case(class_name: str) -> str:
  """Keras's saving key for a class: Conv2D -> conv2d, BatchNormalization -> batch_normalization."""
  name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", re.sub(r"\W+", "", class_name))
  return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _listing(names: Sequence[str]) -> str:
  shown = ", ".join(names[:_SHOWN])
  return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def abstract_variables(model: Any) -> dict[str, Any]:
  """The model's variables as ShapeDtypeStructs (nothing computed or allocated)."""
  return _abstract_variables(model.clone(parent=None))


@functools.lru_cache(maxsize=32)
def _abstract_variables(model: Any) -> dict[str, Any]:
  # Tracing a ResNet152 takes seconds; modules are frozen dataclasses, so equal models share the result.
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)


def resolve(model: Any, path_or_name: os.PathLike | str, *, cache_dir=None, download_ok: bool = True) -> pathlib.Path:
  """An existing path as is; a published file name (or "imagenet": the model's own file) through the cache."""
  path = pathlib.Path(path_or_name).expanduser()
  if path.is_file():
    return path
  if str(path_or_name) == "imagenet":
    names = [layer.name for layer in model.keras_layers()]
    arch = describe_architecture(names)
    try:
      entry = registry.registry_entry(arch, "predictions" in names)
    except KeyError as e:
      raise WeightsError(f"imagenet: no published Keras weights for a model that is "
                         f"{arch or 'not a Keras ResNet/DenseNet'}") from e
    return download.get_file(entry.file_name, cache_dir=cache_dir, download=download_ok)
  if path.name in registry.REGISTRY and path.parent == pathlib.Path("."):
    return download.get_file(path.name, cache_dir=cache_dir, download=download_ok)
  raise WeightsError(f"{path}: no such file (nor a published Keras weights file name)")


def split_submodel(path_or_name: os.PathLike | str) -> tuple[str, str | None]:
  """`"x.h5#resnet50"` -> ("x.h5", "resnet50"): a file and the nested model to take from it (an existing file
  whose name holds "#" is taken as is)."""
  text = str(path_or_name)
  if "#" in text and not pathlib.Path(text).expanduser().is_file():
    text, submodel = text.rsplit("#", 1)
    return text, submodel
  return text, None


def load_keras(model: Any, path_or_name: os.PathLike | str, *, cache_dir: os.PathLike | str | None = None,
               download: bool = True, submodel: str | None = None) -> dict[str, Any]:
  """Keras weights for `model` as `{"params", "batch_stats"}`.

  `path_or_name`: a Keras file (legacy .h5 weights or full model from `model.save("x.h5")`, Keras 3 .weights.h5 or
  .keras), a published file name from `weights.REGISTRY` (found in `cache_dir` or `~/.keras/models`, downloaded
  and MD5-verified when absent), or "imagenet" for the published file that fits the model. A file whose weights
  sit in a model nested in a larger one (a backbone inside a classifier) is read from the nested model that fits;
  `submodel` (or a `#<name>` suffix on the path) names it where several would.
  """
  _refuse_several_backbones(model, path_or_name)
  path_or_name, suffix = split_submodel(path_or_name)
  path = resolve(model, path_or_name, cache_dir=cache_dir, download_ok=download)
  return assign(model, h5.read(path), submodel=submodel or suffix)


def _refuse_several_backbones(model: Any, source: Any) -> None:
  """A model whose keras_layers() is {backbone: layers} (ResDenseNet) is not one Keras model: say what to call."""
  if not hasattr(model, "backbone_modules"):
    return
  names = list(model.backbone_modules())
  raise WeightsError(
      f"{source}: load_keras fills one Keras backbone, but {type(model).__name__} holds the backbones {names} and "
      f"a fusion head no Keras file has; use `variables = model.pretrained({str(source)!r}, rng=...)` (each backbone "
      f"from its Keras weights, the rest initialised from rng), or load one backbone: "
      f"weights.load_keras(model.backbone_modules()[{names[0]!r}], {str(source)!r})")


def assign(model: Any, weights: h5.KerasWeightsH5, *, submodel: str | None = None) -> dict[str, Any]:
  """Maps the weights read from a file (its top level or the nested model that fits) onto the model's
  variables."""
  _refuse_several_backbones(model, weights.source)
  keras_layers = model.keras_layers()
  weights = select(weights, keras_layers, submodel)
  _check_architecture(weights, [layer.name for layer in keras_layers])
  if weights.layout == "legacy":
    pairs = _match_by_name(weights, keras_layers)
  else:
    pairs = _match_by_order(weights, keras_layers)
  expected = flax.traverse_util.flatten_dict(abstract_variables(model))
  flat: dict[tuple[str, ...], jax.Array] = {}
  for keras_layer, file_layer in pairs:
    _fill(weights.source, keras_layer, file_layer, expected, flat)
  unfilled = [path for path in expected if path not in flat]
  if unfilled:
    raise WeightsError(f"{weights.source}: the model's keras_layers() leaves variables unfilled: "
                       f"{_listing(['/'.join(p) for p in unfilled])}")
  return flax.traverse_util.unflatten_dict(flat)


def select(weights: h5.KerasWeightsH5, keras_layers, submodel: str | None = None) -> h5.KerasWeightsH5:
  """The part of a file to load: the named nested model, else the file itself when it holds no nested model,
  else the one part (top level or nested model) whose layers fit the model's architecture."""
  candidates = weights.candidates()
  if submodel is not None:
    for candidate in candidates:
      if candidate.submodel == submodel:
        return candidate
    raise WeightsError(f"{weights.path}: no sub-model {submodel!r}; the file holds {_inventory(weights)}")
  if len(candidates) == 1:
    return weights
  fitting = [c for c in candidates if c.layers and _fits(c, keras_layers)]
  if len(fitting) == 1:
    if fitting[0] is not weights:
      _log.info("%s: loading the nested model %r", weights.path, fitting[0].submodel)
    return fitting[0]
  model_arch = describe_architecture([layer.name for layer in keras_layers]) or "this model's"
  if fitting:
    named = [c for c in fitting if c.submodel is not None]
    raise WeightsError(f"{weights.path}: ambiguous: {len(fitting)} parts of the file fit {model_arch} weights "
                       f"({_inventory(weights, fitting)}); name one by appending #<sub-model> to the path, "
                       f"e.g. {weights.path}#{named[-1].submodel}")
  raise WeightsError(f"{weights.path}: wrong architecture: no part of the file holds {model_arch} weights; it "
                     f"holds {_inventory(weights)}")


def _fits(weights: h5.KerasWeightsH5, keras_layers) -> bool:
  """Whether these weights look like the model's: the same architecture where both can be named, else every
  weighted layer name of the model present (or, without stored names, as many weighted layers)."""
  model_arch, file_arch = describe_architecture([layer.name for layer in keras_layers]), _describe_file(weights)
  if model_arch and file_arch:
    return model_arch == file_arch
  weighted = [layer for layer in keras_layers if layer.weights]
  if len(weights.names) == len(weights.layers):
    return {layer.name for layer in weighted} <= set(weights.names)
  return len(weighted) == len(weights.layers)


def _inventory(weights: h5.KerasWeightsH5, parts: Sequence[h5.KerasWeightsH5] | None = None) -> str:
  """"the top level: 1 layer(s) with weights (dense); sub-model 'resnet50': resnet50 weights (53 layers with
  weights)": what each part of a file holds, for errors."""
  described = []
  for part in weights.candidates() if parts is None else parts:
    if not part.layers and part.submodel is None:
      continue  # a top level that only wraps nested models
    where = "the top level" if part.submodel is None else f"sub-model {part.submodel!r}"
    arch = _describe_file(part) if part.layers else None
    names = part.names if len(part.names) == len(part.layers) else [layer.key for layer in part.layers]
    what = (f"{arch} weights ({len(part.layers)} layers with weights)" if arch else
            f"{len(part.layers)} layer(s) with weights" + (f" ({_listing(names)})" if names else ""))
    described.append(f"{where}: {what}")
  return "; ".join(described)


def _check_architecture(weights: h5.KerasWeightsH5, model_names: list[str]) -> None:
  model_arch, file_arch = describe_architecture(model_names), _describe_file(weights)
  if model_arch and file_arch and model_arch != file_arch:
    raise WeightsError(f"{weights.source}: wrong architecture: the file holds {file_arch} weights, the model is "
                       f"{model_arch}")
  model_top, file_top = "predictions" in model_names, _has_top(weights)
  if model_top != file_top:
    raise WeightsError(
        f"{weights.source}: top mismatch: the file {'has' if file_top else 'has no'} classification top "
        f"(`predictions`) but the model was built with include_top={model_top}; use the "
        f"{'_notop' if model_top is False else 'with-top'} file or change include_top")


def _match_by_name(weights: h5.KerasWeightsH5, keras_layers) -> list[tuple[Any, h5.FileLayer]]:
  by_name: dict[str, h5.FileLayer] = {}
  for layer in weights.layers:
    if layer.name in by_name:
      raise WeightsError(f"{weights.source}: layer {layer.name!r} stored twice ({by_name[layer.name].key!r} and "
                         f"{layer.key!r})")
    by_name[layer.name] = layer
  weighted = [layer for layer in keras_layers if layer.weights]
  if len(weighted) == len(weights.layers) and not any(layer.name in by_name for layer in weighted):
    # No name in common (an older naming scheme): Keras itself loads legacy files by layer order, so do that,
    # still checking every count and shape.
    _log.info("%s: no layer name matches the model's, matching %d layers by order", weights.source, len(weighted))
    return list(zip(weighted, weights.layers))
  missing = [layer.name for layer in weighted if layer.name not in by_name]
  if missing:
    raise WeightsError(f"{weights.source}: missing layer(s) the model needs: {_listing(missing)}")
  model_names = {layer.name for layer in weighted}
  extra = [i for i, layer in enumerate(weights.layers) if layer.name not in model_names]
  if extra:
    last = max(i for i, layer in enumerate(weights.layers) if layer.name in model_names)
    keys = [weights.layers[i].key for i in extra]
    if not (weights.full_model and min(extra) > last):
      raise WeightsError(f"{weights.source}: extra layer(s) with weights the model does not have: {_listing(keys)}")
    # A full model that extends the backbone's graph (Model(base.input, head(base.output))): Keras lists the
    # head's layers after every backbone layer; they are not backbone weights.
    _log.info("%s: skipping the layers after the backbone's (the saved model's head): %s", weights.source,
              _listing(keys))
  return [(layer, by_name[layer.name]) for layer in weighted]


def _match_by_order(weights: h5.KerasWeightsH5, keras_layers) -> list[tuple[Any, h5.FileLayer]]:
  by_key = {layer.key: layer for layer in weights.layers}
  counters: dict[str, int] = {}
  pairs, missing = [], []
  for layer in keras_layers:
    snake = _snake_case(layer.class_name)
    k = counters[snake] = counters.get(snake, -1) + 1
    key = snake if k == 0 else f"{snake}_{k}"
    if not layer.weights:
      continue
    if key not in by_key:
      missing.append(f"{layer.name} (layers/{key})")
      continue
    stored_name = by_key[key].name
    if stored_name is not None and stored_name != layer.name:
      raise WeightsError(f"{weights.source}: layers/{key} is layer {stored_name!r} in the file but {layer.name!r} "
                         "in the model: the layer order differs")
    pairs.append((layer, by_key.pop(key)))
  if missing:
    raise WeightsError(f"{weights.source}: missing layer(s) the model needs: {_listing(missing)}")
  if by_key:
    extra = [f"layers/{key}" + (f" ({layer.name})" if layer.name else "") for key, layer in by_key.items()]
    raise WeightsError(f"{weights.source}: extra layer(s) with weights the model does not have: {_listing(extra)}")
  return pairs


def _fill(path, keras_layer, file_layer: h5.FileLayer, expected, flat) -> None:
  """Puts one layer's arrays into `flat`, checking count, variable names (legacy), shapes."""
  if len(file_layer.values) != len(keras_layer.weights):
    raise WeightsError(f"{path}: layer {keras_layer.name!r} has {len(file_layer.values)} weight(s) in the file, "
                       f"the model expects {len(keras_layer.weights)} "
                       f"({', '.join(p[-1] for p in keras_layer.weights)})")
  for variable, stored_name, value in zip(keras_layer.weights, file_layer.weight_names, file_layer.values):
    keras_name = _KERAS_VARIABLE.get(variable[-1], variable[-1])
    if keras_layer.class_name == "BatchNormalization" and variable[-1] == "bias":
      keras_name = "beta"
    if not stored_name.isdigit() and stored_name != keras_name:
      raise WeightsError(f"{path}: layer {keras_layer.name!r} stores {stored_name!r} where Keras order has "
                         f"{keras_name!r}")
    if variable not in expected:
      raise WeightsError(f"{path}: keras_layers() names {'/'.join(variable)}, which the model does not have")
    if variable in flat:
      raise WeightsError(f"{path}: variable {'/'.join(variable)} would be filled twice")
    want = expected[variable]
    if tuple(value.shape) != tuple(want.shape):
      raise WeightsError(f"{path}: shape mismatch in layer {keras_layer.name!r}, weight {keras_name!r}: the model "
                         f"expects {tuple(want.shape)}, the file has {tuple(value.shape)}")
    if not np.issubdtype(value.dtype, np.floating):
      raise WeightsError(f"{path}: layer {keras_layer.name!r} weight {keras_name!r} has dtype {value.dtype}, "
                         "expected floating point")
    flat[variable] = jnp.asarray(value, dtype=want.dtype)
