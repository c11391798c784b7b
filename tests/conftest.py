"""Test-wide setup: the JAX CPU backend, Keras 3 on JAX as the reference implementation, one XLA cache per worker."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Many tests compile the same small programs (a run, a killed run, its resumption, the CLI in-process): a
# compilation cache private to this test process compiles each once. It is set here, for every test, so that
# no test's behaviour depends on which other test module happened to be imported first.
XLA_CACHE_DIR = tempfile.mkdtemp(prefix="resdense_jax_test_xla_")
jax.config.update("jax_compilation_cache_dir", XLA_CACHE_DIR)
# Command lines run in subprocesses use it too, instead of the library's default folder in the home directory.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def shared_data() -> pathlib.Path:
  """The real CT scans in ../shared/data; tests that need them skip only where that folder is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real CT data not present at {SHARED_DATA}")
  return SHARED_DATA


def pytest_collection_modifyitems(items):
  """Files holding `slow` tests first, each group otherwise in the (random) order pytest-randomly chose.

  Under `pytest -n 2 --dist loadfile` the files are handed to the workers in this order: a multi-minute file
  handed out last would leave the other worker idle while it runs (the suite took 7.4 to 10.8 minutes by the
  shuffle alone). A stable sort, so that the seed still reproduces the order.
  """
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)
