"""The train step with freezing (bitwise-frozen weights and BatchNorm statistics), phases, and kill-and-resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from resdense_jax import checkpoints, losses, metric_writer, optim, train

import demo_configs
import trees

SIZE = 32


@pytest.fixture(scope="module")
def setup():
  # The architecture of demo_configs.tiny_config(), so the kill-and-resume test reuses compiled programs.
  model = train.create_model(demo_configs.tiny_config().model)
  variables = train.initialized(jax.random.key(0, impl="rbg"), model, SIZE)  # as train_and_evaluate does
  rng = np.random.default_rng(0)
  batches = [{"image": jnp.asarray(rng.integers(0, 256, (8, SIZE, SIZE, 3)), jnp.uint8),
              "label": jnp.asarray(rng.integers(0, 2, 8), jnp.int32)} for _ in range(3)]
  return model, variables, batches


def _run(model, variables, batches, rules):
  keras_layers = model.keras_layers()
  labels = optim.freeze_labels(variables["params"], rules, keras_layers)
  phase_model = model.clone(frozen_bn=tuple(optim.frozen_batchnorm(labels, keras_layers).items()))
  tx = optim.create_optimizer(ml_collections.ConfigDict({"name": "rmsprop", "learning_rate": 1e-3}), labels, 3)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                           rng=jax.random.PRNGKey(1))
  mesh = train.create_mesh()
  phase = train.Phase(0, "test", 0, 3, labels, phase_model, tx)
  step = train.compile_train_step(phase, losses.binary_cross_entropy, mesh)
  state = jax.device_put(state, train.replicated(mesh))
  for batch in batches:
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  return labels, state


def test_frozen_weights_and_batchnorm_statistics_stay_bitwise(setup):
  model, variables, batches = setup
  # Host copies: the step donates its state.
  before = jax.tree.map(np.asarray, variables)
  labels, state = _run(model, variables, batches, ("backbones:20", "re:densenet121/conv5.*"))
  flat_labels = traverse_util.flatten_dict(labels)
  new_params = traverse_util.flatten_dict(jax.tree.map(np.asarray, state.params))
  old_params = traverse_util.flatten_dict(before["params"])
  frozen = [k for k, v in flat_labels.items() if v == optim.FROZEN]
  trainable = [k for k, v in flat_labels.items() if v == optim.TRAINABLE]
  assert frozen and trainable
  for k in frozen:
    assert np.array_equal(new_params[k], old_params[k]), "/".join(k)
  changed = [k for k in trainable if not np.array_equal(new_params[k], old_params[k])]
  # Biases of convs right before a BatchNorm get ~zero gradient; everything else must move.
  assert len(changed) >= 0.9 * len(trainable)
  frozen_bn = optim.frozen_batchnorm(labels, model.keras_layers())
  new_stats = traverse_util.flatten_dict(jax.tree.map(np.asarray, state.batch_stats))
  old_stats = traverse_util.flatten_dict(before["batch_stats"])
  for backbone, names in frozen_bn.items():
    for name in names:
      for stat in ("mean", "var"):
        assert np.array_equal(new_stats[(backbone, name, stat)], old_stats[(backbone, name, stat)])
  live = [k for k in new_stats if k[1] not in frozen_bn[k[0]]]
  assert live and all(not np.array_equal(new_stats[k], old_stats[k]) for k in live)


def test_backbone_bn_inference_keeps_every_statistic(setup):
  model, variables, batches = setup
  inference_bn = model.clone(backbone_bn_inference=True)
  forward = jax.jit(lambda v, x: inference_bn.apply(v, x, train=True, mutable=["batch_stats"], rngs={
      "dropout": jax.random.PRNGKey(0)})[1]["batch_stats"])
  kept = forward(variables, batches[0]["image"])
  trees.assert_trees_equal(kept, variables["batch_stats"])


def test_precise_batch_stats_make_inference_equal_training_mode_on_that_batch(setup):
  model, variables, batches = setup
  # One batch: its statistics in every live BatchNorm, so inference mode normalises exactly as training mode
  # does on it (dropout off); frozen BatchNorms keep their statistics bitwise.
  labels = optim.freeze_labels(variables["params"], ("re:densenet121/conv1.*",), model.keras_layers())
  frozen_bn = optim.frozen_batchnorm(labels, model.keras_layers())
  phase_model = model.clone(dropout=0.0, frozen_bn=tuple(frozen_bn.items()))
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"], opt_state=None, rng=jax.random.PRNGKey(0))
  images = np.asarray(batches[0]["image"])
  mesh = train.create_mesh()
  precise = train.precise_batch_stats(state, iter([{"image": images}, {"image": images[::-1]}]),
                                      stats_fn=train.compile_batch_statistics(phase_model, mesh),
                                      batch_sharding=train.data_sharded(mesh), num_batches=1)
  logits_train, _ = jax.jit(lambda v, x: phase_model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, images)
  logits_eval = jax.jit(lambda v, x: phase_model.apply(v, x, train=False))(precise.variables, images)
  np.testing.assert_allclose(np.asarray(logits_eval), np.asarray(logits_train), rtol=1e-4, atol=1e-4)
  assert not np.allclose(np.asarray(logits_eval),
                         np.asarray(jax.jit(lambda v, x: phase_model.apply(v, x))(variables, images)), atol=1e-3)
  flat_old = traverse_util.flatten_dict(jax.tree.map(np.asarray, variables["batch_stats"]))
  flat_new = traverse_util.flatten_dict(jax.tree.map(np.asarray, precise.batch_stats))
  assert frozen_bn["densenet121"]
  for name in frozen_bn["densenet121"]:
    for stat in ("mean", "var"):
      assert np.array_equal(flat_new[("densenet121", name, stat)], flat_old[("densenet121", name, stat)])


def test_phase_plan_and_phase_models():
  config = demo_configs.tiny_config()
  plan = train.plan_phases(config, steps_per_epoch=5)
  assert [(p[0], p[2], p[3]) for p in plan] == [("head", 0, 5), ("finetune", 5, 15)]
  assert train.phase_index_at(plan, 4) == 0 and train.phase_index_at(plan, 5) == 1
  model = train.create_model(config.model)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))["params"]
  head = train.create_phase(0, plan, config, params)
  assert optim.count(head.labels, params)[optim.TRAINABLE] == sum(
      p.size for k, p in traverse_util.flatten_dict(params).items() if k[0] not in ("resnet50", "densenet121"))
  assert all(len(names) > 0 for _, names in head.model.frozen_bn)


# A training run in its own process, SIGKILLed (no exception, no cleanup, nothing flushed) while it runs step
# `kill_at` + 1, as soon as the asynchronous checkpoint of step `committed` is on disk.
KILLED_RUN = """
import os, pathlib, signal, sys, time
sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_compilation_cache_dir", {cache!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from resdense_jax import train
import test_train
real_compile, calls = train.compiled_with_progress, {{"n": int({first_step})}}
def dying_compile(*args, **kwargs):
  step = real_compile(*args, **kwargs)
  def dying_step(state, batch):
    if calls["n"] == {kill_at}:
      committed = pathlib.Path({workdir!r}) / "checkpoints" / "{committed}"
      deadline = time.monotonic() + 120
      while not (committed / "_CHECKPOINT_METADATA").is_file() and time.monotonic() < deadline:
        time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGKILL)
    calls["n"] += 1
    return step(state, batch)
  return dying_step
train.compiled_with_progress = dying_compile
train.train_and_evaluate(test_train.resume_config({root!r}), {workdir!r})
"""


def resume_config(data_root) -> ml_collections.ConfigDict:
  """3 steps per epoch, evaluations at steps 3, 6, 9; checkpoints also at 2, 4, 8 (mid-epoch), asynchronous."""
  config = demo_configs.tiny_config()
  config.data.root = str(data_root)
  config.train.checkpoint_every_steps = 2
  assert config.train.async_checkpointing  # the default, under test here
  config.train.precise_bn_batches = 2  # its batches are drawn from (seed, step): a resumed run draws the same
  return config


def _run_killed(root, workdir, *, first_step: int, kill_at: int, committed: int) -> str:
  code = KILLED_RUN.format(tests=str(pathlib.Path(__file__).parent), cache=jax.config.jax_compilation_cache_dir,
                           root=str(root), workdir=str(workdir), first_step=first_step, kill_at=kill_at,
                           committed=committed)
  proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
  return proc.stdout + proc.stderr


@pytest.mark.slow
def test_sigkill_mid_epoch_and_resume_equals_uninterrupted_run(tmp_path, capsys):
  data_root = demo_configs.tiny_collection(tmp_path / "data")
  config = resume_config(data_root)
  straight = train.train_and_evaluate(config, tmp_path / "straight")
  assert straight["step"] == 9

  # Killed during step 5: the latest checkpoint is step 4, mid-way through epoch 2 (phase 1), so the resumed run
  # must restore the phase's optimizer state, the data iterator's mid-epoch position and the running loss sum
  # of step 4 (the epoch-2 train_loss averages steps 4 to 6).
  resumed = tmp_path / "resumed"
  _run_killed(data_root, resumed, first_step=0, kill_at=4, committed=4)
  # Killed again during step 7 of the resumed run: this time the latest checkpoint is an evaluation boundary.
  out = _run_killed(data_root, resumed, first_step=4, kill_at=6, committed=6)
  assert "resumed from" in out and "step 4 (phase finetune)" in out
  result = train.train_and_evaluate(config, resumed)
  assert "step 6 (phase finetune)" in capsys.readouterr().out

  assert result["step"] == straight["step"] and result["best_step"] == straight["best_step"]
  a = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
  b = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in b] == [r["step"] for r in a] == [3, 6, 9]
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for key, value in ra.items():
      if key in metric_writer.TIMING_FIELDS:
        continue
      if isinstance(value, float):
        assert rb[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (ra["step"], key)
      else:
        assert rb[key] == value, (ra["step"], key)
  # The final weights and statistics agree too (to float noise: the same ops on the same data in the same order).
  for step in sorted({straight["step"], straight["best_step"]}):
    _, va, _ = checkpoints.load_for_inference(tmp_path / "straight" / "checkpoints" / str(step))
    _, vb, _ = checkpoints.load_for_inference(resumed / "checkpoints" / str(step))
    trees.assert_trees_close(vb, va, rtol=1e-6, atol=1e-7)
  _check_workdir(tmp_path / "straight", straight)


def _check_workdir(workdir, result):
  """metrics.jsonl fields, TensorBoard events, resolved config, and the best checkpoint restored by path."""
  saved = json.loads((workdir / "checkpoints" / "config.json").read_text())
  assert saved["model"]["backbone_kwargs"]["resnet50"]["filters"] == [4, 8, 8, 8]
  assert (workdir / "config.json").is_file()
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["phase"] for r in records] == [0, 1, 1] and [r["epoch"] for r in records] == [1, 2, 3]
  for key in ("step", "epoch", "phase", "train_loss", "val_scan_macro_f1", "val_scan_f1_covid",
              "val_scan_f1_noncovid", "val_scan_accuracy", "val_scan_auc", "val_slice_accuracy"):
    assert key in records[-1]
  best = max(records, key=lambda r: r["val_scan_macro_f1"])
  assert result["best_val_scan_macro_f1"] == pytest.approx(best["val_scan_macro_f1"])
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  model, variables, config = checkpoints.load_for_inference(workdir)
  assert config.model.fusion_filters == 8
  x = jnp.zeros((2, SIZE, SIZE, 3))
  out = model.apply(variables, x)
  for path in (workdir / "checkpoints", workdir / "checkpoints" / str(result["best_step"])):
    _, again, _ = checkpoints.load_for_inference(path)
    np.testing.assert_array_equal(model.apply(again, x), out)
  with pytest.raises(FileNotFoundError, match="not a checkpoint"):
    checkpoints.load_for_inference(workdir / "tensorboard")
