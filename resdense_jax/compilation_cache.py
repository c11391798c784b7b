"""The persistent XLA compilation cache, on by default: a second run of the same program reads its compiled
executable from disk instead of compiling it again (the paper's model: about a minute cold on 2 CPU cores).

`config.compilation_cache_dir` (main) and `--compilation_cache_dir` (predict, explain) choose the folder;
an empty string turns it off. A cache folder already set in JAX (`JAX_COMPILATION_CACHE_DIR`, or
`jax.config.update("jax_compilation_cache_dir", ...)` by the caller) is left as it is.
"""

from __future__ import annotations

import os
import pathlib

import jax

DEFAULT_DIR = "~/.cache/resdense_jax/xla"


def enable(directory: str | os.PathLike | None = DEFAULT_DIR) -> str | None:
  """Turns the cache on in `directory` (created if missing) unless JAX has one already; returns the folder in
  use, or None when off. Programs that compile in under a second are not cached (JAX's default)."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if not directory:
    return None
  folder = pathlib.Path(directory).expanduser()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a read-only home must not stop a run: it only compiles cold
    print(f"compilation cache off: cannot create {folder}: {e}", flush=True)
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  return str(folder)
