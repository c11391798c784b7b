"""The stabilisers of issue 11: zero-initialised head, learning-rate warmup, EMA of the weights, balanced sampling.

Each is a config field whose default leaves today's training bitwise as it was; each is checked by hand here.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from resdense_jax import checkpoints, data, losses, optim, train
from resdense_jax.data import pipeline
from resdense_jax.models import resdense

import demo_configs
import trees

common = demo_configs.common  # configs/common.py (demo_configs puts configs/ on the path)

SIZE = 32


def _images(seed: int, n: int = 8):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.integers(0, 256, (n, SIZE, SIZE, 3)), jnp.uint8),
          "label": jnp.asarray(np.arange(n) % 2, jnp.int32)}


def _host(tree):
  return jax.tree.map(np.array, tree)


@pytest.fixture(scope="module")
def tiny():
  """The tiny engine config's model and zero variables of its shapes (abstract init: nothing compiled)."""
  config = demo_configs.tiny_config()
  model = train.create_model(config.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))
  return config, model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))


def _phase(config, index: int, params, steps_per_epoch: int = 3):
  return train.create_phase(index, train.plan_phases(config, steps_per_epoch), config, params)


# ----------------------------------------------------------------------------------------------- head_init


def _small_zero_head_config():
  """The tiny config with one tiny backbone (quicker compiles, the same head) and the zero head; the loop test
  below uses the same model, so the two share the compiled init program."""
  config = demo_configs.tiny_config()
  config.model.backbones = ("resnet50",)
  config.model.head_init = "zeros"
  return config


def test_zeros_head_starts_neutral_logits_0_and_loss_ln2():
  config = _small_zero_head_config()
  model = train.create_model(config.model)
  variables = _host(train.initialized(jax.random.key(0, impl="rbg"), model, SIZE))  # as the loop does
  params = variables["params"]
  assert not np.any(params["predictions"]["kernel"]) and not np.any(params["predictions"]["bias"])
  assert np.any(params["resnet50_fusion_conv"]["kernel"])  # only the head starts at zero
  loss_fn = losses.get_loss(config.train.loss)

  @jax.jit
  def first_forward(params, batch_stats, batch):  # the first step's: training mode, dropout on
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
                            mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
    return logits, loss_fn(logits, batch["label"])

  logits, loss = first_forward(params, variables["batch_stats"], _images(0))
  np.testing.assert_array_equal(np.asarray(logits), 0.0)
  assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)


def test_head_init_options_are_the_named_initialisers():
  key, shape = jax.random.PRNGKey(3), (64, 1)
  # "flax" (the default) is exactly Flax's Dense default: the model's initial weights are today's.
  np.testing.assert_array_equal(resdense.HEAD_INITS["flax"][0](key, shape), nn.linear.default_kernel_init(key, shape))
  np.testing.assert_array_equal(resdense.HEAD_INITS["keras"][0](key, shape),
                                nn.initializers.glorot_uniform()(key, shape))
  assert common.get_base_config().model.head_init == "flax"
  with pytest.raises(ValueError, match="head_init"):
    model = resdense.ResDenseNet(backbones=("resnet50",),
                                 backbone_kwargs={"resnet50": demo_configs.TINY_BACKBONES["resnet50"]},
                                 fusion_filters=8, head_init="glorot")
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))


# ------------------------------------------------------------------------------------------------- warmup

PEAK, PHASE_EPOCHS, STEPS_PER_EPOCH = 0.1, 3, 4  # the second phase: steps [4, 16)


def _sgd_phase(tiny_params, schedule: str, **warmup):
  config = demo_configs.tiny_config()
  config.phases = [common.phase("head", 1, ("backbones",), optimizer="sgd", learning_rate=PEAK),
                   common.phase("finetune", PHASE_EPOCHS, ("backbones:10",), optimizer="sgd", learning_rate=PEAK)]
  config.phases[1].optimizer.schedule = schedule
  config.phases[1].optimizer.update(warmup)
  return _phase(config, 1, tiny_params, STEPS_PER_EPOCH)


def _learning_rates(phase, params, steps: int) -> list[float]:
  """-(update of a trainable bias) under gradient 1 at each of the phase's steps: SGD's learning rate."""
  opt_state, update, out = phase.tx.init(params), jax.jit(phase.tx.update), []
  ones = jax.tree.map(jnp.ones_like, params)
  for _ in range(steps):
    updates, opt_state = update(ones, opt_state, params)
    out.append(-float(updates["predictions"]["bias"][0]))
  return out


@pytest.mark.parametrize("schedule,warmup", [("constant", {"warmup_steps": 4}),
                                             ("cosine", {"warmup_epochs": 1.0})])
def test_warmup_through_create_phase_by_hand(tiny, schedule, warmup):
  params = tiny[2]["params"]
  phase = _sgd_phase(params, schedule, **warmup)
  assert (phase.start_step, phase.end_step) == (STEPS_PER_EPOCH, STEPS_PER_EPOCH * (1 + PHASE_EPOCHS))
  n, w = STEPS_PER_EPOCH * PHASE_EPOCHS, 4  # warmup_epochs 1.0 = the 4 steps of an epoch
  lrs = _learning_rates(phase, params, n + 1)
  # By hand: 0 at the phase's step 0, k/w of the peak at step k, the peak at step w; then the schedule
  # (cosine from the peak at w to 0 at n).
  for k in range(n + 1):
    if k < w:
      expected = PEAK * k / w
    elif schedule == "constant":
      expected = PEAK
    else:
      expected = PEAK * (1 + math.cos(math.pi * min(k - w, n - w) / (n - w))) / 2
    assert lrs[k] == pytest.approx(expected, rel=1e-5, abs=1e-9), (k, lrs)
  assert lrs[0] == 0.0 and lrs[w // 2] == pytest.approx(PEAK / 2) and lrs[w] == pytest.approx(PEAK)


def test_warmup_errors_and_default():
  config = common.phase("p", 1, ()).optimizer
  assert config.warmup_steps == 0 and config.warmup_epochs == 0.0
  config.warmup_steps, config.warmup_epochs = 2, 1.0
  with pytest.raises(ValueError, match="not both"):
    optim.learning_rate_schedule(config, 10, steps_per_epoch=5)
  config.warmup_steps = 0
  with pytest.raises(ValueError, match="steps per epoch"):
    optim.learning_rate_schedule(config, 10)


# ----------------------------------------------------------------------------------------------------- EMA


def _ema_config(decay: float = 0.2, warmup: bool = True):
  config = demo_configs.tiny_config()
  config.train.ema_decay = decay
  config.train.ema_warmup = warmup
  return config


def test_ema_decay_by_hand():
  decays = [float(optim.ema_decay_at(0.2, t, warmup=True)) for t in range(4)]
  np.testing.assert_allclose(decays, [0.1, 2 / 11, 0.2, 0.2], rtol=1e-6)
  assert float(optim.ema_decay_at(0.999, 0, warmup=False)) == pytest.approx(0.999)
  ema = {"params": {"a": jnp.asarray([1.0, 2.0])}, "batch_stats": {"m": jnp.asarray([0.3])}}
  new = optim.ema_update(ema, {"a": jnp.asarray([3.0, 2.0]), "b": jnp.ones(2)}, {"m": jnp.asarray([0.3])},
                         jnp.float32(0.75))
  np.testing.assert_allclose(new["params"]["a"], [1.5, 2.0])
  assert set(new["params"]) == {"a"} and float(new["batch_stats"]["m"][0]) == np.float32(0.3)  # bitwise


EMA_DECAY = 0.2  # with the warmup: 0.1, 0.18, then 0.2 (both sides of the min within 3 steps)


def test_ema_after_n_steps_is_the_average_by_hand():
  """with_ema around a step that moves the weights by known amounts: after n steps of a phase starting at step
  3 the EMA is numpy's average of the trajectory (warmup decays), frozen leaves have no EMA and evaluate raw."""
  params = {"head": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}, "backbone": {"kernel": jnp.ones((4,))}}
  labels = {"head": {"kernel": optim.TRAINABLE, "bias": optim.TRAINABLE}, "backbone": {"kernel": optim.FROZEN}}
  stats = {"bn": {"mean": jnp.full(3, 0.5)}, "frozen_bn": {"mean": jnp.full(2, 0.1)}}
  rng = np.random.default_rng(0)
  moves = [{"kernel": rng.normal(size=(2, 3)).astype(np.float32), "bias": rng.normal(size=3).astype(np.float32),
            "mean": rng.normal(size=3).astype(np.float32)} for _ in range(5)]

  def step(state, move):  # a train step's effect: trainable weights and live statistics move, the rest stays
    head = {name: state.params["head"][name] + move[name] for name in ("kernel", "bias")}
    bn = {"mean": state.batch_stats["bn"]["mean"] + move["mean"]}
    return state.replace(step=state.step + 1, params={**state.params, "head": head},
                         batch_stats={**state.batch_stats, "bn": bn}), {}

  state = train.TrainState(step=jnp.int32(3), params=params, batch_stats=stats, opt_state=None,
                           rng=jax.random.PRNGKey(0), ema=optim.ema_init(params, stats, labels))
  averaged = jax.jit(train.with_ema(step, train.Ema(EMA_DECAY, True, 3)))
  trajectory = [_host(state.variables)]
  for move in moves:
    state, _ = averaged(state, move)
    trajectory.append(_host(state.variables))

  def by_hand(get):
    average = get(trajectory[0])
    for t, now in enumerate(trajectory[1:]):
      d = min(EMA_DECAY, (1 + t) / (10 + t))
      average = average * d + get(now) * (1 - d)
    return average

  assert set(traverse_util.flatten_dict(state.ema["params"])) == {("head", "kernel"), ("head", "bias")}
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(state.ema["params"]["head"][name], by_hand(lambda v: v["params"]["head"][name]),
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.ema["batch_stats"]["bn"]["mean"],
                             by_hand(lambda v: v["batch_stats"]["bn"]["mean"]), rtol=1e-5, atol=1e-6)
  assert np.array_equal(state.ema["batch_stats"]["frozen_bn"]["mean"], stats["frozen_bn"]["mean"])  # bitwise
  evaluated = _host(state.eval_variables)
  assert np.array_equal(evaluated["params"]["backbone"]["kernel"], params["backbone"]["kernel"])
  assert not np.allclose(evaluated["params"]["head"]["kernel"], trajectory[-1]["params"]["head"]["kernel"])
  with pytest.raises(ValueError, match="no EMA"):
    averaged(state.replace(ema=None), moves[0])


def test_cached_feature_head_step_updates_the_ema(tiny):
  """Phase 1 from cached backbone features (config.train.cache_frozen_features) averages the weights too."""
  config, model, variables = tiny
  config = _ema_config()
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda z: (0.1 * rng.normal(size=z.shape)).astype(z.dtype), variables)
  phase = _phase(config, 0, variables["params"])
  shapes = jax.eval_shape(lambda v, x: model.apply(v, x, method="backbone_features"), variables,
                          jnp.zeros((8, SIZE, SIZE, 3)))
  batch = {"features": {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in shapes.items()},
           "label": jnp.asarray(np.arange(8) % 2, jnp.int32)}
  state = train.create_train_state(jax.random.PRNGKey(1), jax.tree.map(jnp.asarray, variables), phase)
  step = train.compile_head_step(phase, losses.binary_cross_entropy, train.create_mesh())
  new, _ = step(state, batch)
  before = traverse_util.flatten_dict(variables["params"])
  after = traverse_util.flatten_dict(_host(new.params))
  ema = traverse_util.flatten_dict(_host(new.ema["params"]))
  assert set(ema) == set(optim.split(variables["params"], phase.labels)[0])
  for path, value in ema.items():  # update t = 0: decay 0.1
    np.testing.assert_allclose(value, 0.1 * before[path] + 0.9 * after[path], rtol=1e-5, atol=1e-7)
  assert not np.array_equal(after[("predictions", "kernel")], before[("predictions", "kernel")])


def test_precise_bn_with_ema_estimates_the_averaged_weights_statistics():
  """PreciseBN with an EMA: the statistics are computed under the EMA weights and replace the EMA's, the raw
  moving statistics stay (they only serve inference, and inference uses the EMA)."""
  params = {"w": jnp.zeros(2)}
  stats = {"bn": {"mean": jnp.zeros(2)}}
  ema = {"params": {"w": jnp.asarray([1.0, 2.0])}, "batch_stats": {"bn": {"mean": jnp.asarray([0.5, 0.5])}}}
  state = train.TrainState(step=jnp.int32(5), params=params, batch_stats=stats, opt_state=None,
                           rng=jax.random.PRNGKey(0), ema=ema)
  seen = []

  def stats_fn(variables, images):  # the batch's statistics: here the weights plus the batch's mean pixel
    seen.append(_host(variables))
    return {"bn": {"mean": variables["params"]["w"] + jnp.mean(images)}}

  mesh = train.create_mesh()
  batches = iter([{"image": np.full((1, 2, 2, 3), v, np.float32)} for v in (1.0, 3.0)])
  out = train.precise_batch_stats(state, batches, stats_fn=stats_fn, batch_sharding=train.data_sharded(mesh),
                                  num_batches=2)
  trees.assert_trees_equal(seen[0], _host(state.eval_variables))
  np.testing.assert_allclose(out.ema["batch_stats"]["bn"]["mean"], [3.0, 4.0], rtol=1e-6)  # w + mean(1, 3)
  trees.assert_trees_equal(_host(out.batch_stats), _host(stats))
  trees.assert_trees_equal(_host(out.ema["params"]), _host(ema["params"]))


def test_ema_carries_over_phases_for_parameters_trainable_in_both(tiny):
  _, _, variables = tiny
  config = _ema_config()
  phase0, phase1 = _phase(config, 0, variables["params"]), _phase(config, 1, variables["params"])
  state = train.create_train_state(jax.random.PRNGKey(1), jax.tree.map(jnp.asarray, variables), phase0)
  head_ema = jax.tree.map(lambda x: x + 1.0, state.ema["params"])  # an average that differs from the weights
  moved = train.start_phase(state.replace(ema={**state.ema, "params": head_ema}), phase1)
  flat = traverse_util.flatten_dict(_host(moved.ema["params"]))
  before = traverse_util.flatten_dict(_host(head_ema))
  params = traverse_util.flatten_dict(variables["params"])
  for path, value in flat.items():
    np.testing.assert_array_equal(value, before[path] if path in before else params[path])
  assert len(flat) > len(before)


@pytest.mark.slow
def test_ema_is_evaluated_checkpointed_loaded_and_resumed_exactly(tmp_path, monkeypatch):
  """A tiny run with EMA stopped at step 4 (mid-epoch) and resumed: evaluation gets the EMA, the restored
  state (EMA included) is bitwise the one saved, and inference loads what was evaluated."""
  config = _small_zero_head_config()
  config.train.ema_decay = EMA_DECAY
  # One head-only phase: quick to compile (test_ema_carries_over_phases... covers phase boundaries).
  config.phases = [common.phase("head", 3, ("backbones",), optimizer="adam", learning_rate=1e-2)]
  config.data.root = str(demo_configs.tiny_collection(tmp_path / "data"))
  config.data.balanced_sampling = True  # through the loop as well
  evaluated, saved, restored = {}, {}, []
  real_evaluate, real_save, real_restore = train.evaluate.evaluate, train.checkpoints.save, train.checkpoints.restore

  def recording_evaluate(eval_fn, variables, *args, **kwargs):
    evaluated[len(evaluated)] = _host(variables)
    return real_evaluate(eval_fn, variables, *args, **kwargs)

  def recording_save(manager, step, state, *args, **kwargs):
    saved[step] = _host(state)
    return real_save(manager, step, state, *args, **kwargs)

  def recording_restore(*args, **kwargs):
    state, it = real_restore(*args, **kwargs)
    restored.append(_host(state))
    return state, it

  monkeypatch.setattr(train.evaluate, "evaluate", recording_evaluate)
  monkeypatch.setattr(train.checkpoints, "save", recording_save)
  monkeypatch.setattr(train.checkpoints, "restore", recording_restore)
  workdir = tmp_path / "run"
  assert train.train_and_evaluate(config, workdir, max_steps=4)["step"] == 3
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 9 and len(evaluated) == 3 and sorted(saved) == [3, 4, 6, 9]
  assert len(restored) == 1 and restored[0].ema is not None
  trees.assert_trees_equal(restored[0], saved[4])
  # Step 4 is update t = 3 (decay min(0.2, 4 / 13) = 0.2): its EMA by hand from the states at steps 3 and 4.
  for path, before in traverse_util.flatten_dict(saved[3].ema["params"]).items():
    now = traverse_util.flatten_dict(saved[4].params)[path]
    np.testing.assert_allclose(traverse_util.flatten_dict(saved[4].ema["params"])[path],
                               0.2 * before + 0.8 * now, rtol=1e-6, atol=1e-7)
  by_step = dict(zip([3, 6, 9], evaluated.values()))
  for step in (3, 6, 9):  # evaluated: the EMA of the state saved at that step
    trees.assert_trees_equal(by_step[step], _host(saved[step].eval_variables))
  last = workdir / "checkpoints" / "9"
  _, loaded, _ = checkpoints.load_for_inference(last)
  _, raw, _ = checkpoints.load_for_inference(last, ema=False)
  trees.assert_trees_equal(loaded, by_step[9])  # what was evaluated is what inference loads
  trees.assert_trees_equal(raw, saved[9].variables)
  assert not np.array_equal(raw["params"]["predictions"]["kernel"], loaded["params"]["predictions"]["kernel"])
  _, best, _ = checkpoints.load_for_inference(workdir)
  trees.assert_trees_equal(best, by_step[result["best_step"]])


def test_defaults_leave_the_train_step_and_state_as_they_were(tiny):
  """ema_decay 0, head_init flax, no warmup: the state has no extra leaf and the compiled train step is the
  program of the plain train_step (what compile_train_step jitted before the EMA)."""
  config, _, variables = tiny
  assert config.train.ema_decay == 0.0
  mesh = train.create_mesh()
  phase = _phase(config, 0, variables["params"])
  assert phase.ema is None
  state = train.create_train_state(jax.random.PRNGKey(1), jax.tree.map(jnp.asarray, variables), phase)
  assert state.ema is None
  fields = (state.step, state.params, state.batch_stats, state.opt_state, state.rng)
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(fields))
  loss_fn = losses.get_loss(config.train.loss)
  plain = jax.jit(functools.partial(train.train_step, model=phase.model, tx=phase.tx, labels=phase.labels,
                                    loss_fn=loss_fn, remat="none"),
                  in_shardings=(train.replicated(mesh), train.data_sharded(mesh)),
                  out_shardings=(train.replicated(mesh), train.replicated(mesh)), donate_argnums=0)
  batch = _images(0)
  assert train.compile_train_step(phase, loss_fn, mesh).lower(state, batch).as_text() == plain.lower(
      state, batch).as_text()
  # The default schedule is the constant rate (no warmup).
  assert [float(optim.learning_rate_schedule(config.phases[1].optimizer, 6)(t)) for t in (0, 3)] == [1e-3, 1e-3]
  assert train.start_phase(state, phase).ema is None


def test_finetune_stable_is_the_paper_plus_the_stabilisers():
  import finetune  # noqa: PLC0415  (configs/, on the path through demo_configs)
  import finetune_stable  # noqa: PLC0415
  paper, stable = finetune.get_config(), finetune_stable.get_config()
  assert stable.model.head_init == "zeros" and stable.train.ema_decay == 0.999 and stable.train.ema_warmup
  stable.model.head_init, stable.train.ema_decay = paper.model.head_init, paper.train.ema_decay
  assert stable.to_dict() == paper.to_dict()  # nothing else differs from the paper's recipe


# ---------------------------------------------------------------------------------------- balanced sampling

# 6 non-COVID scans of 10-20 slices, 2 COVID scans of 3 and 5: 8% of the slices are COVID.
COUNTS = np.array([10, 12, 14, 16, 18, 20, 3, 5])
LABELS = np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int32)


def _batches(seed=0, *, scan_labels=LABELS, shard_index=0, shard_count=1, batch_size=8):
  records = pipeline.select_slices(COUNTS)
  return pipeline._ShuffledBatches(records, batch_size=batch_size, seed=seed, shard_index=shard_index,
                                   shard_count=shard_count, num_epochs=None, scan_labels=scan_labels)


def _epoch(ds, epoch: int, batch_size=8) -> np.ndarray:
  per_epoch = len(pipeline.select_slices(COUNTS))
  start = epoch * per_epoch
  rows = np.concatenate([ds[i] for i in range(start // batch_size, -(-(start + per_epoch) // batch_size))])
  return rows[start % batch_size:start % batch_size + per_epoch]


def test_balanced_sampling_classes_scans_and_slices():
  ds, total = _batches(), int(COUNTS.sum())  # 98 rows an epoch, as without balancing
  counts = np.zeros((len(COUNTS), COUNTS.max()), np.int64)
  for epoch in range(20):
    rows = _epoch(ds, epoch)
    assert len(rows) == total
    labels = LABELS[rows[:, 0]]
    assert (labels == 1).sum() == total // 2  # an equal share per class, every epoch
    assert np.all(rows[:, 1] < COUNTS[rows[:, 0]])
    visits = np.bincount(rows[:, 0], minlength=len(COUNTS))
    for cls in (0, 1):  # the scans of a class equally often (to one visit): every COVID scan visited
      assert visits[LABELS == cls].max() - visits[LABELS == cls].min() <= 1, visits
    np.add.at(counts, (rows[:, 0], rows[:, 1]), 1)
    # Shuffled: COVID rows spread over the epoch, not a block.
    assert 0.3 < np.flatnonzero(labels == 1).mean() / total < 0.7
  # Slices of a scan drawn uniformly: each slice of the 3-slice COVID scan about a third of its visits.
  share = counts[6, :3] / counts[6, :3].sum()
  assert np.all(np.abs(share - 1 / 3) < 0.06), share
  assert np.all(counts[7, :5] > 0) and not np.any(counts[:, 20:])


def test_balanced_sampling_is_deterministic_sharded_and_resumes_exactly():
  a, b = _epoch(_batches(seed=3), 2), _epoch(_batches(seed=3), 2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, _epoch(_batches(seed=3), 3)) and not np.array_equal(a, _epoch(_batches(seed=4), 2))
  # Two processes' blocks of a global batch are the one-process global batch.
  whole = _batches(seed=3, batch_size=8)
  halves = [_batches(seed=3, shard_index=i, shard_count=2, batch_size=4) for i in (0, 1)]
  for index in (0, 5, 13):
    np.testing.assert_array_equal(np.concatenate([h[index] for h in halves]), whole[index])
  # The iterator state (what checkpoints hold) resumes at the same row.
  it = iter(_batches(seed=3).to_iter_dataset())
  for _ in range(17):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(15)]
  again = iter(_batches(seed=3).to_iter_dataset())
  again.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(again), w)


def test_unbalanced_default_is_the_plain_permutation():
  records = pipeline.select_slices(COUNTS)
  ds = _batches(seed=5, scan_labels=None)
  order = np.random.default_rng([5, 1]).permutation(len(records))
  np.testing.assert_array_equal(_epoch(ds, 1), records[order])


def test_balanced_train_pipeline_labels(tmp_path):
  root = demo_configs.tiny_collection(tmp_path / "data")
  scans = data.discover(root).train
  covid = [s for s in scans if s.label == 1]
  scans = [s for s in scans if s.label == 0] + covid[:1]  # 3 non-COVID scans, 1 COVID
  source = data.RawScans(scans, progress=False)
  labels = []
  for i, batch in enumerate(pipeline.train_pipeline(source, image_size=SIZE, batch_size=8, seed=0,
                                                    augment=False, balanced=True)):
    labels.append(batch["label"])
    if i == 9:
      break
  labels = np.concatenate(labels)
  share = labels.mean()
  assert 0.35 < share < 0.65, share  # about a half (1 COVID scan of 4) instead of a quarter of the slices
  with pytest.raises(data.ScanError, match="two classes"):
    pipeline.train_pipeline([s for s in scans if s.label == 0], image_size=SIZE, batch_size=8, balanced=True)
