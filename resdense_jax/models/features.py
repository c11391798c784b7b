"""Intermediate outputs by Keras layer name: `model.apply(variables, x, features=("conv4_block6_out",))`.

Keras users take a backbone's block outputs with `keras.Model(base.input, base.get_layer(name).output)`. Here every
Keras-named helper in `keras_layers` hands its output to `emit`, which keeps it when a `capturing` block above asked
for that name. Nothing is kept, and no op is added, when nothing asked: the default call traces the same program.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
from typing import Any, Iterator, Sequence

Names = str | Sequence[str] | None

_ACTIVE: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("keras_feature_capture", default=None)


def requested(features: Names) -> tuple[str, ...] | None:
  """`features` as a tuple of names (one string is one name), or None when nothing is asked for."""
  if features is None:
    return None
  if isinstance(features, str):
    return (features,)
  names = tuple(features)
  bad = [n for n in names if not isinstance(n, str)]
  if bad:
    raise TypeError(f"features: expected Keras layer names (str), got {bad[0]!r} ({type(bad[0]).__name__})")
  return names


def close_matches(name: str, choices: Sequence[str], n: int = 3) -> list[str]:
  return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)


def unknown_name_message(where: str, name: str, choices: Sequence[str], what: str = "Keras layer") -> str:
  """"ResNet50: no Keras layer 'conv4_block6_ot'; did you mean 'conv4_block6_out'? (...)": for errors."""
  matches = close_matches(name, choices)
  hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
  shown = ", ".join(repr(c) for c in list(choices)[:8])
  more = f" and {len(choices) - 8} more" if len(choices) > 8 else ""
  return f"{where}: no {what} {name!r}{hint} (it has {len(choices)}: {shown}{more})"


@dataclasses.dataclass
class Capture:
  """What one `capturing` block asked for, what it got, and every name emitted inside it (for errors)."""
  wanted: frozenset[str]
  found: dict[str, Any] = dataclasses.field(default_factory=dict)
  seen: list[str] = dataclasses.field(default_factory=list)

  def result(self, names: Sequence[str], where: str, prefix: str = "") -> dict[str, Any]:
    """{prefix + name: output}; a name no layer emitted is a ValueError with close matches."""
    for name in names:
      if name not in self.found:
        raise ValueError(unknown_name_message(where, name, self.seen) + "; model.keras_layers() lists them")
    return {prefix + name: self.found[name] for name in names}


@contextlib.contextmanager
def capturing(names: Sequence[str] | None) -> Iterator[Capture | None]:
  """Keeps the outputs of the Keras layers named `names` emitted inside the block; `None` asks for nothing and
  leaves an enclosing block (ResDenseNet's, around one backbone) in place."""
  if names is None:
    yield None
    return
  capture = Capture(frozenset(names))
  token = _ACTIVE.set(capture)
  try:
    yield capture
  finally:
    _ACTIVE.reset(token)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
  """No capture inside the block (an abstract trace of a model, e.g. keras_layers(), keeps nothing)."""
  token = _ACTIVE.set(None)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def emit(name: str, value: Any) -> Any:
  """A Keras layer's output, kept if asked for; returned unchanged."""
  capture = _ACTIVE.get()
  if capture is not None:
    capture.seen.append(name)
    if name in capture.wanted:
      capture.found[name] = value
  return value
