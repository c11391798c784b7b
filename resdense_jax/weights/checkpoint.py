"""Converted variables as an orbax checkpoint: `<dir>/variables` (orbax) and `<dir>/metadata.json`.

The checkpoint is written into a sibling temporary folder and renamed into place, so `<dir>` either holds a
complete conversion or does not exist.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import orbax.checkpoint as ocp

from resdense_jax.weights.errors import WeightsError
from resdense_jax.weights.loader import abstract_variables

METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"


def save_converted(variables: dict[str, Any], directory: os.PathLike | str, *, metadata: dict[str, Any] | None = None,
                   overwrite: bool = False) -> pathlib.Path:
  """Writes `{"params", "batch_stats"}` (and JSON `metadata`) to `directory`."""
  directory = pathlib.Path(directory).expanduser().resolve()
  if directory.exists() and not overwrite:
    raise WeightsError(f"{directory}: already exists (pass overwrite=True / --overwrite to replace it)")
  directory.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".partial"))
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / VARIABLES_DIR, variables)
    checkpointer.wait_until_finished()
    (staging / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True) + "\n")
    if directory.exists():
      shutil.rmtree(directory)
    os.replace(staging, directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return directory


def load_converted(directory: os.PathLike | str, model: Any = None) -> dict[str, Any]:
  """Restores variables written by `save_converted`; with `model`, shapes and dtypes are checked against it."""
  directory = pathlib.Path(directory).expanduser().resolve()
  if not (directory / VARIABLES_DIR).is_dir():
    raise WeightsError(f"{directory}: not a converted weights folder (no {VARIABLES_DIR}/ inside)")
  checkpointer = ocp.StandardCheckpointer()
  if model is None:
    return checkpointer.restore(directory / VARIABLES_DIR)
  target = abstract_variables(model)
  try:
    return checkpointer.restore(directory / VARIABLES_DIR, target)
  except (ValueError, KeyError) as e:
    raise WeightsError(f"{directory}: converted weights do not fit the model: {e}") from e


def read_metadata(directory: os.PathLike | str) -> dict[str, Any]:
  path = pathlib.Path(directory).expanduser() / METADATA_FILE
  return json.loads(path.read_text()) if path.is_file() else {}


restore = load_converted

__all__ = ["save_converted", "load_converted", "restore", "read_metadata"]
