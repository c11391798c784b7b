"""config.model.pretrained: which Keras weights each backbone starts from, and the record of the files a run read.

`load_backbones` fills each backbone's sub-tree from these values: the training engine (`train.load_pretrained`)
and `models.ResDenseNet.pretrained` both call it; `field` names the setting in its errors.

Accepted values (configs/common.py declares the field with type `object`, so a Python config may assign a dict
and `--config.model.pretrained=...` parses a literal):

- "imagenet": Keras Applications' published file for each backbone (found in the cache, MD5-verified);
- "none" (or ""): the initial weights, no file;
- a path: every backbone reads that file (a backbone's own weights file, or a full model holding the backbones
  as nested models: each takes the nested model that fits it); `path#name` takes the nested model `name`;
- per backbone, `{"resnet50": "/w/RadImageNet-ResNet50_notop.h5", "densenet121": "imagenet"}` (a dict, its JSON
  text, or `resnet50=/w/a.h5,densenet121=imagenet`), each value one of the above; every backbone needs one.

Explicit paths are not MD5-checked (there is no published hash); `record` says what each backbone starts from
(source, file, MD5, size in bytes), and the run keeps that in its config.json.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Sequence

from resdense_jax.weights import download, loader, registry
from resdense_jax.weights.errors import WeightsError

IMAGENET = "imagenet"
NONE = "none"
FIELD = "config.model.pretrained"
# The top-level key of a run's config.json that holds `record`.
RECORD_KEY = "pretrained_weights"


def per_backbone(value: Any, backbones: Sequence[str], *, field: str = FIELD) -> dict[str, str]:
  """{backbone: "imagenet" | "none" | path} from config.model.pretrained (forms in the module docstring);
  `field` names the setting in errors (the config field, or `weights` of `ResDenseNet.pretrained`)."""
  backbones = list(backbones)
  where = "config.model.backbones" if field == FIELD else "the model's backbones"
  if isinstance(value, str):
    value = value.strip()
    if value.startswith("{"):
      try:
        value = json.loads(value)
      except json.JSONDecodeError as e:
        raise ValueError(f"{field}: {value!r} is not a JSON object ({e}); write "
                         '{"resnet50": "/w/a.h5", "densenet121": "imagenet"}') from e
    elif "=" in value and not pathlib.Path(value).expanduser().is_file():
      value = dict(_key_value(part, value, field) for part in value.split(","))
  if isinstance(value, Mapping):
    entries = {str(k): v for k, v in dict(value).items()}
    unknown = [k for k in entries if k not in backbones]
    if unknown:
      raise ValueError(f"{field}: key {unknown[0]!r} is not one of {where} {tuple(backbones)}")
    missing = [b for b in backbones if b not in entries]
    if missing:
      raise ValueError(f"{field}: no value for backbone {missing[0]!r}; give each of {tuple(backbones)} "
                       f"'{IMAGENET}', '{NONE}' or a file, e.g. {{{missing[0]!r}: '{IMAGENET}'}}")
    return {b: _single(entries[b], f"{field}[{b!r}]") for b in backbones}
  single = _single(value, field)
  return {b: single for b in backbones}


def _key_value(part: str, text: str, field: str) -> tuple[str, str]:
  key, sep, val = part.partition("=")
  if not sep or not key.strip():
    raise ValueError(f"{field}: {text!r}: expected backbone=value pairs separated by commas, got {part!r}")
  return key.strip(), val.strip()


def _single(value: Any, where: str) -> str:
  if value is None:
    return NONE
  if isinstance(value, os.PathLike):
    value = os.fspath(value)
  if not isinstance(value, str):
    raise ValueError(f"{where}: expected '{IMAGENET}', '{NONE}' or the path of a Keras weights file, got "
                     f"{value!r} ({type(value).__name__})")
  value = value.strip()
  return NONE if value in ("", NONE) else value


def imagenet_hint(keras_name: str, field: str = FIELD) -> str:
  """How to get a backbone's published ImageNet file when it is missing (command-line options for the config
  field, keyword arguments otherwise)."""
  where, scratch = (("--config.model.weights_dir", f"--{FIELD}=none") if field == FIELD else
                    ("the folder passed as cache_dir=", f"{field}='{NONE}'"))
  return (f"Get them with `python -m resdense_jax.weights` (see its --help), or let Keras download them once "
          f"(keras.applications.{keras_name}(weights='imagenet', include_top=False)), or put the published .h5 "
          f"files into {where}; or start from random weights with {scratch}.")


def load_backbones(model: Any, variables: Mapping[str, Any], value: Any, *, cache_dir=None, download: bool = True,
                   field: str = FIELD) -> dict[str, Any]:
  """`variables` with each backbone's sub-tree (`params[name]`, `batch_stats[name]`) replaced by the Keras
  weights `value` names for it (any form of the module docstring); backbones set to "none" keep theirs.

  `model` is a ResDenseNet (anything with `backbone_modules()`); each backbone goes through `loader.load_keras`
  with all of its checks. Errors name the backbone, the file and `field`.
  """
  modules = model.backbone_modules()
  sources = per_backbone(value, list(modules), field=field)
  params, batch_stats = dict(variables["params"]), dict(variables.get("batch_stats", {}))
  for name, module in modules.items():
    if sources[name] == NONE:
      continue
    loaded = load_backbone(name, module, sources[name], cache_dir=cache_dir, download=download, field=field)
    params[name], batch_stats[name] = loaded["params"], loaded["batch_stats"]
  return {"params": params, "batch_stats": batch_stats}


def load_backbone(name: str, module: Any, source: str, *, cache_dir=None, download: bool = True,
                  field: str = FIELD) -> dict[str, Any]:
  """One backbone's Keras weights from "imagenet", a published file name or a path (`path#sub-model`)."""
  if source != IMAGENET and source not in registry.REGISTRY:
    explicit_file(name, source, field=field)  # a missing file says which backbone and which setting
  try:
    return loader.load_keras(module, source, cache_dir=cache_dir, download=download)
  except WeightsError as e:
    if source == IMAGENET:
      raise WeightsError(f"ImageNet weights for {name}: {e}\n{imagenet_hint(type(module).__name__, field)}") from e
    raise WeightsError(f"{e} ({field} for backbone {name!r})") from e


def record(model: Any, model_config, *, download_ok: bool) -> dict[str, dict]:
  """What each backbone of `model` (a ResDenseNet) starts from, for config.json.

  {backbone: {"source", "file", "md5", "bytes", "md5_verified"}}: the value as configured, the file's absolute
  path, its MD5 and size. "imagenet" also gives "registry_file"; its MD5 is the registry's, which the loader
  enforces, and "file"/"bytes" are null while the file is not downloaded yet (`download_ok=False`).
  Raises WeightsError (naming the backbone and the file) for a path that does not exist.
  """
  modules = model.backbone_modules()
  sources = per_backbone(model_config.pretrained, list(modules))
  cache_dir = model_config.get("weights_dir") or None
  out = {}
  for name, source in sources.items():
    if source == NONE:
      out[name] = {"source": NONE}
    elif source == IMAGENET or source in registry.REGISTRY:
      out[name] = _registry_record(name, modules[name], source, model_config, cache_dir, download_ok)
    else:
      path, submodel = explicit_file(name, source)
      out[name] = {"source": source, "file": str(path.absolute()), "md5": download.md5sum(path),
                   "bytes": path.stat().st_size, "md5_verified": False}
      if submodel:
        out[name]["submodel"] = submodel
  return out


def explicit_file(name: str, source: str, *, field: str = FIELD) -> tuple[pathlib.Path, str | None]:
  """(file, nested model or None) of a configured path (`path` or `path#name`); the file must exist."""
  file_part, submodel = loader.split_submodel(source)
  path = pathlib.Path(file_part).expanduser()
  if not path.is_file():
    raise WeightsError(f"{path}: no such file ({field} for backbone {name!r}; {field} must be 'imagenet' or "
                       "'none', the path of a Keras weights file, or one such value per backbone)")
  return path, submodel


def _registry_record(name: str, module: Any, source: str, model_config, cache_dir, download_ok: bool) -> dict:
  if source == IMAGENET:
    entry = _imagenet_entry(name, module, model_config)
  else:
    entry = registry.REGISTRY[source]
  try:
    path = download.get_file(entry.file_name, cache_dir=cache_dir,
                             download=download_ok and bool(model_config.get("download_weights", True)))
  except WeightsError as e:
    if download_ok:
      raise WeightsError(f"ImageNet weights for {name}: {e}\n{imagenet_hint(type(module).__name__)}") from e
    path = None  # fetched when training starts; the loader accepts only a file with the registry's MD5
  return {"source": source, "registry_file": entry.file_name, "file": str(path.absolute()) if path else None,
          "md5": entry.md5, "bytes": path.stat().st_size if path else None, "md5_verified": path is not None}


def _imagenet_entry(name: str, module: Any, model_config) -> registry.KerasWeightsFile:
  """The published file of a headless backbone. A backbone with its default architecture is looked up by
  name (no trace: dry runs of the paper's ResNet152 + DenseNet201 stay fast); others by their traced layers."""
  if not dict(model_config.get("backbone_kwargs") or {}).get(name):
    try:
      return registry.registry_entry(name, False)
    except KeyError:
      pass
  names = [layer.name for layer in module.keras_layers()]
  arch = loader.describe_architecture(names)
  try:
    return registry.registry_entry(arch, "predictions" in names)
  except KeyError as e:
    raise WeightsError(f"{IMAGENET}: no published Keras weights for backbone {name!r}, a model that is "
                       f"{arch or 'not a Keras ResNet/DenseNet'}; set {FIELD} for it to a file or 'none'") from e


def run_record(model: Any, model_config, workdir: pathlib.Path, *, download_ok: bool) -> dict[str, dict]:
  """`record` for a run in `workdir`. A run resuming from a checkpoint did not read the files again: it keeps the
  record its config.json already has (what it started from), and downloads nothing."""
  resuming = (workdir / "checkpoints").is_dir() and any(
      p.name.isdigit() for p in (workdir / "checkpoints").iterdir())
  if resuming:
    previous = _saved_record(workdir / "config.json")
    current = per_backbone(model_config.pretrained, list(model.backbones))
    if previous and {k: v.get("source") for k, v in previous.items()} == current:
      return previous
  return record(model, model_config, download_ok=download_ok and not resuming)


def _saved_record(path: pathlib.Path) -> dict | None:
  try:
    return json.loads(path.read_text()).get(RECORD_KEY)
  except (OSError, ValueError, AttributeError):
    return None

