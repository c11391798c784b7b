"""The one error type of the weight loader."""

from __future__ import annotations


class WeightsError(ValueError):
  """A weight file that cannot be used as asked: its message names the file and what is wrong with it."""
