"""Phase 1 from cached backbone features: the model's two halves, the cache, and the head step against
train.train_step on the same images."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from resdense_jax import data, feature_cache, losses, models, optim, train
from resdense_jax.data import augment
from resdense_jax.models.resdense import ResDenseNet

import demo_configs
import trees

SIZE = 64  # final feature maps 2x2: the 3x3 fusion conv sees its neighbours, a layout slip shows
BATCH = 8


@dataclasses.dataclass(frozen=True)
class Setup:
  config: Any
  source: data.RawScans
  model: ResDenseNet
  variables: dict  # host numpy: steps donate their state, these stay
  plan: list
  phase: train.Phase  # the tiny config's phase 1: freeze ("backbones",), RMSprop 1e-3, dropout 0.2


def _random_variables(model) -> dict:
  """Random numpy variables of the model's shapes: compiling `init` costs 10-16 s on this CPU, numpy nothing.
  He-scaled kernels, and BatchNorm statistics away from 0 / 1 so that using them or not shows."""
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
      if jax.tree_util.keystr(path) == "['params']['resnet50']['conv1_conv']['kernel']":
        value /= 128.0  # caffe preprocessing leaves pixels in +-128: logits of order 1, not 30
    elif "var" in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif "scale" in name:
      value = rng.uniform(0.8, 1.2, leaf.shape)
    else:  # biases, BatchNorm offsets and means
      value = rng.normal(0.0, 0.1, leaf.shape)
    return value.astype(leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = demo_configs.tiny_config()
  assert config.model.dropout > 0 and config.phases[0].freeze == ("backbones",)
  root = demo_configs.tiny_collection(tmp_path_factory.mktemp("ct"))
  source = data.RawScans(data.discover(root, seed=0).train, progress=False)
  model = train.create_model(config.model)
  variables = _random_variables(model)
  plan = train.plan_phases(config, steps_per_epoch=4)
  phase = train.create_phase(0, plan, config, variables["params"])
  return Setup(config, source, model, variables, plan, phase)


def _shapes(tree) -> dict:
  """{path: (shape, dtype)} of arrays or ShapeDtypeStructs (trees.py compares values)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat}


def _build(s: Setup, **kwargs):
  options = dict(model=s.phase.model, labels=s.phase.labels, num_views=1, image_size=SIZE, batch_size=BATCH,
                 seed=0, augment=False, progress=False)
  options.update(kwargs)
  return feature_cache.build(s.source, s.variables, **options)


def test_head_of_backbone_features_is_the_full_model(setup):
  model, variables = setup.model, setup.variables  # no frozen BatchNorm: train=True trains them all
  # 32 px (1x1 maps) keeps this compile short; the step test below runs the head on 2x2 maps.
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
  key, other_key = jax.random.PRNGKey(7), jax.random.PRNGKey(8)

  def full(variables, images):
    inference, captured = model.apply(variables, images, train=False, mutable=["intermediates"],
                                      capture_intermediates=lambda m, _: m.name in model.backbones)
    training, updated = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                    rngs={"dropout": key})
    maps = {name: captured["intermediates"][name]["__call__"][0] for name in model.backbones}
    return inference, training, updated["batch_stats"], maps

  def split(variables, images):
    maps = model.apply(variables, images, train=False, method="backbone_features")
    inference = model.apply(variables, maps, train=False, method="head")
    train_maps, updated = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                      method=ResDenseNet.backbone_features)
    training = model.apply(variables, train_maps, train=True, rngs={"dropout": key}, method="head")
    other = model.apply(variables, train_maps, train=True, rngs={"dropout": other_key}, method="head")
    return inference, training, updated["batch_stats"], maps, other

  # One program for both (one compile); XLA may share identical subcomputations, never change what they give.
  expected, got = jax.jit(lambda v, x: (full(v, x), split(v, x)))(variables, images)
  for what, a, b in zip(("inference", "training", "batch_stats", "feature maps"), got, expected):
    trees.assert_trees_close({what: a}, {what: b}, rtol=1e-6)
  assert np.abs(np.asarray(got[4]) - np.asarray(got[1])).max() > 1e-3  # dropout is on: the key matters
  assert set(got[3]) == set(model.backbones)
  # The head alone creates exactly the head's parameters of the full tree.
  head_shapes = jax.eval_shape(functools.partial(model.init, method="head"), key, got[3])["params"]
  head_params = {k: v for k, v in variables["params"].items() if k not in model.backbones}
  assert head_params and _shapes(head_shapes) == _shapes(head_params)


def _fresh_state(host_state, mesh):
  """Device copies of a host state (the steps donate theirs; numpy buffers must not be shared)."""
  return jax.device_put(jax.tree.map(lambda a: jnp.array(a, copy=True), host_state), train.replicated(mesh))


def test_head_step_equals_the_train_step_on_the_same_images(setup):
  s, phase = setup, setup.phase
  cache = _build(s)
  mesh = train.create_mesh()
  loss_fn = losses.get_loss(s.config.train.loss)
  train_fn = train.compile_train_step(phase, loss_fn, mesh)
  head_fn = feature_cache.compile_head_step(phase, loss_fn, mesh)
  start = train.create_train_state(jax.random.PRNGKey(1), s.variables, phase)
  # A non-zero step: the dropout key is the state's key folded with the step.
  start = jax.tree.map(np.asarray, start.replace(step=jnp.asarray(5, jnp.int32)))
  full_state, head_state = _fresh_state(start, mesh), _fresh_state(start, mesh)
  sharding = train.data_sharded(mesh)
  for step in range(2):
    batch = cache.batch(step)
    rows = cache.slices[cache.entry_indices(step) // cache.num_views]
    # The images, independently of the cache: the pipeline's resize of each slice (no augmentation).
    grey = np.stack([augment.resize(s.source.load(int(scan), int(index)), SIZE) for scan, index in rows])
    labels = np.asarray([s.source.scans[scan].label for scan, _ in rows], np.int32)
    np.testing.assert_array_equal(batch["label"], labels)
    full_state, full_metrics = train_fn(full_state, data.to_global_batch(
        {"image": augment.grey_to_rgb(grey), "label": labels}, sharding))
    head_state, head_metrics = head_fn(head_state, cache.global_batch(step, sharding))
    np.testing.assert_allclose(float(head_metrics["loss"]), float(full_metrics["loss"]), rtol=1e-6)
    assert float(head_metrics["accuracy"]) == float(full_metrics["accuracy"])

  full_state, head_state = jax.tree.map(np.asarray, full_state), jax.tree.map(np.asarray, head_state)
  assert int(head_state.step) == int(full_state.step) == 7
  np.testing.assert_array_equal(head_state.rng, full_state.rng)
  trees.assert_trees_close(head_state.params, full_state.params, rtol=1e-6, atol=1e-7)
  trees.assert_trees_close(head_state.opt_state, full_state.opt_state, rtol=1e-6, atol=1e-7)
  # Every backbone BatchNorm ran in inference mode: statistics untouched, in both.
  trees.assert_trees_equal(head_state.batch_stats, start.batch_stats)
  trees.assert_trees_equal(full_state.batch_stats, start.batch_stats)
  flat_labels = traverse_util.flatten_dict(phase.labels)
  before = traverse_util.flatten_dict(start.params)
  after = {"head": traverse_util.flatten_dict(head_state.params),
           "full": traverse_util.flatten_dict(full_state.params)}
  trainable = [p for p, label in flat_labels.items() if label == optim.TRAINABLE]
  assert trainable and all(p[0] not in s.model.backbones for p in trainable)
  for path, label in flat_labels.items():
    for which, params in after.items():
      if label == optim.FROZEN:
        assert np.array_equal(params[path], before[path]), f"{which}: {'/'.join(path)}"
      else:
        assert not np.array_equal(params[path], before[path]), f"{which}: {'/'.join(path)} did not train"


def test_cache_is_reproducible_and_each_pass_covers_every_entry_once(setup, tmp_path):
  s = setup
  views = 3
  first = _build(s, num_views=views, augment=True, seed=3)
  second = _build(s, num_views=views, augment=True, seed=3, directory=tmp_path / "cache")
  reused = _build(s, num_views=views, augment=True, seed=3, directory=tmp_path / "cache")
  assert not first.loaded and not second.loaded and reused.loaded
  num_slices = len(data.select_slices(s.source.num_slices))
  for cache in (second, reused):
    trees.assert_trees_equal(cache.features, first.features)
    np.testing.assert_array_equal(cache.labels, first.labels)
    np.testing.assert_array_equal(cache.slices, first.slices)
  assert first.num_entries == num_slices * views and first.valid.all()
  for name, features in first.features.items():
    assert not np.array_equal(features[0], features[1]), name  # two views of one slice: two augmentations
  # Other backbone weights: the disk cache is rebuilt, not reused.
  changed = jax.tree.map(np.copy, s.variables)
  changed["params"]["densenet121"]["conv1_conv"]["kernel"] *= 2.0
  rebuilt = feature_cache.build(s.source, changed, model=s.phase.model, labels=s.phase.labels, num_views=views,
                                image_size=SIZE, batch_size=BATCH, seed=3, augment=True, progress=False,
                                directory=tmp_path / "cache")
  assert not rebuilt.loaded
  assert not np.array_equal(rebuilt.features["densenet121"], first.features["densenet121"])
  np.testing.assert_array_equal(rebuilt.features["resnet50"], first.features["resnet50"])

  per_pass = first.steps_per_epoch
  assert per_pass == num_slices * views // BATCH
  passes = [np.concatenate([first.entry_indices(step) for step in range(p * per_pass, (p + 1) * per_pass)])
            for p in range(2)]
  for entries in passes:
    assert len(entries) == per_pass * BATCH and len(set(entries.tolist())) == len(entries)
    assert entries.min() >= 0 and entries.max() < first.num_entries
  assert not np.array_equal(passes[0], passes[1])  # a fresh permutation each pass
  # From the step alone: a fresh cache object asked out of order gives the same batches.
  for step in (per_pass + 1, 0, 3 * per_pass - 1):
    trees.assert_trees_equal(reused.batch(step), first.batch(step))
  batch = first.batch(2)
  entries = first.entry_indices(2)
  expected_labels = [s.source.scans[scan].label for scan, _ in first.slices[entries // views]]
  np.testing.assert_array_equal(batch["label"], expected_labels)
  trees.assert_trees_equal(batch["features"], {name: f[entries] for name, f in first.features.items()})
  halves = [first.batch(2, shard_index=i, shard_count=2) for i in range(2)]
  trees.assert_trees_equal(jax.tree.map(lambda *parts: np.concatenate(parts), *halves), batch)


class _OneBadSlice:
  """The source with one slice that cannot be read."""

  def __init__(self, source, bad):
    self.source, self.bad = source, tuple(int(v) for v in bad)
    self.scans, self.num_slices = source.scans, source.num_slices

  def load(self, scan_index, slice_index):
    if (scan_index, slice_index) == self.bad:
      raise data.SliceError(f"scan{scan_index}/{slice_index}.png", "broken on purpose")
    return self.source.load(scan_index, slice_index)


def test_unreadable_slices_are_left_out(setup):
  s = setup
  views = 2
  clean = _build(s, num_views=views, augment=True)
  bad_source = _OneBadSlice(s.source, clean.slices[1])
  with pytest.warns(data.DataWarning, match="1 unreadable slices left out"):
    cache = feature_cache.build(bad_source, s.variables, model=s.phase.model, labels=s.phase.labels,
                                num_views=views, image_size=SIZE, batch_size=BATCH, seed=0, progress=False)
  bad_entries = [views, views + 1]  # slice 1's two views
  assert np.flatnonzero(~cache.valid).tolist() == bad_entries
  assert (cache.labels[bad_entries] == -1).all()
  np.testing.assert_array_equal(np.delete(cache.labels, bad_entries), np.delete(clean.labels, bad_entries))
  for name in cache.features:  # the others computed as without the bad slice in their batch
    np.testing.assert_allclose(np.delete(cache.features[name], bad_entries, axis=0),
                               np.delete(clean.features[name], bad_entries, axis=0), rtol=1e-6, err_msg=name)
  assert cache.steps_per_epoch == (cache.num_entries - 2) // BATCH
  batched = np.concatenate([cache.entry_indices(step) for step in range(3 * cache.steps_per_epoch)])
  assert not set(bad_entries) & set(batched.tolist())


def test_views_are_the_pipelines_augmentations(setup):
  image = setup.source.load(0, 1)
  resized = augment.resize(image, SIZE)
  mirrored = augment.flip_horizontal(resized)
  assert not np.array_equal(resized, mirrored)
  kwargs = dict(image_size=SIZE, seed=0, scan_index=0, slice_index=1)
  plain = feature_cache.view_image(image, view=0, augment=False, **kwargs)
  np.testing.assert_array_equal(plain, resized)
  # Rotation off: each view is the slice or its mirror (RandomFlip("horizontal")), both among 16 views.
  flips = [feature_cache.view_image(image, view=v, rotation_factor=0.0, **kwargs) for v in range(16)]
  assert all(np.array_equal(f, resized) or np.array_equal(f, mirrored) for f in flips)
  assert any(np.array_equal(f, resized) for f in flips) and any(np.array_equal(f, mirrored) for f in flips)
  rotated = [feature_cache.view_image(image, view=v, **kwargs) for v in range(16)]
  assert sum(not (np.array_equal(r, resized) or np.array_equal(r, mirrored)) for r in rotated) >= 15
  np.testing.assert_array_equal(feature_cache.view_image(image, view=5, **kwargs), rotated[5])


def test_check_refuses_a_trainable_backbone_or_a_training_batchnorm(setup):
  s = setup
  feature_cache.check(s.phase.model, s.phase.labels)
  assert feature_cache.applies(s.phase.model, s.phase.labels)
  finetune = train.create_phase(1, s.plan, s.config, s.variables["params"])
  assert tuple(s.config.phases[1].freeze) == ("backbones:10",)
  with pytest.raises(ValueError, match=r"resnet50/\w+/\w+ is trainable in this phase"):
    feature_cache.check(finetune.model, finetune.labels)
  assert not feature_cache.applies(finetune.model, finetune.labels)
  with pytest.raises(ValueError, match="is trainable"):
    _build(s, model=finetune.model, labels=finetune.labels)
  with pytest.raises(ValueError, match="is trainable"):
    feature_cache.compile_head_step(finetune, losses.binary_cross_entropy, train.create_mesh())
  # Every parameter frozen, but a model whose BatchNorms train with train=True.
  with pytest.raises(ValueError, match="BatchNorm resnet50/conv1_bn runs in training mode"):
    feature_cache.check(s.model, s.phase.labels)
  frozen_bn = dict(s.phase.model.frozen_bn)
  last = frozen_bn["densenet121"][-1]
  frozen_bn["densenet121"] = frozen_bn["densenet121"][:-1]
  with pytest.raises(ValueError, match=f"BatchNorm densenet121/{last} runs in training mode"):
    feature_cache.check(s.phase.model.clone(frozen_bn=tuple(frozen_bn.items())), s.phase.labels)
  assert feature_cache.applies(s.model.clone(backbone_bn_inference=True), s.phase.labels)
