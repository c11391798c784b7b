"""Optimizers against Keras (RMSprop, Adam, SGD with and without momentum), learning-rate schedules by hand and
through a phase's optimizer, and freezing label masks (rules, Keras layer boundaries, no frozen state)."""

import math
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import keras
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

import demo_configs  # also puts configs/ on the path
import trees
from keras_fixtures import build_keras
from resdense_jax import models, optim, train
from resdense_jax.models.resdense import ResDenseNet

import common  # noqa: E402  pylint: disable=g-bad-import-order  (configs/common.py)

SMALL = {"resnet50": dict(stage_sizes=(1, 1, 1, 1), filters=(4, 8, 8, 8), stem_filters=8),
         "densenet121": dict(blocks=(1, 1, 1, 1), growth_rate=4, stem_filters=8)}


def _keras_step(optimizer, params, grads):
  variables = [keras.Variable(np.asarray(p)) for p in params]
  optimizer.apply_gradients(zip([np.asarray(g) for g in grads], variables))
  return [np.asarray(v.numpy()) for v in variables]


def _grads_sequence(rng, shapes, steps):
  return [[rng.normal(size=s).astype(np.float32) * 10.0 ** rng.uniform(-4, 0) for s in shapes] for _ in range(steps)]


# (optimizer name, extra optimizer fields, learning rate, the Keras optimizer it stands for)
KERAS_OPTIMIZERS = {
    "rmsprop": ("rmsprop", {}, 1e-3, lambda: keras.optimizers.RMSprop(learning_rate=1e-3)),
    "adam": ("adam", {}, 1e-3, lambda: keras.optimizers.Adam(learning_rate=1e-3)),
    "sgd": ("sgd", {}, 0.1, lambda: keras.optimizers.SGD(learning_rate=0.1)),
    # `momentum` is a field of every phase's optimizer in configs/common.py (0: plain SGD).
    "sgd_momentum": ("sgd", {"momentum": 0.9}, 0.1, lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)),
}


@pytest.mark.parametrize("case", list(KERAS_OPTIMIZERS))
def test_optimizer_steps_equal_keras(case):
  name, extra, learning_rate, keras_optimizer = KERAS_OPTIMIZERS[case]
  rng = np.random.default_rng(0)
  shapes = [(3, 3, 4, 5), (5,), (7, 2)]
  params = [rng.normal(size=s).astype(np.float32) for s in shapes]
  # The engine's path: a phase's optimizer config as configs/common.py writes it, through create_optimizer.
  config = common.phase("phase", 1, (), optimizer=name, learning_rate=learning_rate).optimizer
  config.update(extra)
  tx = optim.create_optimizer(config, [optim.TRAINABLE] * len(shapes), num_steps=10)
  keras_opt = keras_optimizer()
  ours = [jnp.asarray(p) for p in params]
  state = tx.init(ours)
  variables = [keras.Variable(p) for p in params]
  # Three steps: momentum (and Adam's/RMSprop's accumulators) only show from the second step on.
  for grads in _grads_sequence(rng, shapes, 3):
    updates, state = tx.update([jnp.asarray(g) for g in grads], state, ours)
    ours = optax.apply_updates(ours, updates)
    keras_opt.apply_gradients(zip(grads, variables))
  trees.assert_trees_close(ours, [v.numpy() for v in variables], rtol=1e-6, atol=1e-7)
  for i, (after, before) in enumerate(zip(ours, params)):
    assert not np.allclose(np.asarray(after), before), f"param {i} did not move"


def test_sgd_steps_by_hand():
  # SGD: p -= lr * g; with momentum mu (Keras's form): v = mu * v - lr * g; p += v.
  p0 = np.array([1.0, -2.0, 0.5], np.float32)
  g1, g2 = np.array([0.5, 1.0, -2.0], np.float32), np.array([1.0, -1.0, 0.25], np.float32)
  lr, mu = 0.1, 0.9
  for momentum, expected in ((0.0, p0 - lr * g1 - lr * g2), (mu, p0 - lr * g1 + (mu * -lr * g1 - lr * g2))):
    config = common.phase("phase", 1, (), optimizer="sgd", learning_rate=lr).optimizer
    config.momentum = momentum
    tx = optim.create_optimizer(config, {"w": optim.TRAINABLE}, num_steps=2)
    params = {"w": jnp.asarray(p0)}
    state = tx.init(params)
    for g in (g1, g2):
      updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
      params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-6, err_msg=f"momentum {momentum}")


# ---------------------------------------------------------------------------------------------- schedules

PEAK = 0.1
PHASE_STEPS = 8
WARMUP = 2


def hand_learning_rate(schedule: str, step: int, *, lr: float = PEAK, num_steps: int = PHASE_STEPS,
                       warmup: int = WARMUP) -> float:
  """The phase's learning rate at `step` (0-based, counted from the phase's start), by the formula.

  constant:       lr
  cosine:         lr * (1 + cos(pi * min(t, n) / n)) / 2               (lr at 0, lr/2 at n/2, 0 from n on)
  warmup_cosine:  lr * t / w for t < w, then
                  lr * (1 + cos(pi * min(t - w, n - w) / (n - w))) / 2  (0 at 0, lr at w, 0 from n on)
  with n the phase's length in steps (warmup included) and w the warmup steps.
  """
  if schedule == "constant":
    return lr
  if schedule == "cosine":
    return lr * (1 + math.cos(math.pi * min(step, num_steps) / num_steps)) / 2
  if step < warmup:
    return lr * step / warmup
  decay = num_steps - warmup
  return lr * (1 + math.cos(math.pi * min(step - warmup, decay) / decay)) / 2


# Spot values of the formula itself (n = 8, w = 2), in units of the peak: start, middle, end, past the end.
SPOT_VALUES = {
    "constant": {0: 1.0, 4: 1.0, 8: 1.0, 10: 1.0},
    "cosine": {0: 1.0, 2: (1 + math.cos(math.pi / 4)) / 2, 4: 0.5, 8: 0.0, 10: 0.0},
    "warmup_cosine": {0: 0.0, 1: 0.5, 2: 1.0, 5: 0.5, 8: 0.0, 10: 0.0},
}


def _optimizer_config(schedule: str) -> ml_collections.ConfigDict:
  config = common.phase("phase", 1, (), optimizer="sgd", learning_rate=PEAK).optimizer
  config.schedule = schedule
  # Only warmup_cosine warms up here (the formula above); any schedule's warmup: tests/test_train_stable.py.
  config.warmup_steps = WARMUP if schedule == "warmup_cosine" else 0
  return config


@pytest.mark.parametrize("schedule", list(SPOT_VALUES))
def test_schedule_values_by_hand(schedule):
  lr = optim.learning_rate_schedule(_optimizer_config(schedule), PHASE_STEPS)
  for step, value in SPOT_VALUES[schedule].items():
    assert hand_learning_rate(schedule, step) == pytest.approx(PEAK * value, abs=1e-12)
    assert float(lr(step)) == pytest.approx(PEAK * value, rel=1e-6, abs=1e-9), f"step {step}"


@pytest.fixture(scope="module")
def tiny_params():
  """Zero parameters of the tiny engine config's model (abstract init: nothing compiled)."""
  model = train.create_model(demo_configs.tiny_config().model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@pytest.mark.parametrize("schedule", ["cosine", "warmup_cosine", "constant"])
def test_phase_optimizer_follows_its_schedule(tiny_params, schedule):
  """With gradient 1, the engine's phase optimizer (SGD) moves every trainable parameter by -lr(t).

  The second phase runs steps [4, 12): its schedule must run over its own PHASE_STEPS (not up to its end step,
  not over the whole run), counted from its own start, warmup included; frozen parameters get 0.
  """
  params = tiny_params
  steps_per_epoch = 4
  config = demo_configs.tiny_config()
  config.phases = [common.phase("head", 1, ("backbones",), optimizer="sgd", learning_rate=PEAK),
                   common.phase("finetune", PHASE_STEPS // steps_per_epoch, ("backbones:10",), optimizer="sgd",
                                learning_rate=PEAK)]
  config.phases[1].optimizer = _optimizer_config(schedule)
  plan = train.plan_phases(config, steps_per_epoch)
  phase = train.create_phase(1, plan, config, params)
  assert (phase.start_step, phase.end_step) == (steps_per_epoch, steps_per_epoch + PHASE_STEPS)
  counts = optim.count(phase.labels, params)
  assert counts[optim.TRAINABLE] and counts[optim.FROZEN]
  opt_state = phase.tx.init(params)
  ones = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(phase.tx.update)
  for step in range(PHASE_STEPS + 2):  # start, middle, end, and past the end
    updates, opt_state = update(ones, opt_state, params)
    lr = hand_learning_rate(schedule, step)
    expected = jax.tree.map(lambda label, p, lr=lr: np.full(p.shape, -lr if label == optim.TRAINABLE else 0.0,
                                                             np.float32), phase.labels, params)
    # A plain parameter first (a readable message), then every leaf, frozen ones included.
    bias = float(updates["predictions"]["bias"][0])
    assert bias == pytest.approx(-lr, rel=1e-5, abs=1e-9), f"step {step}: update {bias}, lr by hand {lr}"
    trees.assert_trees_close(updates, expected, rtol=1e-5, atol=1e-8)


# optax-level helpers (no ConfigDict) and the Keras optimizer each stands for, with non-default settings.
KERAS_HELPERS = {
    "keras_rmsprop": (lambda: optim.keras_rmsprop(1e-4, rho=0.8, epsilon=1e-6),
                      lambda: keras.optimizers.RMSprop(learning_rate=1e-4, rho=0.8, epsilon=1e-6)),
    "keras_adam": (lambda: optim.keras_adam(1e-3, beta_1=0.8, beta_2=0.99, epsilon=1e-6),
                   lambda: keras.optimizers.Adam(learning_rate=1e-3, beta_1=0.8, beta_2=0.99, epsilon=1e-6)),
    "keras_adam_defaults": (optim.keras_adam, keras.optimizers.Adam),
    "rmsprop_keras_defaults": (optim.rmsprop_keras, keras.optimizers.RMSprop),  # the older name
}


@pytest.mark.parametrize("case", list(KERAS_HELPERS))
def test_keras_optimizer_helpers_equal_keras(case):
  ours, theirs = KERAS_HELPERS[case]
  rng = np.random.default_rng(1)
  shapes = [(6, 4), (4,)]
  params = [rng.normal(size=s).astype(np.float32) for s in shapes]
  tx, keras_opt = ours(), theirs()
  current, state = [jnp.asarray(p) for p in params], tx.init([jnp.asarray(p) for p in params])
  variables = [keras.Variable(p) for p in params]
  for grads in _grads_sequence(rng, shapes, 3):
    updates, state = tx.update([jnp.asarray(g) for g in grads], state, current)
    current = optax.apply_updates(current, updates)
    keras_opt.apply_gradients(zip(grads, variables))
  trees.assert_trees_close(current, [v.numpy() for v in variables], rtol=1e-6, atol=1e-7)
  assert not np.allclose(np.asarray(current[0]), params[0])


def test_decoupled_weight_decay_on_kernels_only_equals_keras():
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(4, 3)).astype(np.float32)
  bias = rng.normal(size=(3,)).astype(np.float32)
  gk, gb = (rng.normal(size=kernel.shape).astype(np.float32), rng.normal(size=bias.shape).astype(np.float32))
  config = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-2, "weight_decay": 0.1})
  tx = optim.base_optimizer(config, 1)
  params = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
  updates, _ = tx.update({"kernel": jnp.asarray(gk), "bias": jnp.asarray(gb)}, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  keras_opt = keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.1)
  vk, vb = keras.Variable(kernel), keras.Variable(bias)
  keras_opt.exclude_from_weight_decay(var_list=[vb])
  keras_opt.apply_gradients([(gk, vk), (gb, vb)])
  np.testing.assert_allclose(np.asarray(new["kernel"]), vk.numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(new["bias"]), vb.numpy(), rtol=1e-5, atol=1e-7)


def _small_model():
  return ResDenseNet(backbones=("resnet50", "densenet121"), fusion_filters=8, pooling="gem", backbone_kwargs=SMALL)


@pytest.fixture(scope="module")
def small_params():
  model = _small_model()
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  return model, variables["params"]


def _frozen_paths(labels):
  return {"/".join(k) for k, v in traverse_util.flatten_dict(labels).items() if v == optim.FROZEN}


def test_rules_cover_every_parameter_exactly_once(small_params):
  model, params = small_params
  keras_layers = model.keras_layers()
  all_paths = {"/".join(k) for k in traverse_util.flatten_dict(params)}
  head = {p for p in all_paths if not p.startswith(("resnet50/", "densenet121/"))}
  assert head == {"resnet50_fusion_conv/kernel", "resnet50_fusion_conv/bias", "densenet121_fusion_conv/kernel",
                  "densenet121_fusion_conv/bias", "gem_pool/p", "predictions/kernel", "predictions/bias"}
  labels = optim.freeze_labels(params, ("backbones",), keras_layers)
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  assert _frozen_paths(labels) == all_paths - head
  assert _frozen_paths(optim.freeze_labels(params, ("densenet121",), keras_layers)) == {
      p for p in all_paths if p.startswith("densenet121/")}
  assert _frozen_paths(optim.freeze_labels(params, ("all",), keras_layers)) == all_paths
  assert _frozen_paths(optim.freeze_labels(params, (), keras_layers)) == set()
  assert _frozen_paths(optim.freeze_labels(params, (r"re:.*_bn/.*",), keras_layers)) == {
      p for p in all_paths if "_bn/" in p}
  counts = optim.count(labels, params)
  assert counts[optim.FROZEN] + counts[optim.TRAINABLE] == sum(p.size for p in jax.tree.leaves(params))


def test_first_n_keras_layers_rule(small_params):
  model, params = small_params
  keras_layers = model.keras_layers()
  n = 12
  labels = optim.freeze_labels(params, (f"resnet50:{n}",), keras_layers)
  expected = {"/".join(("resnet50", *w[1:])) for layer in keras_layers["resnet50"][:n] for w in layer.weights
              if w[0] == "params"}
  assert expected and _frozen_paths(labels) == expected
  frozen_bn = optim.frozen_batchnorm(labels, keras_layers)
  assert frozen_bn["densenet121"] == ()
  assert frozen_bn["resnet50"] == tuple(l.name for l in keras_layers["resnet50"][:n]
                                        if l.class_name == "BatchNormalization")


def test_bad_rules_fail_clearly(small_params):
  model, params = small_params
  keras_layers = model.keras_layers()
  with pytest.raises(ValueError, match="not a backbone"):
    optim.freeze_labels(params, ("resnet101",), keras_layers)
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.freeze_labels(params, ("re:nothing_like_this",), keras_layers)
  with pytest.raises(ValueError, match="more layers than"):
    optim.freeze_labels(params, ("densenet121:100000",), keras_layers)


def test_frozen_parameters_have_no_optimizer_state(small_params):
  model, params = small_params
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  labels = optim.freeze_labels(params, ("backbones",), model.keras_layers())
  trainable, frozen = optim.split(params, labels)
  tx = optim.create_optimizer(ml_collections.ConfigDict({"name": "rmsprop", "learning_rate": 1e-4}), labels, 10)
  state = tx.init(params)
  state_sizes = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  # RMSprop keeps one accumulator per trainable scalar and nothing for the frozen backbones.
  assert state_sizes == sum(p.size for p in trainable.values())
  assert sum(p.size for p in frozen.values()) > 0


@pytest.mark.parametrize("arch", ["resnet101", "densenet121"])
def test_first_100_keras_layers_match_keras_model_layers(arch):
  keras_model = build_keras(arch, input_shape=(32, 32, 3))
  ours = models.BACKBONES[arch]().keras_layers()
  theirs = keras_model.layers
  assert [l.class_name for l in ours] == [type(l).__name__ for l in theirs]
  # Keras names parameter-free padding layers automatically; every layer with weights has a fixed name.
  assert [l.name for l in ours[:100] if l.weights] == [l.name for l in theirs[:100] if l.weights]
  model = ResDenseNet(backbones=(arch,), fusion_filters=8)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
  labels = optim.freeze_labels(params, ("backbones:100",), model.keras_layers())
  frozen = {k[1] for k, v in traverse_util.flatten_dict(labels).items() if v == optim.FROZEN}
  trainable = {k[1] for k, v in traverse_util.flatten_dict(labels).items() if v == optim.TRAINABLE and k[0] == arch}
  keras_frozen = {l.name for l in theirs[:100] if l.weights}
  keras_trainable = {l.name for l in theirs[100:] if l.weights}
  assert frozen == keras_frozen and trainable == keras_trainable
