"""The Res-Dense Net a config describes (`config.model`), shared by training, prediction and checkpoints."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections

from resdense_jax.models.resdense import ResDenseNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "auto": bfloat16 compute (float32 parameters and loss) where the matrix units run it at full rate.
AUTO_BFLOAT16_BACKENDS = ("gpu", "tpu")
_log = logging.getLogger(__name__)


def plain(value):
  """ConfigDict / lists -> plain dicts / tuples (hashable module attributes)."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return {k: plain(v) for k, v in dict(value).items()}
  if isinstance(value, (list, tuple)):
    return tuple(plain(v) for v in value)
  return value


def compute_dtype(name: str, backend: str | None = None) -> str:
  """config.model.dtype resolved: "auto" is bfloat16 on GPU/TPU and float32 elsewhere (CPU)."""
  if name == "auto":
    backend = backend or jax.default_backend()
    return "bfloat16" if backend in AUTO_BFLOAT16_BACKENDS else "float32"
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
  return name


def backbone_kwargs(model_config: ml_collections.ConfigDict) -> dict:
  """config.model.backbone_kwargs for the configured backbones. A config may hold overrides for others (a config
  file's defaults, then `--config.model.backbones=...` on the command line): those are left out, with a log line;
  ResDenseNet itself refuses them."""
  kwargs = plain(model_config.backbone_kwargs) or {}
  unused = sorted(set(kwargs) - set(model_config.backbones))
  if unused:
    _log.info("config.model.backbone_kwargs: not using the entries for %s (not in config.model.backbones %s)",
              unused, tuple(model_config.backbones))
  return {name: value for name, value in kwargs.items() if name in model_config.backbones}


def create_model(model_config: ml_collections.ConfigDict, *, frozen_bn=()) -> ResDenseNet:
  """The Res-Dense Net the config describes; `frozen_bn` as ResDenseNet's (optim.frozen_batchnorm)."""
  return ResDenseNet(
      backbones=tuple(model_config.backbones),
      fusion_filters=model_config.fusion_filters,
      fusion_kernel=model_config.fusion_kernel,
      fusion_activation=model_config.fusion_activation or None,
      pooling=model_config.pooling,
      dropout=model_config.dropout,
      num_outputs=model_config.num_outputs,
      # .get: the config.json of runs from before the field has none (their heads were "flax").
      head_init=model_config.get("head_init", "flax"),
      preprocessing=model_config.preprocessing,
      backbone_kwargs=backbone_kwargs(model_config),
      frozen_bn=tuple(frozen_bn),
      backbone_bn_inference=model_config.backbone_bn_inference,
      dtype=DTYPES[compute_dtype(model_config.dtype)],
  )
