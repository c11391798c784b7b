"""Scan-level heads (issue 13): one logit per scan from the features of all its slices.

The paper scores every slice alone and averages the probabilities (`config.model.scan_head="mean"`, the
plain ResDenseNet). Here the slices of a scan go through the same Res-Dense branches (shared across slices)
up to the pooled fused feature h_k of each slice, and a scan head pools them:

  "attention"    gated attention pooling (Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance
                 Learning", ICML 2018): s_k = w^T (tanh(V h_k) * sigmoid(U h_k)), a = softmax_k(s), z = sum a_k h_k
  "transformer"  a small pre-norm transformer encoder over the slice sequence (input projection + a learned
                 embedding of the relative slice position, round(k / (n - 1) * (P - 1)) of P buckets, so any
                 scan length works), projected back to the feature width and added to h_k (the projection
                 starts at zero: at init the model is the attention head), then the same gated attention pooling

then Dropout and the ResDenseNet's own Dense "predictions" on z give the scan logit. Padded slices (mask
False) get the score -inf before the softmax and are masked out of the transformer's attention, so padding a
scan to a longer sequence leaves its result unchanged.

The variables are the ResDenseNet's, flat and under the same names (`nn.share_scope`: `params["resnet101"]`,
`params["predictions"]`, ...), plus `params["scan_head"]`: freezing rules, the Keras weight loader and the
BatchNorm handling of the engine apply unchanged, and a slice-level checkpoint's variables initialise a scan
model's slice branches.

    model = ScanModel(slices=ResDenseNet(...), scan_head="attention")
    variables = model.init(rng, images)          # images: [B, K, H, W, 3] raw RGB, K slices per scan
    logits = model.apply(variables, images, mask=mask)           # [B, num_outputs]
    feats = model.apply(variables, x, method="slice_features")   # x [N, H, W, 3] -> [N, C] pooled fused features
    out = model.apply(variables, feats, mask, method="pool")     # {"logits", "weights", "slice_logits"}
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from resdense_jax.models.build import create_model, plain
from resdense_jax.models.resdense import ResDenseNet

SCAN_HEADS = ("mean", "attention", "transformer")
# The transformer's defaults (config.model.scan_transformer).
TRANSFORMER_DEFAULTS = {"width": 64, "layers": 2, "heads": 4, "mlp_dim": 128, "position_buckets": 32,
                        "dropout": 0.0}


def check_scan_head(name: str) -> str:
  if name not in SCAN_HEADS:
    raise ValueError(f"config.model.scan_head must be one of {SCAN_HEADS}, got {name!r}")
  return name


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis of float32 `scores` where `mask` is True; masked entries get exactly 0 (their
  scores count as -inf) and a row with no True entry gets all zeros instead of NaN."""
  scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
  top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e = jnp.where(mask, jnp.exp(scores - top), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def relative_positions(mask: jax.Array, buckets: int) -> jax.Array:
  """int32 [B, L]: the position bucket of each slice, round(k / (n - 1) * (buckets - 1)) for slice k of the n
  valid slices of its row (the valid slices first, padding after; a one-slice scan sits in bucket 0)."""
  n = jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.float32)
  k = jnp.arange(mask.shape[-1], dtype=jnp.float32)[None, :]
  position = jnp.round(k * (buckets - 1) / jnp.maximum(n - 1.0, 1.0))
  return jnp.clip(position, 0, buckets - 1).astype(jnp.int32)


class GatedAttentionPool(nn.Module):
  """Ilse et al. 2018 gated attention: (z [B, C], weights [B, L]) of features h [B, L, C] and mask [B, L]."""

  hidden: int = 64

  @nn.compact
  def __call__(self, h: jax.Array, mask: jax.Array):
    h = h.astype(jnp.float32)
    v = jnp.tanh(nn.Dense(self.hidden, use_bias=False, name="V")(h))
    u = nn.sigmoid(nn.Dense(self.hidden, use_bias=False, name="U")(h))
    scores = nn.Dense(1, use_bias=False, name="w")(v * u)[..., 0]
    weights = masked_softmax(scores, mask)
    z = jnp.einsum("bl,blc->bc", weights, jnp.where(mask[..., None], h, 0.0))
    return z, weights


class EncoderLayer(nn.Module):
  """A pre-norm transformer encoder layer (LayerNorm, self-attention, residual; LayerNorm, MLP, residual)."""

  width: int
  heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    y = nn.LayerNorm(name="norm_1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.width, dropout_rate=self.dropout,
                                        deterministic=not train, name="attention")(
                                            y, y, mask=nn.make_attention_mask(mask, mask))
    x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
    y = nn.LayerNorm(name="norm_2")(x)
    y = nn.Dense(self.width, name="mlp_out")(nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(y)))
    return x + nn.Dropout(self.dropout)(y, deterministic=not train)


class SliceTransformer(nn.Module):
  """Slice features in context, then gated attention pooling: (z [B, C], weights [B, L], contextual [B, L, C])."""

  width: int = 64
  layers: int = 2
  heads: int = 4
  mlp_dim: int = 128
  position_buckets: int = 32
  dropout: float = 0.0
  hidden: int = 64

  @nn.compact
  def __call__(self, h: jax.Array, mask: jax.Array, train: bool = False):
    h = h.astype(jnp.float32)
    x = nn.Dense(self.width, name="input_proj")(h)
    x = x + nn.Embed(self.position_buckets, self.width, name="position")(
        relative_positions(mask, self.position_buckets))
    for i in range(self.layers):
      x = EncoderLayer(self.width, self.heads, self.mlp_dim, self.dropout, name=f"layer_{i}")(x, mask, train)
    x = nn.LayerNorm(name="final_norm")(x)
    context = h + nn.Dense(h.shape[-1], kernel_init=nn.initializers.zeros_init(), name="output_proj")(x)
    z, weights = GatedAttentionPool(self.hidden, name="attention_pool")(context, mask)
    return z, weights, context


class ScanModel(nn.Module):
  """A ResDenseNet's slice branches shared across the slices of a scan, and a scan head (module docstring).

  Attributes:
    slices: the per-slice ResDenseNet (backbones, fusion, pooling, dropout rate, head init, frozen BatchNorms).
    scan_head: "attention" or "transformer".
    attention_hidden: width of the gated attention's V and U.
    transformer: overrides of TRANSFORMER_DEFAULTS (width, layers, heads, mlp_dim, position_buckets, dropout).
  """

  slices: ResDenseNet
  scan_head: str = "attention"
  attention_hidden: int = 64
  transformer: Mapping[str, Any] | None = None

  def setup(self):
    nn.share_scope(self, self.slices)  # the slice model's variables at the top level, under its own names
    if self.scan_head == "attention":
      self.pooler = GatedAttentionPool(self.attention_hidden, name="scan_head")
    elif self.scan_head == "transformer":
      settings = {**TRANSFORMER_DEFAULTS, **dict(self.transformer or {})}
      unknown = sorted(set(settings) - set(TRANSFORMER_DEFAULTS))
      if unknown:
        raise ValueError(f"config.model.scan_transformer: unknown fields {unknown}; "
                         f"known: {sorted(TRANSFORMER_DEFAULTS)}")
      self.pooler = SliceTransformer(hidden=self.attention_hidden, name="scan_head", **settings)
    else:
      raise ValueError(f"ScanModel: scan_head must be 'attention' or 'transformer' (the 'mean' head is the plain "
                       f"ResDenseNet), got {self.scan_head!r}")
    self.scan_dropout = nn.Dropout(self.slices.dropout)

  # What the engine, the weight loader and the freezing rules read from a model, from the slice model.
  @property
  def backbones(self):
    return self.slices.backbones

  @property
  def frozen_bn(self):
    return self.slices.frozen_bn

  @property
  def backbone_bn_inference(self):
    return self.slices.backbone_bn_inference

  @property
  def min_input_size(self) -> int:
    return self.slices.min_input_size

  @nn.nowrap
  def keras_layers(self) -> dict[str, list]:
    return self.slices.keras_layers()

  @nn.nowrap
  def backbone_modules(self) -> dict[str, nn.Module]:
    return self.slices.backbone_modules()

  @nn.nowrap
  def backbone_config(self, name: str) -> dict:
    return self.slices.backbone_config(name)

  @nn.nowrap
  def pooled_name(self) -> str:
    return "gem_pool" if self.slices.pooling == "gem" else "avg_pool"

  def slice_features(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, C] float32: the pooled fused feature of each raw RGB slice of x [N, H, W, 3] (the input of the
    ResDenseNet's Dropout + "predictions")."""
    name = self.pooled_name()
    return self.slices(x, train, features=(name,))[name].astype(jnp.float32)

  def _predictions(self, z: jax.Array) -> jax.Array:
    """The slice model's Dense "predictions" (its kernel and bias) applied to pooled features z [..., C]."""
    dense = self.slices.variables["params"]["predictions"]
    return (jnp.dot(z, dense["kernel"].astype(jnp.float32)) + dense["bias"].astype(jnp.float32))

  def pool(self, features: jax.Array, mask: jax.Array | None = None, train: bool = False) -> dict:
    """The scan head on slice features [B, L, C] (mask [B, L], default all True):
    {"logits": [B, num_outputs], "weights": [B, L] (0 where masked), "slice_logits": [B, L, num_outputs]}.

    slice_logits: "predictions" on each slice's own feature (attention) or its feature in context
    (transformer): the logit of a scan made of that slice alone, for the attention head."""
    if mask is None:
      mask = jnp.ones(features.shape[:2], bool)
    mask = mask.astype(bool)
    if self.scan_head == "transformer":
      z, weights, context = self.pooler(features, mask, train)
    else:
      z, weights = self.pooler(features, mask)
      context = features.astype(jnp.float32)
    z = self.scan_dropout(z, deterministic=not train)
    return {"logits": self._predictions(z), "weights": weights, "slice_logits": self._predictions(context)}

  def __call__(self, x: jax.Array, train: bool = False, *, mask: jax.Array | None = None) -> jax.Array:
    """[B, num_outputs] float32 scan logits of raw RGB slices x [B, K, H, W, 3] (mask [B, K]: real slices)."""
    if jnp.ndim(x) != 5:
      raise ValueError(f"ScanModel: expects [scans, slices, height, width, 3] raw RGB, got shape {jnp.shape(x)}")
    batch, slices = x.shape[:2]
    features = self.slice_features(x.reshape(batch * slices, *x.shape[2:]), train)
    return self.pool(features.reshape(batch, slices, -1), mask, train)["logits"]


def create_scan_model(model_config, *, frozen_bn=()) -> ScanModel:
  """The ScanModel `config.model` describes (scan_head "attention" or "transformer")."""
  head = check_scan_head(model_config.get("scan_head", "mean"))
  if head == "mean":
    raise ValueError("config.model.scan_head='mean' is the plain ResDenseNet (models.build.create_model)")
  return ScanModel(slices=create_model(model_config, frozen_bn=frozen_bn), scan_head=head,
                   attention_hidden=int(model_config.get("scan_attention_hidden", 64)),
                   transformer=plain(model_config.get("scan_transformer", None)) or None)
