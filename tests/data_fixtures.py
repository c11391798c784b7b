"""Shared helpers for the data tests: small synthetic collections and the real CT data folder."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from resdense_jax.data import synthetic

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_DICOM = SHARED_DATA / "chest_ct_dicom"
REAL_NIFTI = SHARED_DATA / "chest_ct_nifti" / "chest_ct.nii.gz"

needs_real_dicom = pytest.mark.skipif(not REAL_DICOM.is_dir(), reason=f"{REAL_DICOM} absent")
needs_real_nifti = pytest.mark.skipif(not REAL_NIFTI.is_file(), reason=f"{REAL_NIFTI} absent")

SMALL = {"train": (4, 4), "validation": (2, 2), "test": 2}
_CACHE: dict = {}


def small_collection(tmp_path_factory, name: str = "small", **kwargs) -> Path:
  """A synthetic COV19-CT-DB collection, written once per test process."""
  key = (name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
  if key not in _CACHE:
    root = tmp_path_factory.mktemp("collections") / name
    options = {"num_scans": SMALL, "slice_size": 64, "num_slices": (6, 10), "seed": 0,
               "progress": False}
    options.update(kwargs)
    _CACHE[key] = synthetic.write_collection(root, **options)
  return _CACHE[key]


def write_image_scan(folder: Path, slices, names=None, suffix=".jpg") -> Path:
  """Writes uint8 slices as images named `names` (default 0.jpg, 1.jpg, ...)."""
  folder.mkdir(parents=True, exist_ok=True)
  for i, image in enumerate(slices):
    name = names[i] if names else f"{i}{suffix}"
    cv2.imwrite(str(folder / name), np.asarray(image, np.uint8))
  return folder


def numbered_slices(n: int, size: int = 16) -> np.ndarray:
  """Slices whose constant grey value encodes their index (survives JPEG)."""
  return np.stack([np.full((size, size), 10 + 20 * i, np.uint8) for i in range(n)])
