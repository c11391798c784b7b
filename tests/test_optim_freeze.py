"""Freezing in one call (optim.freeze) and an own optax loop with it (optim.with_frozen, optim.keras_rmsprop):
frozen parameters and frozen BatchNorm statistics bitwise unchanged, the rest trained, on a standalone backbone
and on a Res-Dense Net; the same labels and model as the engine's phases build; single-string rules; errors."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import demo_configs  # also puts configs/ on the path
from resdense_jax import models, optim, train

import common  # noqa: E402  pylint: disable=g-bad-import-order  (configs/common.py)

SIZE = 32
STEPS = 3
SMALL_RESNET = demo_configs.TINY_BACKBONES["resnet50"]


def _standalone():
  """A small Keras ResNet v1 with its 3-class top (logits): the Dense "predictions" stays trainable."""
  return models.ResNet(**SMALL_RESNET, include_top=True, num_classes=3, classifier_activation=None)


def _resdense():
  """The tiny engine config's Res-Dense Net (tiny ResNet50 + DenseNet121)."""
  return train.create_model(demo_configs.tiny_config().model)


# (model, rules): a standalone backbone with a single-string rule; a Res-Dense Net with one whole backbone and
# the first 15 Keras layers of the other.
CASES = {"standalone_resnet": (_standalone, "backbone:20"),
         "resdense": (_resdense, ("resnet50", "densenet121:15"))}


def _variables(model, seed=0):
  """Random variables of the model's shapes, no init program compiled: He-normal kernels, BatchNorm 1/0."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1]
    if name == "kernel":
      return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype)
    if name in ("scale", "var"):
      return jnp.ones(s.shape, s.dtype)
    if name == "p":  # GeM's exponent
      return jnp.full(s.shape, 3.0, s.dtype)
    return jnp.asarray(rng.normal(size=s.shape) * 0.01, s.dtype)  # biases, moving means

  flat = traverse_util.flatten_dict(shapes)
  return traverse_util.unflatten_dict({k: fill(k, s) for k, s in flat.items()})


def _batches(model, seed=1):
  rng = np.random.default_rng(seed)
  # A backbone takes preprocessed input; the Res-Dense Net raw RGB [0, 255].
  raw = isinstance(model, models.ResDenseNet)
  return [(jnp.asarray(rng.integers(0, 256, (4, SIZE, SIZE, 3)), jnp.float32) if raw
           else jnp.asarray(rng.normal(size=(4, SIZE, SIZE, 3)), jnp.float32),
           jnp.asarray(rng.normal(size=(4,)), jnp.float32)) for _ in range(STEPS)]


def own_loop(model, variables, labels, tx, batches):
  """A plain optax loop, as a user writes it: grads of every parameter, tx.update, optax.apply_updates."""

  @jax.jit
  def step(params, batch_stats, opt_state, images, targets, key):
    def loss_fn(params):
      logits, updated = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                    mutable=["batch_stats"], rngs={"dropout": key})
      return jnp.mean((logits - targets[:, None]) ** 2), updated["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  for i, (images, targets) in enumerate(batches):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images, targets,
                                                jax.random.PRNGKey(i))
    assert np.isfinite(float(loss))
  return params, batch_stats, opt_state


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _same_bits(a, b) -> bool:
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _expected_frozen_bn(model, rules) -> set[tuple[str, ...]]:
  """The BatchNorm layers these test rules freeze, read off the Keras layer lists by hand: (prefix..., name)."""
  layers = model.keras_layers()
  bn = lambda ls: {l.name for l in ls if l.class_name == "BatchNormalization"}
  if isinstance(model, models.ResDenseNet):  # ("resnet50", "densenet121:15")
    return {("resnet50", n) for n in bn(layers["resnet50"])} | {("densenet121", n)
                                                                 for n in bn(layers["densenet121"][:15])}
  return {(n,) for n in bn(layers[:20])}  # "backbone:20"


@pytest.mark.parametrize("case", list(CASES))
def test_own_optax_loop_keeps_frozen_weights_and_statistics_bitwise(case):
  make_model, rules = CASES[case]
  base = make_model()
  variables = _variables(base)
  before = {"params": _flat(variables["params"]), "batch_stats": _flat(variables["batch_stats"])}
  labels, model = optim.freeze(base, variables["params"], rules)
  tx = optim.with_frozen(optim.keras_rmsprop(1e-3), labels)
  params, batch_stats, opt_state = own_loop(model, variables, labels, tx, _batches(base))

  flat_labels = traverse_util.flatten_dict(labels)
  frozen = [k for k, v in flat_labels.items() if v == optim.FROZEN]
  trainable = [k for k, v in flat_labels.items() if v == optim.TRAINABLE]
  assert frozen and trainable
  after = _flat(params)
  for k in frozen:
    assert _same_bits(after[k], before["params"][k]), f"frozen {'/'.join(k)} moved"
  # Every trainable kernel moves; only biases right before a training BatchNorm may keep ~zero gradients.
  unchanged = [k for k in trainable if _same_bits(after[k], before["params"][k])]
  assert not [k for k in unchanged if k[-1] == "kernel"], unchanged
  assert len(unchanged) <= 0.1 * len(trainable), unchanged

  # The returned model holds exactly the BatchNorms whose parameters are frozen; their statistics stay, every
  # other BatchNorm's move (train=True).
  inference_bn = _expected_frozen_bn(base, rules)
  if isinstance(model, models.ResDenseNet):  # ((backbone, names), ...)
    frozen_bn = {(backbone, n) for backbone, names in model.frozen_bn for n in names}
  else:  # a standalone backbone's: names
    frozen_bn = {(n,) for n in model.frozen_bn}
  assert frozen_bn == inference_bn and inference_bn
  stats = _flat(batch_stats)
  held = [k for k in stats if k[:-1] in inference_bn]
  live = [k for k in stats if k[:-1] not in inference_bn]
  assert len(held) == 2 * len(inference_bn) and live
  for k in held:
    assert _same_bits(stats[k], before["batch_stats"][k]), f"statistic {'/'.join(k)} of a frozen BatchNorm moved"
  for k in live:
    assert not np.array_equal(stats[k], before["batch_stats"][k]), f"statistic {'/'.join(k)} did not move"

  # No optimizer state for frozen parameters: RMSprop keeps one accumulator per trainable scalar.
  state_size = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  assert state_size == sum(before["params"][k].size for k in trainable)


def test_freeze_equals_the_engines_phases():
  """optim.freeze gives the labels and model train.create_phase builds (freeze_labels + frozen_batchnorm +
  create_model), for both phases of the tiny config, a rule mixing both backbones, and one backbone alone."""
  config = demo_configs.tiny_config()
  config.phases.append(common.phase("mixed", 1, ("resnet50:9", "re:densenet121/conv5.*"), optimizer="adam",
                                    learning_rate=1e-3))
  # One backbone with no frozen BatchNorm: the engine still lists it, with ().
  config.phases.append(common.phase("one", 1, ("resnet50:9",), optimizer="adam", learning_rate=1e-3))
  base = train.create_model(config.model)
  params = _variables(base)["params"]
  plan = train.plan_phases(config, steps_per_epoch=2)
  for index, phase_config in enumerate(config.phases):
    phase = train.create_phase(index, plan, config, params)
    labels, model = optim.freeze(base, params, tuple(phase_config.freeze))
    assert jax.tree.structure(labels) == jax.tree.structure(phase.labels)
    assert traverse_util.flatten_dict(labels) == traverse_util.flatten_dict(phase.labels), phase_config.name
    assert model == phase.model, phase_config.name
    assert any(names for _, names in model.frozen_bn), phase_config.name
    # The two steps of before, by hand, as tests/test_train.py still writes them.
    keras_layers = base.keras_layers()
    by_hand = optim.freeze_labels(params, tuple(phase_config.freeze), keras_layers)
    assert model == base.clone(frozen_bn=tuple(optim.frozen_batchnorm(by_hand, keras_layers).items()))


def test_a_single_string_is_one_rule():
  for make_model, rule in ((_resdense, "densenet121"), (_standalone, "backbone:9")):
    base = make_model()
    params = _variables(base)["params"]
    labels, model = optim.freeze(base, params, rule)
    labels_seq, model_seq = optim.freeze(base, params, [rule])
    assert traverse_util.flatten_dict(labels) == traverse_util.flatten_dict(labels_seq) and model == model_seq
    counts = optim.count(labels, params)
    assert counts[optim.FROZEN] and counts[optim.TRAINABLE], rule
  # A standalone backbone's "backbones" / "backbone" is all of it.
  base = _standalone()
  params = _variables(base)["params"]
  for rule in ("backbone", "backbones", "all"):
    labels, _ = optim.freeze(base, params, rule)
    assert set(jax.tree.leaves(labels)) == {optim.FROZEN}, rule


# (model, rule, error type, message pattern): each error names the rule and what a rule could be.
BAD_RULES = [
    (_resdense, "resnet101", ValueError, r"'resnet101'.*not a backbone.*'resnet50:N'.*'densenet121'"),
    (_resdense, "re:nothing_like_this", ValueError, r"'re:nothing_like_this' matches no parameter.*'re:<regex>'"),
    (_resdense, "densenet121:100000", ValueError, r"more layers than the \d+ Keras layers of densenet121"),
    (_resdense, "resnet50:-1", ValueError, r"'resnet50:-1'.*not a layer count"),
    (_resdense, "resnet50:0", ValueError, r"'resnet50:0'.*not a layer count"),
    (_resdense, "resnet50:ten", ValueError, r"'resnet50:ten'.*not a layer count"),
    (_resdense, "re:conv(", ValueError, r"'re:conv\('.*not a regular expression"),
    (_resdense, ["backbones", 3], TypeError, r"freeze rule 3: a rule is a string"),
    (_resdense, 3, TypeError, r"a string or a sequence of strings"),
    (_resdense, "backbone", ValueError, r"'backbone' is not a backbone.*'resnet50'"),
    (_standalone, "resnet50", ValueError, r"'resnet50'.*standalone backbone.*'backbone:N'"),
    (_standalone, "backbone:1", ValueError, r"'backbone:1' matches no parameter"),  # the InputLayer
]


@pytest.mark.parametrize("make_model,rule,error,pattern", BAD_RULES,
                         ids=[f"{m.__name__[1:]}-{r}" for m, r, _, _ in BAD_RULES])
def test_bad_rules_fail_clearly(make_model, rule, error, pattern):
  base = make_model()
  params = jax.eval_shape(lambda: base.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)),
                                            train=False))["params"]
  with pytest.raises(error, match=pattern):
    optim.freeze(base, params, rule)


def test_wrong_model_or_params_fail_clearly():
  base = _standalone()
  variables = jax.eval_shape(lambda: base.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
  with pytest.raises(ValueError, match=r"pass variables\['params'\], not the whole variables dict"):
    optim.freeze(base, variables, "backbone:20")
  other = jax.eval_shape(lambda: _resdense().init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))["params"]
  with pytest.raises(ValueError, match=r"Keras layer list of backbone names parameters .* lacks, e\.g\. conv1_bn"):
    optim.freeze(base, other, "backbone:20")
  with pytest.raises(TypeError, match=r"Dense has no keras_layers\(\) method and frozen_bn field"):
    optim.freeze(nn.Dense(3), {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}, "all")


def test_every_parameter_has_exactly_one_label():
  params = {"a": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}, "b": {"kernel": jnp.zeros((2, 2))}}
  good = {"a": {"kernel": optim.FROZEN, "bias": optim.TRAINABLE}, "b": {"kernel": optim.TRAINABLE}}
  optim.check_labels(good, params)
  tx = optim.with_frozen(optax.sgd(1.0), good)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert float(jnp.abs(updates["a"]["kernel"]).max()) == 0.0 and float(updates["b"]["kernel"][0, 0]) == -1.0
  bad = {
      "no label for parameter a/bias": {"a": {"kernel": optim.FROZEN}, "b": {"kernel": optim.TRAINABLE}},
      "b/extra is labelled but is no parameter": {**good, "b": {"kernel": optim.FROZEN, "extra": optim.FROZEN}},
      "a/bias is labelled 'Frozen'": {**good, "a": {"kernel": optim.FROZEN, "bias": "Frozen"}},
      "other containers": flax.core.FrozenDict(good),
  }
  for message, labels in bad.items():
    with pytest.raises(ValueError, match=message):
      optim.check_labels(labels, params)
    # The optimizer refuses them when it starts, not deep inside optax.
    with pytest.raises(ValueError, match=message):
      optim.with_frozen(optax.sgd(1.0), labels).init(params)
  # The engine's optimizer goes through the same check.
  with pytest.raises(ValueError, match="no label for parameter a/bias"):
    optim.create_optimizer(common.phase("p", 1, (), optimizer="sgd", learning_rate=0.1).optimizer,
                           bad["no label for parameter a/bias"], 1).init(params)
