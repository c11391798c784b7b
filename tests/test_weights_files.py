"""The registry of published Keras files, finding/downloading/verifying them, and unreadable files.

Downloads are tested against a local HTTP server on 127.0.0.1 serving a small Keras weight file.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import sys

import keras
import pytest

import keras_fixtures as kf
from resdense_jax import models, weights
from resdense_jax.weights import __main__ as cli

NAME = "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"


def test_registry_matches_keras_applications():
  from keras.src.applications import densenet, resnet
  densenet_source = pathlib.Path(densenet.__file__).read_text()
  assert len(weights.REGISTRY) == 18
  for name, entry in weights.REGISTRY.items():
    assert name == entry.file_name
    assert name == f"{entry.arch}_weights_tf_dim_ordering_tf_kernels{'' if entry.include_top else '_notop'}.h5"
    if entry.arch.startswith("resnet"):
      assert entry.url == resnet.BASE_WEIGHTS_PATH + name
      assert entry.md5 == resnet.WEIGHTS_HASHES[entry.arch][0 if entry.include_top else 1]
    else:
      assert entry.url == densenet.BASE_WEIGHTS_PATH + name
      # Keras lists DenseNet hashes inline: the file name, then its hash, in one get_file call.
      call = re.search(r"get_file\(\s*" + re.escape(f'"{name}"') + r',[^)]*?file_hash="([0-9a-f]{32})"',
                       densenet_source)
      assert call is not None and call[1] == entry.md5
  assert weights.registry_entry("resnet101", False).file_name == "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5"
  assert set(models.BACKBONES) == {e.arch for e in weights.REGISTRY.values()}


@pytest.fixture(scope="module")
def small_h5(tmp_path_factory):
  """A small real Keras legacy weight file to serve and to damage."""
  keras.backend.clear_session()
  model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv1_conv"),
                            keras.layers.BatchNormalization(name="conv1_bn")])
  return kf.save_legacy(model, tmp_path_factory.mktemp("small") / "small.h5")


@pytest.fixture
def served(small_h5, tmp_path, monkeypatch):
  """The small file served on 127.0.0.1 as the registry's NAME; KERAS_HOME points into tmp_path."""
  folder = tmp_path / "served"
  folder.mkdir()
  (folder / NAME).write_bytes(small_h5.read_bytes())
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
  with kf.serve_folder(folder) as base_url:
    entry = dataclasses.replace(weights.REGISTRY[NAME], url=f"{base_url}/{NAME}", md5=weights.md5sum(folder / NAME))
    monkeypatch.setitem(weights.REGISTRY, NAME, entry)
    yield entry


def test_download_into_keras_cache(served, tmp_path, small_h5):
  path = weights.get_file(NAME)
  assert path == tmp_path / "keras_home" / "models" / NAME
  assert path.read_bytes() == small_h5.read_bytes()
  assert sorted(p.name for p in path.parent.iterdir()) == [NAME]  # no temporary file left behind
  assert weights.get_file(NAME, download=False) == path  # found in the cache


def test_download_into_given_folder(served, tmp_path):
  folder = tmp_path / "mine"
  path = weights.get_file(NAME, cache_dir=folder)
  assert path == folder / NAME and weights.md5sum(path) == served.md5
  assert not (tmp_path / "keras_home" / "models" / NAME).exists()


def test_hash_mismatch_on_download_deletes_the_file(served, tmp_path, monkeypatch):
  wrong = dataclasses.replace(served, md5="0" * 32)
  monkeypatch.setitem(weights.REGISTRY, NAME, wrong)
  folder = tmp_path / "cache"
  with pytest.raises(weights.WeightsError, match=f"{NAME}: hash mismatch.*expected MD5 {'0' * 32}, got "
                                                 f"{served.md5}"):
    weights.get_file(NAME, cache_dir=folder)
  assert list(folder.iterdir()) == []


def test_hash_mismatch_in_cache(served, tmp_path):
  folder = tmp_path / "cache"
  folder.mkdir()
  (folder / NAME).write_bytes(b"\x89HDF\r\n\x1a\nnot really")
  actual = weights.md5sum(folder / NAME)
  with pytest.raises(weights.WeightsError, match=f"{re.escape(str(folder / NAME))}: hash mismatch: expected MD5 "
                                                 f"{served.md5}, found {actual}"):
    weights.get_file(NAME, cache_dir=folder, download=False)
  # Allowed to download, the bad copy is replaced by a verified one.
  assert weights.md5sum(weights.get_file(NAME, cache_dir=folder)) == served.md5


def test_download_failure_is_reported(served, tmp_path, monkeypatch):
  monkeypatch.setitem(weights.REGISTRY, NAME, dataclasses.replace(served, url=served.url + ".missing"))
  with pytest.raises(weights.WeightsError, match=f"{NAME}: download from .*failed.*404"):
    weights.get_file(NAME, cache_dir=tmp_path / "cache")
  assert list((tmp_path / "cache").iterdir()) == []


def test_absent_without_download(tmp_path, monkeypatch):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
  with pytest.raises(weights.WeightsError, match=f"{NAME}: not found in .*download is disabled"):
    weights.load_keras(models.DenseNet121(), NAME, download=False)


def test_unknown_file(tmp_path):
  with pytest.raises(weights.WeightsError, match="no such file"):
    weights.load_keras(models.ResNet50(), tmp_path / "nothing.h5")
  with pytest.raises(weights.WeightsError, match="not a published Keras weights file"):
    weights.get_file("resnet18.h5")


def test_truncated_file(small_h5, tmp_path):
  path = tmp_path / "truncated.h5"
  path.write_bytes(small_h5.read_bytes()[: small_h5.stat().st_size // 2])
  with pytest.raises(weights.WeightsError, match=f"{re.escape(str(path))}: truncated or corrupt HDF5 file"):
    weights.load_keras(models.ResNet50(), path)


def test_not_hdf5(tmp_path):
  path = tmp_path / "page.h5"
  path.write_bytes(b"<html><body>quota exceeded</body></html>")
  with pytest.raises(weights.WeightsError, match=f"{re.escape(str(path))}: not an HDF5 file"):
    weights.load_keras(models.ResNet50(), path)


def test_hdf5_without_keras_weights(tmp_path):
  import h5py
  path = tmp_path / "other.h5"
  with h5py.File(path, "w") as f:
    f["x"] = [1.0]
  with pytest.raises(weights.WeightsError, match=f"{re.escape(str(path))}: HDF5 file without Keras weights"):
    weights.load_keras(models.ResNet50(), path)


def test_unrelated_keras_file(small_h5):
  # Too little to identify: reported as the layers the model misses.
  with pytest.raises(weights.WeightsError, match=f"{re.escape(str(small_h5))}: missing layer.*conv2_block1_1_conv"):
    weights.load_keras(models.ResNet50(), small_h5)


def test_list_cli(capsys):
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out
  for entry in weights.REGISTRY.values():
    assert entry.file_name in out and entry.md5 in out


def test_module_entry_point():
  result = subprocess.run([sys.executable, "-m", "resdense_jax.weights", "list"], capture_output=True, text=True,
                          timeout=120, check=True)
  assert "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5" in result.stdout
