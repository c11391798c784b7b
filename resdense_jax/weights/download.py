"""Finding a published weight file: the user's Keras cache or a given folder, else a verified download.

Downloads go to a temporary file in the destination folder, are hashed while they stream, and are renamed into
place only once the MD5 matches, so neither a failed nor a corrupted download ever leaves a file that looks usable.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import tempfile
import sys
import urllib.request

try:  # The models-only install (flax + h5py) has no tqdm; downloads then report progress in plain lines.
  import tqdm
except ModuleNotFoundError:
  tqdm = None

from resdense_jax.weights import registry
from resdense_jax.weights.errors import WeightsError

_CHUNK = 1 << 20


def keras_cache_dir() -> pathlib.Path:
  """Where Keras keeps downloaded application weights: `$KERAS_HOME/models`, by default `~/.keras/models`."""
  home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
  return pathlib.Path(home) / "models"


def md5sum(path: os.PathLike | str) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def get_file(file_name: str, *, cache_dir: os.PathLike | str | None = None, download: bool = True) -> pathlib.Path:
  """The local path of the registry file `file_name`, downloading and verifying it when needed.

  Looks in `cache_dir` (the folder holding the files) if given, then in the Keras cache. A cached file whose MD5
  is wrong is downloaded again when `download` is allowed, and is an error otherwise. New downloads go to
  `cache_dir`, else to the Keras cache.
  """
  entry = registry.REGISTRY.get(file_name)
  if entry is None:
    raise WeightsError(f"{file_name}: not a published Keras weights file; known: {', '.join(registry.REGISTRY)}")
  folders = [pathlib.Path(cache_dir).expanduser()] if cache_dir is not None else []
  folders.append(keras_cache_dir())
  for folder in folders:
    path = folder / file_name
    if not path.is_file():
      continue
    actual = md5sum(path)
    if actual == entry.md5:
      return path
    if not download:
      raise WeightsError(f"{path}: hash mismatch: expected MD5 {entry.md5}, found {actual} (corrupt or partial "
                         "file; delete it or allow download)")
    return _download(entry, folder)
  if not download:
    raise WeightsError(f"{file_name}: not found in {', '.join(str(f) for f in folders)} and download is disabled; "
                       f"fetch it from {entry.url}")
  return _download(entry, folders[0])


def _download(entry: registry.KerasWeightsFile, folder: pathlib.Path) -> pathlib.Path:
  """Streams `entry.url` into `folder`, renaming into place only when the MD5 matches."""
  folder.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{entry.file_name}.", suffix=".part")
  tmp = pathlib.Path(tmp_name)
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        actual = _stream(entry, out)
      except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        raise WeightsError(f"{entry.file_name}: download from {entry.url} failed ({e}); place the file in "
                           f"{folder} or pass its path") from e
    if actual != entry.md5:
      raise WeightsError(f"{entry.file_name}: hash mismatch after download from {entry.url}: expected MD5 "
                         f"{entry.md5}, got {actual}; the downloaded file was deleted")
    target = folder / entry.file_name
    os.replace(tmp, target)
    return target
  finally:
    tmp.unlink(missing_ok=True)


def _stream(entry: registry.KerasWeightsFile, out) -> str:
  """Copies the response body into `out` with a progress bar; returns its MD5."""
  digest = hashlib.md5()
  with urllib.request.urlopen(entry.url, timeout=60) as response:
    total = int(response.headers.get("Content-Length") or 0) or None
    with _progress(total, entry.file_name) as bar:
      for chunk in iter(lambda: response.read(_CHUNK), b""):
        out.write(chunk)
        digest.update(chunk)
        bar.update(len(chunk))
  return digest.hexdigest()


class _LineProgress:
  """tqdm's `update` without tqdm: a line on stderr at every further tenth of the file (or every 10 MB)."""

  def __init__(self, total: int | None, name: str):
    self.total, self.name, self.done, self.reported = total, name, 0, 0

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    print(f"{self.name}: {self.done / 1e6:.1f} MB", file=sys.stderr, flush=True)

  def update(self, n: int) -> None:
    self.done += n
    step = self.total / 10 if self.total else 10e6
    if self.done - self.reported >= step:
      self.reported = self.done
      of = f" of {self.total / 1e6:.1f}" if self.total else ""
      print(f"{self.name}: {self.done / 1e6:.1f}{of} MB", file=sys.stderr, flush=True)


def _progress(total: int | None, name: str):
  if tqdm is None:
    return _LineProgress(total, name)
  return tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=name)
