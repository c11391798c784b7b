"""Training and evaluation options of issue 11: label smoothing, class weights, the validation threshold,
flip test-time augmentation and early stopping; each against Keras, scikit-learn or a hand computation, and
the defaults against the plain computations they replace."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import keras
import ml_collections
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags
from sklearn.metrics import f1_score
from sklearn.utils.class_weight import compute_class_weight

import demo_configs  # (first: it puts configs/ on the path)
from demo_configs import common  # configs/common.py
from resdense_jax import checkpoints, data, evaluate, explain, losses, metrics, predict, train
from resdense_jax.data import augment
from test_predict_fixtures import (REPO, predictor, read_records, validation_scans,  # noqa: F401 (fixtures)
                                   validation_scores, workdir)

RNG = np.random.default_rng(11)


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> pathlib.Path:
  """demo_configs.tiny_collection: 6 training scans (3 per class) of 4-6 slices, 4 validation scans, 32 px."""
  return demo_configs.tiny_collection(tmp_path_factory.mktemp("options") / "ct")


# ------------------------------------------------------------------------------------ label smoothing


def _logits_and_labels(classes: int):
  logits = (RNG.normal(size=(16, classes)) * 3).astype(np.float32)
  labels = np.array([0, 1] * 8)
  return logits, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_keras(smoothing):
  logits, labels = _logits_and_labels(1)
  y = labels[:, None].astype(np.float32)
  ours = losses.get_loss("binary_cross_entropy", label_smoothing=smoothing)(jnp.asarray(logits), jnp.asarray(labels))
  keras_bce = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=smoothing)(y, logits)
  np.testing.assert_allclose(ours, np.asarray(keras_bce), rtol=1e-6)
  ours = losses.get_loss("sigmoid_focal_loss", label_smoothing=smoothing)(jnp.asarray(logits), jnp.asarray(labels))
  keras_focal = keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=0.25, gamma=2.0,
                                                     from_logits=True, label_smoothing=smoothing)(y, logits)
  np.testing.assert_allclose(ours, np.asarray(keras_focal), rtol=1e-5)
  # Softmax head: Keras's sparse loss has no smoothing; its categorical loss on the one-hot labels has.
  logits, labels = _logits_and_labels(2)
  ours = losses.get_loss("sparse_categorical_cross_entropy", label_smoothing=smoothing)(jnp.asarray(logits),
                                                                                        jnp.asarray(labels))
  keras_cce = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing)(
      np.eye(2, dtype=np.float32)[labels], logits)
  np.testing.assert_allclose(ours, np.asarray(keras_cce), rtol=1e-6)


# -------------------------------------------------------------------------------------- class weights


def _keras_fit_loss(logits, labels, loss, class_weight) -> float:
  """The loss Keras's training step reports for one batch under `class_weight` (model.fit's path: class
  weights to sample weights, then the loss's reduction), on a model whose output is its input (lr 0)."""
  width = logits.shape[1]
  model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width, use_bias=False,
                                                                      kernel_initializer="identity")])
  model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
  y = labels[:, None].astype(np.float32) if width == 1 else labels
  logs = model.train_on_batch(logits, y, class_weight=class_weight, return_dict=True)
  return float(logs["loss"])


@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_class_weights_and_smoothing_equal_keras_fit(head):
  logits, labels = _logits_and_labels(1 if head == "sigmoid" else 2)
  labels = np.r_[labels[:12], np.ones(4, np.int64)]  # unequal counts: weighted sum / batch size != weighted mean
  weights = (0.7, 2.5)
  if head == "sigmoid":
    name, keras_loss = "binary_cross_entropy", keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.2)
  else:
    name, keras_loss = "sparse_categorical_cross_entropy", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True)
  smoothing = 0.2 if head == "sigmoid" else 0.0
  want = _keras_fit_loss(logits, labels, keras_loss, {0: weights[0], 1: weights[1]})
  ours = losses.get_loss(name, label_smoothing=smoothing, class_weight=weights)(jnp.asarray(logits),
                                                                                jnp.asarray(labels))
  np.testing.assert_allclose(float(ours), want, rtol=1e-6)
  # Keras divides by the batch size, not by the sum of the weights.
  plain = losses.get_loss(name, label_smoothing=smoothing)
  per_slice = np.asarray(jax.vmap(lambda z, y: plain(z[None], y[None]))(jnp.asarray(logits), jnp.asarray(labels)))
  np.testing.assert_allclose(float(ours), np.mean(per_slice * np.asarray(weights)[labels]), rtol=1e-6)


def test_balanced_class_weights_equal_scikit_learn(collection, tmp_path):
  root = collection
  config = demo_configs.tiny_config()
  config.data.root = str(root)
  config.data.middle_fraction = 0.5
  config.train.class_weight = "balanced"
  plan = train.dry_run(config, tmp_path / "run")
  train_source = data.discover(root).train
  source = data.RawScans(train_source, progress=False)
  # By slice, over the middle half of each scan the pipeline draws from.
  slice_labels = np.concatenate([[ref.label] * max(1, round(n * 0.5)) for ref, n in
                                 zip(source.scans, source.num_slices)])
  np.testing.assert_array_equal(train.train_slice_labels(source, config), slice_labels)
  want = compute_class_weight("balanced", classes=np.array([0, 1]), y=slice_labels)
  assert np.bincount(slice_labels)[0] != np.bincount(slice_labels)[1]  # the weights are not both 1
  np.testing.assert_allclose(plan["class_weight"], want, rtol=1e-12)
  np.testing.assert_allclose(losses.class_weights("balanced", slice_labels), want, rtol=1e-12)


@pytest.mark.parametrize("spec,want", [("none", "none"), (None, "none"), ("None", "none"), ("balanced", "balanced"),
                                       ((1, 3), (1.0, 3.0)), ([0.5, 2], (0.5, 2.0)), ("(1, 3)", (1.0, 3.0)),
                                       ("1,3", (1.0, 3.0))])
def test_class_weight_forms(spec, want):
  assert losses.parse_class_weight(spec) == want


@pytest.mark.parametrize("spec", ["balance", (1, 2, 3), (-1, 1), (0, 0), ("a", 1)])
def test_bad_class_weight_is_refused(spec):
  with pytest.raises(ValueError, match="class_weight"):
    losses.parse_class_weight(spec)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags loading the file
def test_command_line_overrides_of_the_options(collection, tmp_path):
  """The new fields through the command line's own parser (main.py's --config flag: config_flags with the
  config locked; a fresh FlagValues, in-process), then the dry run, which writes config.json. class_weight
  takes a pair there although it defaults to a word."""
  argv = ["main", f"--config={REPO / 'configs' / 'demo.py'}", "--config.data.synthetic=False",
          f"--config.data.root={collection}", "--config.train.class_weight=(1, 3)",
          "--config.train.label_smoothing=0.1", "--config.train.patience=3", "--config.eval.tta=flip"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  workdir = tmp_path / "run"
  plan = train.dry_run(fv.config, workdir)
  assert plan["class_weight"] == (1.0, 3.0) and plan["tta"] == "flip"
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["train"]["class_weight"] == [1, 3]
  assert saved["train"]["label_smoothing"] == 0.1 and saved["train"]["patience"] == 3
  assert saved["eval"]["tta"] == "flip"
  # config.json (a list there), as predict reads it back, resolves to the same pair.
  assert losses.class_weights(ml_collections.ConfigDict(saved).train.class_weight, np.r_[0, 1]) == (1.0, 3.0)
  for override, want in [("balanced", "balanced"), ("none", "none"), ("'(2, 1)'", "(2, 1)")]:
    argv[4] = f"--config.train.class_weight={override}"
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    assert fv.config.train.class_weight == want
  assert losses.parse_class_weight(want) == (2.0, 1.0)


# ------------------------------------------------------------------------------------ threshold search


def _brute_force(labels, scores):
  """Macro-F1 of every threshold that changes the predictions (scikit-learn), and its maximum."""
  candidates = np.r_[np.unique(scores), -np.inf]
  f1 = {t: f1_score(labels, scores > t, labels=[0, 1], average="macro", zero_division=0) for t in candidates}
  return f1, max(f1.values())


def test_best_threshold_equals_scikit_learn_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(40):
    n = int(rng.integers(1, 25))
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.random(n), int(rng.integers(1, 4)))  # rounded: ties between scans
    threshold, macro = metrics.best_threshold(labels, scores)
    _, best = _brute_force(labels, scores)
    assert macro == pytest.approx(best, abs=1e-12), (labels, scores)
    at = f1_score(labels, scores > threshold, labels=[0, 1], average="macro", zero_division=0)
    assert at == pytest.approx(best, abs=1e-12), (labels, scores, threshold)


def test_best_threshold_midpoints_and_ties():
  # One best split: the midpoint of the gap between the scans it separates.
  assert metrics.best_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.8]) == (pytest.approx(0.45), 1.0)
  assert metrics.best_threshold([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == (pytest.approx(0.25), 1.0)
  # Two best splits (0.2 | 0.6 and 0.6 | 0.9 both give macro-F1 2/3 + ...): the one nearest 0.5 wins.
  labels, scores = [0, 1, 0, 1], [0.2, 0.6, 0.7, 0.9]
  f1, best = _brute_force(np.array(labels), np.array(scores))
  threshold, macro = metrics.best_threshold(labels, scores)
  optimal = [t for t, v in f1.items() if v == pytest.approx(best)]
  assert len(optimal) > 1 and macro == pytest.approx(best)
  assert threshold == pytest.approx(0.4)  # midpoint of 0.2 | 0.6, nearer 0.5 than 0.65 or 0.8
  assert metrics.best_threshold(labels, scores, prefer=0.8)[0] == pytest.approx(0.8)
  # Extremes: every scan COVID -> midpoint towards 0; a single class is all it can see.
  assert metrics.best_threshold([1, 1], [0.2, 0.4]) == (pytest.approx(0.1), 0.5)


# ------------------------------------------------------------------------ threshold in the best checkpoint


def test_predict_threshold_best_reads_the_best_checkpoint(workdir, validation_scans, tmp_path, capsys):
  step_dir, meta = checkpoints.load_meta(workdir)
  best_step = int(step_dir.name)
  record = read_records(workdir)[best_step]
  assert meta["val_scan_best_threshold"] == record["val_scan_best_threshold"]
  best = predict.Predictor.from_checkpoint(workdir, threshold="best")
  assert best.threshold == record["val_scan_best_threshold"] and best.tta == "none"
  # The recorded threshold is the search over the scan scores of that checkpoint (the evaluation's scores
  # equal the Predictor's to 1e-6).
  scores = np.array([best.predict_scan(ref.path)[0] for ref in validation_scans])
  labels = np.array([ref.label for ref in validation_scans])
  threshold, macro = metrics.best_threshold(labels, scores)
  assert threshold == pytest.approx(record["val_scan_best_threshold"], abs=1e-5)
  assert macro == pytest.approx(record["val_scan_best_threshold_macro_f1"])
  assert macro >= record["val_scan_macro_f1"]
  # The command line labels by it.
  out = tmp_path / "best.csv"
  split = workdir / "synthetic_ct" / "validation"
  rc = predict.main(["predict", f"--checkpoint={workdir}", f"--input={split}", f"--out={out}", "--noprogress",
                     "--threshold=best"])
  assert rc == 0
  assert f"threshold {best.threshold:g}: best on validation" in capsys.readouterr().err
  rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
  assert rows and all(int(r[4]) == int(float(r[3]) > best.threshold) for r in rows)
  with pytest.raises(ValueError, match="from_checkpoint"):
    predict.Predictor(best.model, best.variables, best.config, threshold="best")


def test_threshold_best_on_an_older_checkpoint_is_a_clear_error(workdir, tmp_path, capsys):
  step_dir, meta = checkpoints.load_meta(workdir)
  old = tmp_path / "old_step"
  shutil.copytree(step_dir, old)
  del meta["val_scan_best_threshold"], meta["val_scan_best_threshold_macro_f1"]
  (old / "meta" / "metadata").write_text(json.dumps(meta))
  assert checkpoints.load_meta(old)[1] == meta
  with pytest.raises(ValueError, match=f"{old}: this checkpoint records no validation threshold"):
    predict.Predictor.from_checkpoint(old, threshold="best")
  rc = predict.main(["predict", f"--checkpoint={old}", f"--input={workdir / 'synthetic_ct' / 'validation'}",
                     "--noprogress", "--threshold=best"])
  assert rc == 1 and "records no validation threshold" in capsys.readouterr().err
  assert predict.main(["predict", f"--checkpoint={old}", "--input=x", "--threshold=bestest"]) == 2


# ------------------------------------------------------------------------------ test-time augmentation


def test_tta_flip_is_the_mean_over_the_slice_and_its_mirror(workdir, predictor, validation_scans):
  """At the model's size (the resize is the identity), flip TTA equals the mean of two plain calls."""
  scan = data.read_scan(validation_scans[0].path)
  slices = np.stack([augment.resize(s, predictor.image_size) for s in scan.slices])
  assert predictor.tta == "none"
  plain = predictor.slice_probabilities(slices)
  mirrored = predictor.slice_probabilities(np.ascontiguousarray(slices[:, :, ::-1]))
  assert np.abs(plain - mirrored).max() > 1e-4  # the mirror changes something to average
  flip = predict.Predictor.from_checkpoint(workdir, tta="flip")
  np.testing.assert_allclose(flip.slice_probabilities(slices), (plain + mirrored) / 2, atol=1e-6)
  # explain: the same probabilities, and each CAM the mean of the slice's and the mirror's mirrored back.
  maps, probs = explain.activation_maps(flip, slices)
  np.testing.assert_allclose(probs, (plain + mirrored) / 2, atol=1e-5)
  plain_maps, _ = explain.activation_maps(predictor, slices)
  mirror_maps, _ = explain.activation_maps(predictor, np.ascontiguousarray(slices[:, :, ::-1]))
  np.testing.assert_allclose(maps, (plain_maps + mirror_maps[:, :, ::-1]) / 2, atol=1e-5)
  with pytest.raises(ValueError, match="test-time augmentation"):
    predict.Predictor.from_checkpoint(workdir, tta="rotate")


# ---------------------------------------------------------------------------------------- the training loop


def _loop_config(root: pathlib.Path) -> ml_collections.ConfigDict:
  """The tiny model, one head phase of 6 epochs (backbones frozen: a quick compile), every option on."""
  config = demo_configs.tiny_config()
  config.data.root = str(root)
  # One stage per backbone: the fewest ops to compile (init, train step, eval step).
  config.model.backbone_kwargs = {"resnet50": {"stage_sizes": (1,), "filters": (4,), "stem_filters": 8},
                                  "densenet121": {"blocks": (1,), "growth_rate": 4, "stem_filters": 8}}
  config.phases = [common.phase("head", 6, ("backbones",), optimizer="rmsprop", learning_rate=1e-3)]
  config.train.async_checkpointing = False
  config.train.patience = 2
  config.train.label_smoothing = 0.1
  config.train.class_weight = "balanced"
  config.eval.tta = "flip"
  return config


def test_patience_stops_resumes_and_does_not_train_again(collection, tmp_path, monkeypatch):
  """Scripted validation macro-F1 0.5, 0.7, 0.6, | 0.7, 0.65, 0.9 with patience 2: the run is cut after the
  third evaluation (one without improvement), resumes, and stops at the fourth (0.7 is not above 0.7, as
  Keras's EarlyStopping counts); a re-run trains nothing. The options reach the loss and the evaluation."""
  root = collection
  config = _loop_config(root)
  script = iter([0.5, 0.7, 0.6, 0.7, 0.65, 0.9])
  real_evaluate, real_compile = evaluate.evaluate, train.compile_train_step
  loss_fns = []

  def scripted(*args, **kwargs):
    return {**real_evaluate(*args, **kwargs), "scan_macro_f1": next(script)}

  def spy(phase, loss_fn, *args, **kwargs):
    loss_fns.append(loss_fn)
    return real_compile(phase, loss_fn, *args, **kwargs)

  monkeypatch.setattr(evaluate, "evaluate", scripted)
  monkeypatch.setattr(train, "compile_train_step", spy)
  run = tmp_path / "run"
  steps = train.dry_run(config, run)["steps_per_epoch"]
  first = train.train_and_evaluate(config, run, max_steps=3 * steps)
  assert first["step"] == 3 * steps and "early_stop" not in first
  assert checkpoints.load_meta(run / "checkpoints" / str(3 * steps))[1]["evaluations_without_improvement"] == 1
  result = train.train_and_evaluate(config, run)
  records = read_records(run)
  assert sorted(records) == [steps * e for e in (1, 2, 3, 4)]
  assert [records[steps * e]["evaluations_without_improvement"] for e in (1, 2, 3, 4)] == [0, 0, 1, 2]
  assert "has not improved on its best 0.7000 for 2 evaluations" in records[4 * steps]["early_stop"]
  # The best checkpoint is kept (of the two at 0.7 orbax ranks either; the later one, as it does today).
  assert result["early_stop"] == records[4 * steps]["early_stop"] and result["best_step"] in (2 * steps, 4 * steps)
  assert result["best_val_scan_macro_f1"] == 0.7
  meta = checkpoints.load_meta(run / "checkpoints" / str(4 * steps))[1]
  assert meta["early_stop"] == result["early_stop"] and meta["best_metric_value"] == 0.7
  assert meta["val_scan_best_threshold"] == records[4 * steps]["val_scan_best_threshold"]
  # A re-run on the same workdir trains nothing and writes nothing.
  before, compiled = (run / "metrics.jsonl").read_text(), len(loss_fns)
  again = train.train_and_evaluate(config, run)
  assert again["early_stop"] == result["early_stop"] and (run / "metrics.jsonl").read_text() == before
  assert len(loss_fns) == compiled  # not even a train step was compiled
  assert checkpoints.best_step(run / "checkpoints") == result["best_step"]
  assert next(script) == 0.65  # no further evaluation ran

  # The loss the loop trained with: label smoothing 0.1 and the balanced weights of the training slices.
  slice_labels = train.train_slice_labels(data.RawScans(data.discover(root).train, progress=False), config)
  weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=slice_labels)
  logits, labels = _logits_and_labels(1)
  y = labels[:, None].astype(np.float32)
  want = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.1)(y, logits,
                                                                               sample_weight=weights[labels])
  assert loss_fns
  for loss_fn in loss_fns:
    np.testing.assert_allclose(loss_fn(jnp.asarray(logits), jnp.asarray(labels)), np.asarray(want), rtol=1e-6)

  # The evaluation used flip TTA: the recorded threshold is the search over the flip-TTA scan scores.
  flip = predict.Predictor.from_checkpoint(run)  # tta from the run's config.eval
  assert flip.tta == "flip"
  refs = data.discover(root).validation
  scores = np.array([flip.predict_scan(ref.path)[0] for ref in refs])
  threshold, _ = metrics.best_threshold(np.array([ref.label for ref in refs]), scores)
  assert threshold == pytest.approx(records[result["best_step"]]["val_scan_best_threshold"], abs=1e-5)


# --------------------------------------------------------------------------------------------- defaults


def test_defaults_are_the_plain_computations(predictor):
  """Options off: the loss is the plain function itself, numerically the formula used before; the eval step
  is the plain forward pass, bitwise."""
  config = common.get_base_config()
  assert (config.train.label_smoothing, config.train.class_weight, config.train.patience,
          config.eval.tta) == (0.0, "none", 0, "none")
  loss_fn, weights = losses.from_config(config.train, np.zeros(3, np.int64))
  assert loss_fn is losses.binary_cross_entropy and weights is None
  logits, labels = _logits_and_labels(1)
  before = optax.sigmoid_binary_cross_entropy(jnp.asarray(logits[:, 0]), jnp.asarray(labels, jnp.float32)).mean()
  assert np.array_equal(loss_fn(jnp.asarray(logits), jnp.asarray(labels)), before)
  assert losses.get_loss("sparse_categorical_cross_entropy") is losses.sparse_categorical_cross_entropy

  model, variables = predictor.model, predictor.variables  # the shared run's (no init to compile)
  # The Predictor's batch: the default eval step is its program, read back from the compilation cache.
  images = jnp.asarray(RNG.integers(0, 256, (predictor.batch_size, 32, 32, 3)), jnp.uint8)
  plain = jax.jit(lambda v, x: losses.covid_probability(model.apply(v, x, train=False)))(variables, images)
  assert np.array_equal(train.compile_eval_step(model, train.create_mesh())(variables, images), plain)
