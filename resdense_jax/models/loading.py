"""Pretrained variables in one line, for every model of the package.

    model, variables = models.ResNet101.pretrained("imagenet", pooling="avg")   # on the class: model too
    variables = models.ResDenseNet().pretrained("imagenet", rng=0)              # on a model: its variables

`.pretrained` on a class builds the model from the constructor keyword arguments and returns (model, variables);
on a model it returns the variables of that very model. Backbones read one Keras file (`weights.load_keras`, all
of its checks); the fused model reads one per backbone (`weights.pretrained.load_backbones`, which the training
engine's `train.load_pretrained` calls too) and initialises the fusion convs and the head from `rng`.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from resdense_jax.weights import pretrained as pretrained_weights

# The argument name errors use for the weights source of `.pretrained`.
FIELD = "weights"


class class_or_instance_method:  # pylint: disable=invalid-name  (used as a decorator, like classmethod)
  """`Model.f(*args, **options, **constructor_kwargs)` -> (Model(**constructor_kwargs), f(model, *args,
  **options)); `model.f(*args, **options)` -> f(model, *args, **options). `options` are f's keyword arguments."""

  nowrap = True  # Flax: not a module method, so Flax does not wrap it (it runs outside any module scope)

  def __init__(self, fn: Callable[..., Any]):
    self.fn = fn
    self.options = {name for name, p in inspect.signature(fn).parameters.items()
                    if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self"}
    functools.update_wrapper(self, fn)

  def __get__(self, instance, owner=None):
    if instance is not None:
      return functools.partial(self.fn, instance)

    @functools.wraps(self.fn)
    def build(*args, **kwargs):
      options = {k: kwargs.pop(k) for k in list(kwargs) if k in self.options}
      model = owner(**kwargs)
      return model, self.fn(model, *args, **options)

    build.__qualname__ = f"{owner.__name__}.{self.fn.__name__}"
    build.__doc__ = (f"{owner.__name__}.{self.fn.__name__}(weights, **options, **constructor arguments) -> "
                     f"(model, variables).\n\n{self.fn.__doc__ or ''}")
    return build


def as_key(rng: jax.Array | int) -> jax.Array:
  """A PRNG key; an int seed gives `jax.random.key(seed, impl="rbg")`, the key the training engine draws its
  initial weights from (its init program compiles ~3x faster on CPU than threefry's)."""
  return jax.random.key(rng, impl="rbg") if isinstance(rng, int) else rng


def initial_variables(model: Any, rng: jax.Array | int, size: int) -> dict[str, Any]:
  """`model.init` (inference mode) on a size x size batch of one, jit-compiled: {"params", "batch_stats"}."""
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(as_key(rng), x)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def backbone_variables(model: Any, weights: str | os.PathLike | None = "imagenet", *, rng: jax.Array | int = 0,
                       cache_dir: str | os.PathLike | None = None, download: bool = True) -> dict[str, Any]:
  """One backbone's {"params", "batch_stats"} from "imagenet", a published file name, a Keras file (`path`,
  `path#sub-model`) or "none" (initial weights from `rng`)."""
  if isinstance(weights, Mapping):
    raise ValueError(f"{FIELD}: {type(model).__name__} is one backbone and takes one source ('imagenet', 'none' "
                     f"or a file), got a mapping {dict(weights)!r}; per-backbone sources are for ResDenseNet")
  source = os.fspath(weights) if isinstance(weights, os.PathLike) else weights
  if source is None or (isinstance(source, str) and source.strip() in ("", pretrained_weights.NONE)):
    return initial_variables(model, rng, model.min_input_size)
  if not isinstance(source, str):
    raise ValueError(f"{FIELD}: expected 'imagenet', 'none' or the path of a Keras weights file, got {source!r} "
                     f"({type(source).__name__})")
  source = source.strip()
  name = model.name or type(model).__name__
  return pretrained_weights.load_backbone(name, model, source, cache_dir=cache_dir, download=download, field=FIELD)


def fused_variables(model: Any, weights: Any = "imagenet", *, rng: jax.Array | int = 0,
                    cache_dir: str | os.PathLike | None = None, download: bool = True) -> dict[str, Any]:
  """A ResDenseNet's variables: the backbones from Keras weights (one source for all or one per backbone; "none"
  keeps a backbone's initial weights), everything else initialised from `rng` as `model.init(rng, x)` does."""
  sources = pretrained_weights.per_backbone(weights, model.backbones, field=FIELD)
  if pretrained_weights.NONE in sources.values():
    variables = initial_variables(model, rng, model.min_input_size)
  else:
    # Only the head needs initial values; its variables depend on the root key and their paths alone, so this
    # equals the head of a full `model.init(rng, x)` without compiling the backbones' init.
    modules = model.backbone_modules()
    features = {name: jnp.zeros((1, 1, 1, module.num_features), model.dtype) for name, module in modules.items()}
    head = jax.jit(functools.partial(model.init, method="head"))(as_key(rng), features)
    variables = {"params": dict(head["params"]), "batch_stats": {}}
  return pretrained_weights.load_backbones(model, variables, sources, cache_dir=cache_dir, download=download,
                                           field=FIELD)
