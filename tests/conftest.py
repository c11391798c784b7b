"""Test-wide setup: the JAX CPU backend, Keras 3 on JAX as the reference implementation."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
  """The real CT scans in ../shared/data; tests that need them skip only where that folder is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real CT data not present at {SHARED_DATA}")
  return SHARED_DATA
