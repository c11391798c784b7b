"""Scan heads (issue 13): gated attention pooling and the slice transformer, on features and end to end."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from demo_configs import tiny_config
from resdense_jax.models import scan_heads
from resdense_jax.models.build import create_model


def _features(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _init_pool(module, features, mask, **kwargs):
  return module.init(jax.random.key(1), features, mask, **kwargs)


def test_equal_scores_pool_to_the_mean_of_the_features():
  h = _features((2, 7, 5))
  mask = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [4]]))
  pool = scan_heads.GatedAttentionPool(hidden=6)
  variables = _init_pool(pool, h, mask)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if "w" in jax.tree_util.keystr(path) else x, variables)
  z, weights = pool.apply(variables, h, mask)
  np.testing.assert_allclose(weights[0], np.full(7, 1 / 7), rtol=1e-6)
  np.testing.assert_allclose(weights[1], [0.25] * 4 + [0.0] * 3, rtol=1e-6)
  assert np.all(np.asarray(weights[1, 4:]) == 0.0)
  np.testing.assert_allclose(z[0], h[0].mean(0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(z[1], h[1, :4].mean(0), rtol=1e-6, atol=1e-7)


def test_attention_weights_follow_the_formula():
  """a = softmax(w^T (tanh(V h) * sigmoid(U h))), z = sum a h, by hand in numpy."""
  h = _features((1, 5, 4), seed=3)
  mask = jnp.ones((1, 5), bool)
  pool = scan_heads.GatedAttentionPool(hidden=3)
  variables = _init_pool(pool, h, mask)
  p = jax.tree.map(np.asarray, variables["params"])
  x = np.asarray(h[0], np.float64)
  s = (np.tanh(x @ p["V"]["kernel"]) * (1 / (1 + np.exp(-(x @ p["U"]["kernel"]))))) @ p["w"]["kernel"][:, 0]
  a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
  z, weights = pool.apply(variables, h, mask)
  np.testing.assert_allclose(weights[0], a, rtol=1e-5)
  np.testing.assert_allclose(z[0], a @ x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["attention", "transformer"])
def test_padding_a_scan_changes_nothing(head):
  """A scan of 5 slices alone, and padded to 12 with large garbage features (mask False): same logit,
  same weights on its slices, exactly 0 on the padding."""
  model = _scan_model(head)
  h = _features((1, 5, 8), seed=4)
  garbage = 1e3 * _features((1, 7, 8), seed=5)
  padded = jnp.concatenate([h, garbage], axis=1)
  mask = jnp.arange(12)[None, :] < 5
  variables = _variables(model, head)
  alone = model.apply(variables, h, None, method="pool")
  with_padding = model.apply(variables, padded, mask, method="pool")
  np.testing.assert_allclose(with_padding["logits"], alone["logits"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(with_padding["weights"][:, :5], alone["weights"], rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(with_padding["weights"][:, 5:]) == 0.0)
  np.testing.assert_allclose(with_padding["slice_logits"][:, :5], alone["slice_logits"], rtol=1e-5, atol=1e-5)


def test_attention_is_permutation_invariant_and_the_transformer_sees_the_order():
  h = _features((1, 6, 8), seed=6)
  order = np.array([3, 0, 5, 1, 4, 2])
  attention = _scan_model("attention")
  variables = _variables(attention, "attention")
  base = attention.apply(variables, h, None, method="pool")
  shuffled = attention.apply(variables, h[:, order], None, method="pool")
  np.testing.assert_allclose(shuffled["logits"], base["logits"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(shuffled["weights"], base["weights"][:, order], rtol=1e-6, atol=1e-7)

  transformer = _scan_model("transformer")
  variables = _variables(transformer, "transformer")
  base = transformer.apply(variables, h, None, method="pool")
  shuffled = transformer.apply(variables, h[:, order], None, method="pool")
  # Learned positions: the same slices in another order are another scan.
  assert float(jnp.max(jnp.abs(shuffled["logits"] - base["logits"]))) > 1e-4
  # Without the position embedding the encoder is permutation-equivariant again.
  flat = {**variables["params"], "scan_head": {**variables["params"]["scan_head"], "position": {
      "embedding": jnp.zeros_like(variables["params"]["scan_head"]["position"]["embedding"])}}}
  base = transformer.apply({**variables, "params": flat}, h, None, method="pool")
  shuffled = transformer.apply({**variables, "params": flat}, h[:, order], None, method="pool")
  np.testing.assert_allclose(shuffled["logits"], base["logits"], rtol=1e-5, atol=1e-5)


def test_relative_positions_span_the_buckets_for_any_length():
  for n, length in ((1, 4), (2, 4), (5, 5), (33, 40), (300, 300)):
    mask = jnp.arange(length)[None, :] < n
    positions = np.asarray(scan_heads.relative_positions(mask, 32))[0, :n]
    assert positions[0] == 0 and positions[-1] == (31 if n > 1 else 0)
    assert np.all(np.diff(positions) >= 0)
  np.testing.assert_array_equal(scan_heads.relative_positions(jnp.ones((1, 5), bool), 9)[0], [0, 2, 4, 6, 8])


def test_scan_model_shares_the_slice_models_variables_and_features():
  """The scan model's variables are the ResDenseNet's, same names, plus params["scan_head"]; its slice
  features are what the ResDenseNet pools; with the attention head a one-slice scan's logit is the
  ResDenseNet's logit of that slice; __call__ on [B, K] images is pool(slice_features)."""
  config = tiny_config()
  config.model.scan_head = "attention"
  model = scan_heads.create_scan_model(config.model)
  images = jnp.asarray(np.random.default_rng(7).uniform(0, 255, (2, 3, 32, 32, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), images)
  slice_model = create_model(config.model)
  slice_params = jax.eval_shape(slice_model.init, jax.random.key(0, impl="rbg"), images[0])
  assert set(variables["params"]) == set(slice_params["params"]) | {"scan_head"}
  assert jax.tree.structure(variables["batch_stats"]) == jax.tree.structure(slice_params["batch_stats"])
  flat = images.reshape(6, 32, 32, 3)

  @jax.jit
  def run(variables, flat, images):
    features = model.apply(variables, flat, method="slice_features")
    pooled = slice_model.apply(variables, flat, features=("avg_pool",))["avg_pool"]
    one = model.apply(variables, features[:, None, :], None, method="pool")["logits"]
    pooled_logits = model.apply(variables, features.reshape(2, 3, -1), None, method="pool")["logits"]
    return features, pooled, one, slice_model.apply(variables, flat), model.apply(variables, images), pooled_logits

  features, pooled, one, slice_logits, logits, pooled_logits = run(variables, flat, images)
  np.testing.assert_allclose(features, pooled, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(one, slice_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, pooled_logits, rtol=1e-6, atol=1e-6)
  assert logits.shape == (2, 1)


@functools.lru_cache(maxsize=None)
def _scan_model(head):
  config = tiny_config()
  config.model.scan_head = head
  config.model.scan_transformer = {"width": 16, "layers": 2, "heads": 2, "mlp_dim": 32, "position_buckets": 8}
  return scan_heads.create_scan_model(config.model)


@functools.lru_cache(maxsize=None)
def _head_variables(head):
  """The scan head's variables initialised alone (no backbone: `pool` reads only params["scan_head"] and
  params["predictions"]), random "predictions"; the transformer's output projection made non-zero (it
  starts at 0)."""
  model = _scan_model(head)
  h, mask = jnp.zeros((1, 2, 8), jnp.float32), jnp.ones((1, 2), bool)
  if head == "transformer":
    module = scan_heads.SliceTransformer(hidden=model.attention_hidden, **{
        **scan_heads.TRANSFORMER_DEFAULTS, **model.transformer})
  else:
    module = scan_heads.GatedAttentionPool(model.attention_hidden)
  head_params = dict(module.init(jax.random.key(2), h, mask)["params"])
  if head == "transformer":
    kernel = head_params["output_proj"]["kernel"]
    head_params["output_proj"] = {**head_params["output_proj"],
                                  "kernel": 0.3 * jax.random.normal(jax.random.key(3), kernel.shape)}
  predictions = {"kernel": jax.random.normal(jax.random.key(4), (8, 1)), "bias": jnp.full((1,), 0.1)}
  return {"params": {"scan_head": head_params, "predictions": predictions}}


def _variables(model, head):
  assert model is _scan_model(head)
  return _head_variables(head)


def test_unknown_scan_head_and_transformer_fields_are_errors():
  config = tiny_config()
  config.model.scan_head = "lstm"
  with pytest.raises(ValueError, match="scan_head must be one of"):
    scan_heads.create_scan_model(config.model)
  config.model.scan_head = "transformer"
  config.model.scan_transformer = {"depth": 3}
  model = scan_heads.create_scan_model(config.model)
  with pytest.raises(ValueError, match="unknown fields"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, 32, 32, 3)))
  assert nn.share_scope  # the flat variable layout relies on it
