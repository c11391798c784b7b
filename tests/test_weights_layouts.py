"""weights.load_keras on every layout a user's own Keras file comes in (issue 11), and config.model.pretrained.

Files written by Keras 3 itself from small ResNet v1 / DenseNet models (Keras's own builders at one block per
stage): a full model saved with `model.save("x.h5")`, the backbone nested as one layer of a Sequential or
functional classifier (legacy .h5, Keras 3 .weights.h5 and .keras), weight names with a name-scope prefix, and
a file holding two backbones. Each load is compared with Keras's own weights (exact) and forward pass (1e-4).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py  # noqa: E402
import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import demo_configs  # noqa: E402
import keras_fixtures as kf  # noqa: E402
import trees  # noqa: E402
from resdense_jax import checkpoints, models, train, weights  # noqa: E402
from resdense_jax.weights import pretrained  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
ARCHS = ("resnet50", "densenet121")
LAYOUTS = ("full_h5", "sequential_h5", "functional_h5", "extended_h5", "keras3_weights", "keras_zip")


@pytest.fixture(scope="module")
def keras_backbones():
  return {arch: kf.build_small_keras(arch, seed=i + 1) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def flax_backbones():
  return {arch: models.BACKBONES[arch](**kf.SMALL_BACKBONE_KWARGS[arch], include_top=False) for arch in ARCHS}


@pytest.fixture(scope="module")
def images():
  return kf.random_images((2, 32, 32, 3), seed=7)


@pytest.fixture(scope="module")
def keras_outputs(keras_backbones, images):
  return {arch: np.asarray(jax.jit(lambda x, m=m: m(x, training=False))(images))
          for arch, m in keras_backbones.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, keras_backbones):
  """{(arch, layout): path} of the files Keras writes for each backbone."""
  folder = tmp_path_factory.mktemp("layouts")
  out = {}
  for arch, backbone in keras_backbones.items():
    out[arch, "full_h5"] = kf.save_full_h5(backbone, folder / f"{arch}_full.h5")
    out[arch, "sequential_h5"] = kf.save_full_h5(kf.classifier(backbone), folder / f"{arch}_sequential.h5")
    functional = kf.classifier(backbone, kind="functional")
    out[arch, "functional_h5"] = kf.save_full_h5(functional, folder / f"{arch}_functional.h5")
    out[arch, "extended_h5"] = kf.save_full_h5(kf.classifier(backbone, kind="extended"),
                                               folder / f"{arch}_extended.h5")
    out[arch, "keras3_weights"] = kf.save_keras3(functional, folder / f"{arch}_classifier.weights.h5")
    functional.save(str(folder / f"{arch}_classifier.keras"))
    out[arch, "keras_zip"] = folder / f"{arch}_classifier.keras"
  return out


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _check_loaded(variables, arch, keras_backbones, flax_backbones, keras_outputs, images):
  model = flax_backbones[arch]
  trees.assert_trees_equal(variables, kf.keras_variables(keras_backbones[arch], model))
  ours = kf.jitted_apply(model)(variables, images)
  assert kf.relative_max_diff(ours, keras_outputs[arch]) <= TOLERANCE


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layout_loads_and_equals_keras(arch, layout, files, keras_backbones, flax_backbones, keras_outputs,
                                             images):
  variables = weights.load_keras(flax_backbones[arch], files[arch, layout])
  _check_loaded(variables, arch, keras_backbones, flax_backbones, keras_outputs, images)


def test_the_reader_sees_the_nested_model(files):
  """The file layouts the test above relies on are what the reader describes (nested or not)."""
  full = weights.read_h5(files["resnet50", "full_h5"])
  assert full.layout == "legacy" and not full.submodels and "conv1_conv" in full.names
  nested = weights.read_h5(files["resnet50", "sequential_h5"])
  # The head's Dense, beside the nested backbone (Keras numbers its automatic name by what the session built).
  assert len(nested.layers) == 1 and nested.layers[0].name.startswith("dense")
  assert [s.submodel for s in nested.submodels] == ["resnet50"]
  assert "conv5_block1_3_bn" in nested.submodels[0].names
  zipped = weights.read_h5(files["densenet121", "keras_zip"])
  assert zipped.layout == "keras3" and [s.submodel for s in zipped.submodels] == ["functional"]


def test_prefixed_weight_names_load(tmp_path, flax_backbones, images):
  """A backbone built inside `keras.name_scope("resnet50")`: its weights are `resnet50/conv1_conv/kernel`,
  nested in a classifier's .h5 and in the backbone's own legacy weights file."""
  backbone = kf.build_small_keras("resnet50", seed=3, scope="resnet50")
  nested = kf.save_full_h5(kf.classifier(backbone), tmp_path / "scoped_classifier.h5")
  flat = kf.save_legacy(backbone, tmp_path / "scoped_weights.h5")
  with h5py.File(nested) as f:
    assert _text(f["model_weights/resnet50"].attrs["weight_names"][0]) == "resnet50/conv1_conv/kernel"
  with h5py.File(flat) as f:
    assert _text(f["conv1_conv"].attrs["weight_names"][0]) == "resnet50/conv1_conv/kernel"
  expected = np.asarray(jax.jit(lambda x: backbone(x, training=False))(images))
  for path in (nested, flat):
    variables = weights.load_keras(flax_backbones["resnet50"], path)
    trees.assert_trees_equal(variables, kf.keras_variables(backbone, flax_backbones["resnet50"]))
    assert kf.relative_max_diff(kf.jitted_apply(flax_backbones["resnet50"])(variables, images), expected) <= TOLERANCE


def test_one_file_with_both_backbones(tmp_path, keras_backbones, flax_backbones, keras_outputs, images):
  """A functional model calling both backbones: each Flax backbone takes the nested model that fits it."""
  path = kf.save_full_h5(kf.classifier(list(keras_backbones.values())), tmp_path / "both.h5")
  for arch in ARCHS:
    variables = weights.load_keras(flax_backbones[arch], path)
    _check_loaded(variables, arch, keras_backbones, flax_backbones, keras_outputs, images)


def test_two_candidates_are_ambiguous_until_one_is_named(tmp_path, keras_backbones, flax_backbones):
  other = kf.build_small_keras("resnet50", seed=11, name="resnet50_b")
  path = kf.save_full_h5(kf.classifier([keras_backbones["resnet50"], other]), tmp_path / "two_resnets.h5")
  model = flax_backbones["resnet50"]
  with pytest.raises(weights.WeightsError, match=f"{path}: ambiguous: 2 parts .*sub-model 'resnet50'.*"
                                                 f"sub-model 'resnet50_b'.*{path}#resnet50_b"):
    weights.load_keras(model, path)
  trees.assert_trees_equal(weights.load_keras(model, f"{path}#resnet50_b"), kf.keras_variables(other, model))
  trees.assert_trees_equal(weights.load_keras(model, path, submodel="resnet50"),
                           kf.keras_variables(keras_backbones["resnet50"], model))
  with pytest.raises(weights.WeightsError, match=f"{path}: no sub-model 'resnet'; the file holds .*'resnet50'"):
    weights.load_keras(model, f"{path}#resnet")


def test_errors_name_the_file_and_the_layer(tmp_path, files, flax_backbones):
  nested = files["resnet50", "sequential_h5"]
  # Wrong architecture: the only nested model is a ResNet, the model a DenseNet.
  with pytest.raises(weights.WeightsError, match=f"{nested}: wrong architecture: no part of the file holds a "
                                                 r"DenseNet .*sub-model 'resnet50': a ResNet"):
    weights.load_keras(flax_backbones["densenet121"], nested)
  # A nested model missing one layer's weights.
  broken = tmp_path / "missing_layer.h5"
  broken.write_bytes(nested.read_bytes())
  with h5py.File(broken, "r+") as f:
    group = f["model_weights/resnet50"]
    kept = [_text(w) for w in group.attrs["weight_names"] if not _text(w).startswith("conv2_block1_2_conv/")]
    group.attrs["weight_names"] = np.array([w.encode() for w in kept], dtype="S")
  with pytest.raises(weights.WeightsError, match=f"{broken} \\(sub-model 'resnet50'\\): missing layer\\(s\\) the "
                                                 "model needs: conv2_block1_2_conv$"):
    weights.load_keras(flax_backbones["resnet50"], broken)
  # A nested layer whose kernel has another shape.
  reshaped = tmp_path / "shape.h5"
  reshaped.write_bytes(nested.read_bytes())
  with h5py.File(reshaped, "r+") as f:
    kernel = f["model_weights/resnet50/conv3_block1_1_conv/kernel"]
    value = kernel[()]
    del f["model_weights/resnet50/conv3_block1_1_conv/kernel"]
    f["model_weights/resnet50/conv3_block1_1_conv/kernel"] = value[..., :-1]
  with pytest.raises(weights.WeightsError, match=f"{reshaped} \\(sub-model 'resnet50'\\): shape mismatch in layer "
                                                 "'conv3_block1_1_conv', weight 'kernel'"):
    weights.load_keras(flax_backbones["resnet50"], reshaped)
  with pytest.raises(weights.WeightsError, match=f"{tmp_path / 'absent.h5'}: no such file"):
    weights.load_keras(flax_backbones["resnet50"], tmp_path / "absent.h5")


def test_a_head_is_skipped_only_after_the_backbone_in_a_full_model(tmp_path, files, keras_backbones,
                                                                  flax_backbones):
  """Model(base.input, head(base.output)) saved whole loads (test_every_layout_loads_and_equals_keras); its
  weights alone (no model config) or a full model listing a head layer before the backbone's end do not."""
  extended = kf.classifier(keras_backbones["resnet50"], kind="extended")
  weights_only = kf.save_legacy(extended, tmp_path / "extended_weights.h5")
  with pytest.raises(weights.WeightsError, match=f"{weights_only}: extra layer\\(s\\) with weights the model "
                                                 r"does not have: dense(_\d+)?, dense_\d+$"):
    weights.load_keras(flax_backbones["resnet50"], weights_only)
  moved = tmp_path / "head_first.h5"
  moved.write_bytes(files["resnet50", "extended_h5"].read_bytes())
  with h5py.File(moved, "r+") as f:
    names = [_text(n) for n in f["model_weights"].attrs["layer_names"]]
    head = [n for n in names if n.startswith("dense")]
    names.insert(1, names.pop(names.index(head[0])))
    f["model_weights"].attrs["layer_names"] = np.array([n.encode() for n in names], dtype="S")
  with pytest.raises(weights.WeightsError, match=f"{moved}: extra layer\\(s\\) with weights the model does not "
                                                 r"have: dense(_\d+)?, dense_\d+$"):
    weights.load_keras(flax_backbones["resnet50"], moved)


# ---- config.model.pretrained


def test_pretrained_values_per_backbone():
  backbones = ("resnet50", "densenet121")
  both = {"resnet50": "/w/a.h5", "densenet121": "imagenet"}
  assert pretrained.per_backbone("imagenet", backbones) == dict.fromkeys(backbones, "imagenet")
  assert pretrained.per_backbone("none", backbones) == pretrained.per_backbone("", backbones) == dict.fromkeys(
      backbones, "none")
  assert pretrained.per_backbone("/w/model.h5", backbones) == dict.fromkeys(backbones, "/w/model.h5")
  assert pretrained.per_backbone(both, backbones) == both
  assert pretrained.per_backbone(json.dumps(both), backbones) == both
  assert pretrained.per_backbone("resnet50=/w/a.h5, densenet121=imagenet", backbones) == both
  with pytest.raises(ValueError, match=r"config.model.pretrained: key 'resnet101' is not one of "
                                       r"config.model.backbones \('resnet50', 'densenet121'\)"):
    pretrained.per_backbone({"resnet101": "imagenet", "densenet121": "none"}, backbones)
  with pytest.raises(ValueError, match="no value for backbone 'densenet121'"):
    pretrained.per_backbone({"resnet50": "imagenet"}, backbones)
  with pytest.raises(ValueError, match="expected backbone=value pairs"):
    pretrained.per_backbone("resnet50=/w/a.h5,densenet121", backbones)


def test_load_pretrained_names_the_backbone_and_the_file(tmp_path, files):
  config = demo_configs.tiny_config()
  config.model.backbone_kwargs = kf.SMALL_BACKBONE_KWARGS
  model = train.create_model(config.model)
  empty = {"params": {}, "batch_stats": {}}
  config.model.pretrained = {"resnet50": str(tmp_path / "absent.h5"), "densenet121": "none"}
  with pytest.raises(weights.WeightsError, match=f"{tmp_path / 'absent.h5'}: no such file \\(config.model."
                                                 "pretrained for backbone 'resnet50'"):
    train.load_pretrained(model, empty, config.model)
  # The DenseNet slot given the ResNet's file: the file, the nested model and the backbone are named.
  config.model.pretrained = {"resnet50": "none", "densenet121": str(files["resnet50", "sequential_h5"])}
  with pytest.raises(weights.WeightsError, match=f"{files['resnet50', 'sequential_h5']}: wrong architecture.*"
                                                 "sub-model 'resnet50'.*backbone 'densenet121'"):
    train.load_pretrained(model, empty, config.model)
  config.model.pretrained = {"resnet101": "none", "densenet121": "none"}
  with pytest.raises(ValueError, match="key 'resnet101' is not one of config.model.backbones"):
    train.load_pretrained(model, empty, config.model)


def test_a_resumed_run_keeps_the_record_it_started_from(tmp_path, files):
  config = demo_configs.tiny_config()
  config.model.backbone_kwargs = kf.SMALL_BACKBONE_KWARGS
  source = tmp_path / "weights.h5"
  source.write_bytes(files["resnet50", "full_h5"].read_bytes())
  config.model.pretrained = {"resnet50": str(source), "densenet121": "none"}
  model = train.create_model(config.model)
  first = pretrained.run_record(model, config.model, tmp_path, download_ok=False)
  assert first["resnet50"] == {"source": str(source), "file": str(source), "md5": weights.md5sum(source),
                               "bytes": source.stat().st_size, "md5_verified": False}
  assert first["densenet121"] == {"source": "none"}
  (tmp_path / "config.json").write_text(json.dumps({pretrained.RECORD_KEY: first}))
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)
  source.write_bytes(b"changed after the run started")
  assert pretrained.run_record(model, config.model, tmp_path, download_ok=False) == first
  # A fresh run (no checkpoint) describes the file as it is now.
  (tmp_path / "checkpoints" / "3").rmdir()
  assert pretrained.run_record(model, config.model, tmp_path, download_ok=False)["resnet50"]["md5"] == (
      weights.md5sum(source))


def test_command_line_takes_a_dict_and_records_the_files(tmp_path, files):
  """`--config.model.pretrained={...}` through the real command line (config_flags parses the literal); the dry
  run's config.json says what each backbone would start from."""
  root = demo_configs.tiny_collection(tmp_path / "ct")
  path = files["resnet50", "full_h5"]
  workdir = tmp_path / "run"
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
         "KERAS_HOME": str(tmp_path / "keras_home")}
  proc = subprocess.run(
      [sys.executable, "-m", "resdense_jax.main", "--config=configs/finetune.py", f"--workdir={workdir}",
       f"--config.data.root={root}", """--config.model.backbones=("resnet50","densenet121")""",
       "--config.train.batch_size=16", "--config.data.image_size=32",
       f"""--config.model.pretrained={{"resnet50": "{path}", "densenet121": "imagenet"}}""", "--dry_run"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["pretrained"] == {"resnet50": str(path), "densenet121": "imagenet"}
  record = saved[pretrained.RECORD_KEY]
  assert record["resnet50"] == {"source": str(path), "file": str(path), "md5": weights.md5sum(path),
                                "bytes": path.stat().st_size, "md5_verified": False}
  entry = weights.registry_entry("densenet121", False)
  # Not downloaded by a dry run: the registry's name and MD5 (the loader accepts no other file).
  assert record["densenet121"] == {"source": "imagenet", "registry_file": entry.file_name, "file": None,
                                   "md5": entry.md5, "bytes": None, "md5_verified": False}
  assert json.loads((workdir / "checkpoints" / "config.json").read_text()) == saved


def _raw_rgb(images: np.ndarray) -> np.ndarray:
  """Random images as raw RGB in [0, 255], what the engine feeds the model."""
  return (images - images.min()) / (images.max() - images.min()) * 255.0


def _assert_backbone_features_equal_keras(model, variables, keras_backbones, raw):
  """Each backbone's features inside the fused model (its own Keras preprocessing included) against the Keras
  backbone on Keras's preprocess_input."""
  ours = jax.jit(lambda v, x: model.apply(v, x, train=False, method="backbone_features"))(variables, raw)
  keras_inputs = {"resnet50": keras.applications.resnet.preprocess_input(raw.copy()),
                  "densenet121": keras.applications.densenet.preprocess_input(raw.copy())}
  for arch, backbone in keras_backbones.items():
    expected = np.asarray(jax.jit(lambda x, m=backbone: m(x, training=False))(keras_inputs[arch]))
    assert kf.relative_max_diff(ours[arch], expected) <= TOLERANCE, arch


def test_load_pretrained_per_backbone_files_equal_keras(files, keras_backbones, images):
  """The fast path of the test below: train.load_pretrained with a full-model .h5 for the ResNet and a
  nested-sub-model .h5 for the DenseNet; the fused model's backbone features equal Keras's."""
  config = demo_configs.tiny_config()
  config.model.backbone_kwargs = kf.SMALL_BACKBONE_KWARGS
  config.model.pretrained = {"resnet50": str(files["resnet50", "full_h5"]),
                             "densenet121": str(files["densenet121", "sequential_h5"])}
  model = train.create_model(config.model)
  initial = jax.eval_shape(lambda: train.initialized(jax.random.key(0, impl="rbg"), model, 32))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), initial)
  loaded = train.load_pretrained(model, zeros, config.model)
  trees.assert_same_structure(loaded, zeros)
  _assert_backbone_features_equal_keras(model, loaded, keras_backbones, _raw_rgb(images))


@pytest.mark.long  # ~25 s CPU; its fast path: test_load_pretrained_per_backbone_files_equal_keras
def test_fine_tuning_starts_from_user_files_equal_to_keras(tmp_path, monkeypatch, files, keras_backbones, images):
  """The issue's Measured line: a small model fine-tuned by train_and_evaluate from a Keras-written full-model
  .h5 (ResNet) and a nested-sub-model .h5 (DenseNet inside a Sequential classifier); its first forward pass
  (each backbone's features inside the fused model, preprocessing included) equals Keras's to 1e-4."""
  config = demo_configs.tiny_config()
  config.model.backbone_kwargs = kf.SMALL_BACKBONE_KWARGS
  sources = {"resnet50": files["resnet50", "full_h5"], "densenet121": files["densenet121", "sequential_h5"]}
  config.model.pretrained = {arch: str(path) for arch, path in sources.items()}
  config.data.root = str(demo_configs.tiny_collection(tmp_path / "ct"))
  config.phases = [demo_configs.common.phase("head", 1, ("backbones",), learning_rate=1e-3)]
  started = {}

  def spy(model, variables, model_config):
    loaded = load_pretrained(model, variables, model_config)
    started.update(jax.tree.map(np.array, loaded))  # a host copy: the train step donates the state's buffers
    return loaded

  load_pretrained = train.load_pretrained
  monkeypatch.setattr(train, "load_pretrained", spy)
  result = train.train_and_evaluate(config, tmp_path / "run")

  _assert_backbone_features_equal_keras(train.create_model(config.model), started, keras_backbones,
                                        _raw_rgb(images))
  # The run trained from those weights: frozen backbones come out of training as they went in.
  _, trained, _ = checkpoints.load_for_inference(tmp_path / "run" / "checkpoints" / str(result["step"]))
  for arch in ARCHS:
    trees.assert_trees_equal(trained["params"][arch], started["params"][arch])
    trees.assert_trees_equal(trained["batch_stats"][arch], started["batch_stats"][arch])
  record = json.loads((tmp_path / "run" / "config.json").read_text())[pretrained.RECORD_KEY]
  for arch, path in sources.items():
    assert record[arch]["md5"] == weights.md5sum(path) and record[arch]["bytes"] == path.stat().st_size
