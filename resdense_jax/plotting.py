"""Plotting that reports.py and explain.py share: headless matplotlib and atomic PNG writes."""

from __future__ import annotations

import functools
import os
import pathlib
import tempfile


@functools.cache
def pyplot():
  """matplotlib.pyplot on the Agg backend (headless: no display needed), imported on the first call."""
  # Lazy: matplotlib adds 0.6-1.1 s to importing reports or explain (measured); non-plotting callers skip it.
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (after use(): pyplot fixes the backend)
  return plt


def save_figure(fig, path: str | os.PathLike) -> pathlib.Path:
  """`fig` as a PNG written to a temporary file beside `path`, then renamed over it; `fig` is closed."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=fig.dpi, bbox_inches="tight")
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  finally:
    pyplot().close(fig)
  return path
