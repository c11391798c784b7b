"""Training and evaluating by scan (issue 13): B x K batches, one step by hand, whole-scan evaluation, resume,
and the Predictor with a scan head."""

import csv
import dataclasses
import json

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import demo_configs
import trees
from resdense_jax import checkpoints, data, losses, metric_writer, predict, scan_train, sharding, train
from resdense_jax.data import scan_batches


def test_slice_windows_are_in_order_fit_and_vary():
  rng = np.random.default_rng(0)
  strides, starts = set(), set()
  for _ in range(200):
    window = scan_batches.slice_window(20, 4, rng)
    assert len(window) == 4 and window[0] >= 0 and window[-1] < 20
    stride = np.diff(window)
    assert np.all(stride == stride[0]) and 1 <= stride[0] <= 6
    strides.add(int(stride[0]))
    starts.add(int(window[0]))
  assert strides == set(range(1, 7)) and len(starts) > 10
  assert all(np.all(np.diff(scan_batches.slice_window(20, 4, rng, max_stride=2)) <= 2) for _ in range(50))
  short = scan_batches.slice_window(3, 5, rng)  # fewer slices than K: all of them, in order, some repeated
  assert len(short) == 5 and set(short) == {0, 1, 2} and np.all(np.diff(short) >= 0)
  np.testing.assert_array_equal(scan_batches.slice_window(4, 4, rng), [0, 1, 2, 3])


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
  return demo_configs.tiny_collection(tmp_path_factory.mktemp("scan_data") / "data")


def _source(root):
  return data.RawScans(data.discover(root).train, progress=False)


def _pipeline(source, **kwargs):
  return scan_batches.scan_train_pipeline(source, image_size=32, batch_size=4, slices_per_scan=3, seed=5,
                                          **kwargs)


def test_scan_batches_shapes_labels_resume_and_process_blocks(collection):
  source = _source(collection)
  it = iter(_pipeline(source))
  first = [next(it) for _ in range(2)]
  assert first[0]["image"].shape == (4, 3, 32, 32, 3) and first[0]["image"].dtype == np.uint8
  assert first[0]["label"].dtype == np.int32 and set(np.concatenate([b["label"] for b in first])) <= {0, 1}
  state = it.get_state()
  after = [next(it) for _ in range(3)]  # crosses the epoch boundary (6 scans, 1 batch of 4 a epoch)
  again = iter(_pipeline(source))
  again.set_state(state)
  for a, b in zip(after, [next(again) for _ in range(3)]):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(after[0]["image"], after[1]["image"])
  # Two processes: block p of every global batch, the same scans, slices and augmentation.
  blocks = [next(iter(_pipeline(source, shard_options=grain.sharding.ShardOptions(p, 2)))) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in blocks]), first[0]["image"])
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in blocks]), first[0]["label"])
  # Labels are the scans' own: every image of a batch row comes from one scan of that label.
  assert scan_batches.steps_per_epoch(source, 4) == 1


def _scan_config(root, head="attention"):
  config = demo_configs.tiny_config()
  config.data.root = str(root)
  config.model.scan_head = head
  config.model.scan_transformer.width = 16
  config.model.scan_transformer.mlp_dim = 32
  config.train.batch_size = 2
  config.data.slices_per_scan = 3
  config.eval.batch_size = 2
  config.eval.scan_length_bucket = 3
  config.compilation_cache_dir = ""
  return config


def test_one_step_equals_a_hand_computed_reference(collection):
  """SGD on the attention head, backbones frozen: loss and every updated parameter equal a reference written
  out by hand (backbone maps -> fusion convs -> add -> mean -> gated attention -> Dense -> BCE, jax.grad)."""
  config = _scan_config(collection)
  config.model.dropout = 0.0
  config.phases = [demo_configs.common.phase("head", 1, ("backbones",), optimizer="sgd", learning_rate=0.5)]
  model = scan_train.create_model(config)
  variables = scan_train.initialized(jax.random.key(0, impl="rbg"), model, 32)
  plan = [("head", config.phases[0], 0, 1)]
  phase = train.create_phase(0, plan, config, variables["params"])
  assert isinstance(phase.model, type(model))
  rng = np.random.default_rng(3)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (2, 3, 32, 32, 3)), jnp.uint8),
           "label": jnp.asarray([1, 0], jnp.int32)}
  host = jax.tree.map(np.asarray, variables)
  state = train.create_train_state(jax.random.PRNGKey(1), variables, phase)
  new_state, metrics = train.train_step(state, batch, model=phase.model, tx=phase.tx, labels=phase.labels,
                                        loss_fn=losses.binary_cross_entropy)

  maps = phase.model.slices.apply(host, batch["image"].reshape(6, 32, 32, 3), method="backbone_features")
  p = host["params"]
  trainable = {"r": p["resnet50_fusion_conv"], "d": p["densenet121_fusion_conv"], "head": p["scan_head"],
               "out": p["predictions"]}

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w["kernel"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + w["bias"]

  def loss_of(t):
    fused = conv(maps["resnet50"], t["r"]) + conv(maps["densenet121"], t["d"])
    h = fused.mean(axis=(1, 2)).reshape(2, 3, -1)
    a = jnp.tanh(h @ t["head"]["V"]["kernel"]) * jax.nn.sigmoid(h @ t["head"]["U"]["kernel"])
    scores = (a @ t["head"]["w"]["kernel"])[..., 0]
    weights = jax.nn.softmax(scores, axis=-1)
    z = jnp.einsum("bk,bkc->bc", weights, h)
    logit = (z @ t["out"]["kernel"] + t["out"]["bias"])[:, 0]
    y = np.array([1.0, 0.0])
    return jnp.mean(jnp.maximum(logit, 0) - logit * y + jnp.log1p(jnp.exp(-jnp.abs(logit))))

  loss, grads = jax.value_and_grad(loss_of)(trainable)
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
  expected = jax.tree.map(lambda w, g: w - 0.5 * g, trainable, grads)
  got = {"r": new_state.params["resnet50_fusion_conv"], "d": new_state.params["densenet121_fusion_conv"],
         "head": new_state.params["scan_head"], "out": new_state.params["predictions"]}
  trees.assert_trees_close(got, expected, rtol=1e-4, atol=1e-6)
  assert float(jnp.max(jnp.abs(got["head"]["w"]["kernel"] - trainable["head"]["w"]["kernel"]))) > 1e-4
  # Frozen: the backbones' parameters and BatchNorm statistics bitwise.
  for name in ("resnet50", "densenet121"):
    trees.assert_trees_equal(new_state.params[name], host["params"][name])
    trees.assert_trees_equal(new_state.batch_stats[name], host["batch_stats"][name])


@pytest.fixture(scope="module")
def scan_run(collection, tmp_path_factory):
  """A tiny attention-head run straight through (2 phases, 9 steps: 6 training scans, 2 a step), and the same
  run stopped after 4 steps (mid-epoch, in the second phase, with a checkpoint every step) and resumed."""
  work = tmp_path_factory.mktemp("scan_run")
  config = _scan_config(collection)
  config.phases = [demo_configs.common.phase("head", 1, ("backbones",), optimizer="adam", learning_rate=1e-2),
                   demo_configs.common.phase("finetune", 2, (), optimizer="adam", learning_rate=1e-3)]
  config.train.checkpoint_every_steps = 1
  straight = train.train_and_evaluate(config, work / "straight")
  for budget in (4, None):
    resumed = train.train_and_evaluate(config, work / "resumed", max_steps=budget)
  return config, work, straight, resumed


def test_training_by_scan_resumes_exactly(scan_run):
  config, work, straight, resumed = scan_run
  assert straight["step"] == 9 and resumed["step"] == 9
  a = [json.loads(l) for l in (work / "straight" / "metrics.jsonl").read_text().splitlines()]
  b = [json.loads(l) for l in (work / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6, 9]
  for ra, rb in zip(a, b):
    for key, value in ra.items():
      if key not in metric_writer.TIMING_FIELDS:
        assert rb[key] == (pytest.approx(value, rel=1e-6, abs=1e-7) if isinstance(value, float) else value), key
  assert {"val_scan_macro_f1", "val_scan_auc", "val_scan_best_threshold", "val_slice_accuracy"} <= set(a[-1])
  assert a[-1]["val_num_scans"] == 4
  _, va, _ = checkpoints.load_for_inference(work / "straight" / "checkpoints" / "9")
  _, vb, _ = checkpoints.load_for_inference(work / "resumed" / "checkpoints" / "9")
  assert "scan_head" in va["params"]
  trees.assert_trees_close(vb, va, rtol=1e-6, atol=1e-7)


def test_whole_scan_evaluation_and_predictor_are_exact(scan_run, collection):
  """The engine's evaluation (slices in batches of 2, head padded to multiples of 3) and the Predictor give
  each scan the score of the ScanModel applied to all its slices at once, unpadded."""
  config, work, _, _ = scan_run
  model, variables, saved = checkpoints.load_for_inference(work / "straight" / "checkpoints" / "9")
  scan_model = scan_train.create_model(saved)
  predictor = predict.Predictor.from_checkpoint(work / "straight" / "checkpoints" / "9")
  refs = data.discover(collection).validation
  mesh = train.create_mesh()
  evaluator = scan_train.Evaluator(scan_model, mesh)
  source = data.RawScans(refs, progress=False)
  out = scan_train.predict_scans(evaluator.features_fn, evaluator.pool_fn, variables, source, saved,
                                 train.data_sharded(mesh))
  for i, ref in enumerate(refs):
    images = predictor.model_inputs(data.read_scan_slices(ref).slices)
    assert len(images) > 3  # more slices than one eval batch and one head bucket
    logits = scan_model.apply(variables, jnp.asarray(images)[None])
    direct = float(jax.nn.sigmoid(logits[0, 0]))
    prediction = predictor.predict(ref)
    assert out["p_covid"][i] == pytest.approx(direct, rel=1e-5, abs=1e-6)
    assert prediction.p_covid == pytest.approx(direct, rel=1e-5, abs=1e-6)
    assert prediction.slice_weights.shape == (len(images),)
    assert prediction.slice_weights.sum() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(prediction.slice_weights, out["weights"][i], rtol=1e-5, atol=1e-7)
    # Attention head: a slice's probability is the ResDenseNet's own probability of that slice.
    np.testing.assert_allclose(prediction.slice_probs, predictor.slice_probabilities(
        data.read_scan_slices(ref).model_inputs(32)), rtol=1e-5, atol=1e-6)
  assert predictor.scan_score  # the mean rule is not what scores a scan-head checkpoint
  assert isinstance(model, type(scan_model.slices))


def test_explain_shows_attention_weights_and_maps_the_most_attended_slices(scan_run, collection, tmp_path):
  from resdense_jax import explain  # pylint: disable=g-import-not-at-top  (matplotlib: only this test)
  _, work, _, _ = scan_run
  predictor = predict.Predictor.from_checkpoint(work / "straight" / "checkpoints" / "9")
  ref = data.discover(collection).validation[0]
  explanation = explain.explain_scan(predictor, ref)
  prediction = predictor.predict(ref)
  np.testing.assert_allclose(explanation.slice_weights, prediction.slice_weights, rtol=1e-6)
  assert explanation.p_covid == pytest.approx(prediction.p_covid, rel=1e-6)
  top = explanation.top_slices(2)
  np.testing.assert_array_equal(top, np.argsort(-prediction.slice_weights, kind="stable")[:2])
  paths = explain.write_explanation(explanation, tmp_path, top_k=2)
  with np.load(paths["maps"][0]) as saved:
    np.testing.assert_allclose(saved["slice_weights"], prediction.slice_weights, rtol=1e-6)
  assert [p.name for p in paths["top_slices"]] == [f"top_{r}_slice_{i}.png" for r, i in enumerate(top, 1)]


def test_scan_head_refuses_options_it_does_not_support(collection, tmp_path):
  config = _scan_config(collection)
  config.train.cache_frozen_features = 1
  with pytest.raises(ValueError, match="cache_frozen_features"):
    train.setup_run(config, tmp_path)
  config = _scan_config(collection)
  config.train.batch_size = 8
  with pytest.raises(ValueError, match="more than the training scans"):
    train.setup_run(config, tmp_path)
  assert ml_collections  # config fields are ConfigDicts


def test_remat_blocks_recomputes_the_slice_blocks_of_a_scan_step(collection):
  """B*K slices fit by rematerialisation as for slices: the lowered scan-head step (all trainable) recomputes the
  backbones' block convolutions in its backward pass (abstract shapes only: nothing compiles or runs)."""
  config = _scan_config(collection)
  config.phases = [demo_configs.common.phase("all", 1, (), optimizer="sgd", learning_rate=0.1)]
  model = scan_train.create_model(config)
  variables = jax.eval_shape(lambda: scan_train.initialized(jax.random.key(0, impl="rbg"), model, 32))
  phase = train.create_phase(0, [("all", config.phases[0], 0, 1)], config, variables["params"])
  state = jax.eval_shape(lambda v: train.create_train_state(jax.random.PRNGKey(1), v, phase), variables)
  batch = {"image": jax.ShapeDtypeStruct((2, 3, 32, 32, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((2,), jnp.int32)}

  def convs(remat):
    step = train.compile_train_step(phase, losses.binary_cross_entropy, sharding.create_mesh(), remat=remat)
    return step.lower(state, batch).as_text().count("stablehlo.convolution")

  assert convs("blocks") >= convs("none") + 8


def test_per_slice_csv_carries_the_attention_weights(tmp_path):
  """predict --per_slice: a scan head's predictions add an attention_weight column; the mean head's file keeps
  its four columns."""
  weighted = predict.ScanPrediction(scan_id="a", path=tmp_path / "a", p_covid=0.7, label=1,
                                    slice_probs=np.array([0.2, 0.9], np.float32), slice_indices=np.array([3, 4]),
                                    slice_weights=np.array([0.25, 0.75], np.float32))
  rows = list(csv.DictReader(open(predict.write_per_slice([weighted], tmp_path / "w.csv"))))
  assert [(r["slice_index"], float(r["attention_weight"])) for r in rows] == [("3", 0.25), ("4", 0.75)]
  plain = dataclasses.replace(weighted, slice_weights=None)
  header = open(predict.write_per_slice([plain], tmp_path / "p.csv")).readline().strip()
  assert header == ",".join(predict.PER_SLICE_COLUMNS)
