"""Restoring a checkpoint for inference logs no foreign warning: orbax's "Sharding info not provided when
restoring" (a Python warning) and "Metadata file does not exist" (an absl log record) are not a user's to act
on. Checkpoints are written as the engine writes them (checkpoints.create_manager + save, config.json from
train.save_resolved_config), from this process and from a process with 2 devices; values come back exactly."""

import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import demo_configs  # also puts configs/ on the path
import trees
from resdense_jax import checkpoints, optim, predict, train

import common  # noqa: E402  pylint: disable=g-bad-import-order  (configs/common.py)

SIZE = 32
STEP = 6
THRESHOLD = 0.375
ROOT = pathlib.Path(__file__).resolve().parents[1]
# What orbax says on the way (warnings.warn and absl logging); none of it may reach a user of load_for_inference.
FOREIGN = ("Sharding info not provided", "Metadata file does not exist")


def small_config():
  config = demo_configs.tiny_config()
  config.model.backbones = ("resnet50",)  # one tiny backbone: the Predictor compiles quickly
  config.model.backbone_kwargs = {"resnet50": demo_configs.TINY_BACKBONES["resnet50"]}
  config.train.ema_decay = 0.9  # the state holds an EMA: what load_for_inference returns by default
  return config


def _random_variables(model):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))
  rng = np.random.default_rng(0)
  fill = lambda k, s: jnp.asarray(rng.normal(size=s.shape) * 0.1 + (1.0 if k[-1] in ("scale", "var") else 0.0),
                                  s.dtype)
  return traverse_util.unflatten_dict({k: fill(k, s) for k, s in traverse_util.flatten_dict(shapes).items()})


def _iterator():
  """A real grain iterator (the grain handler saves its state beside the weights)."""
  it = iter(grain.MapDataset.range(16).to_iter_dataset())
  next(it)
  return it


def write_run(workdir: pathlib.Path, config, place=None):
  """A workdir with one evaluated checkpoint at STEP, saved as train_and_evaluate saves it; its TrainState.

  `place`: a function putting the state on the devices before it is saved (the 2-device run's shardings)."""
  model = train.create_model(config.model)
  variables = _random_variables(model)
  plan = train.plan_phases(config, steps_per_epoch=4)
  phase = train.create_phase(0, plan, config, variables["params"])
  state = train.create_train_state(jax.random.PRNGKey(1), variables, phase)
  # The average must differ from the raw weights, or "the EMA came back" could not be told from "the weights".
  state = state.replace(step=jnp.int32(STEP), ema=jax.tree.map(lambda x: x + 0.5, state.ema))
  if place is not None:
    state = place(state)
  train.save_resolved_config(config, workdir)
  manager = checkpoints.create_manager(workdir / "checkpoints", async_save=False)
  meta = {"phase": 0, "val_scan_best_threshold": THRESHOLD, "val_scan_best_threshold_macro_f1": 0.75}
  checkpoints.save(manager, STEP, state, _iterator(), meta, metrics={"val_scan_macro_f1": 0.75})
  manager.close()
  return state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("restore") / "run"
  return workdir, write_run(workdir, small_config())


def _as_numpy(tree):
  return jax.tree.map(np.asarray, tree)


class Foreign:
  """Collects orbax's warnings and WARNING-level log records (absl's logger, which orbax logs through)."""

  def __init__(self, caplog):
    self.caplog = caplog
    self.warnings = []

  def __enter__(self):
    self.caplog.clear()
    self.caplog.set_level(logging.INFO)
    self._catch = warnings.catch_warnings(record=True)
    self.warnings = self._catch.__enter__()
    warnings.simplefilter("always")  # a warning already shown once in this process still counts
    return self

  def __exit__(self, *exc):
    self._catch.__exit__(*exc)

  def messages(self) -> list[str]:
    found = [f"warning {w.category.__name__} from {w.filename}: {w.message}" for w in self.warnings
             if "orbax" in w.filename or any(f in str(w.message) for f in FOREIGN)]
    found += [f"log {r.name} {r.levelname}: {r.getMessage()}" for r in self.caplog.records
              if (r.levelno >= logging.WARNING and r.name.startswith(("absl", "orbax")))
              or any(f in r.getMessage() for f in FOREIGN)]
    return found


def test_load_for_inference_restores_exactly_without_foreign_warnings(run, caplog):
  workdir, state = run
  expected = _as_numpy(state.eval_variables)  # the EMA: what the run evaluated
  raw = _as_numpy(state.variables)
  for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / str(STEP)):
    with Foreign(caplog) as foreign:
      model, variables, config = checkpoints.load_for_inference(path)
      _, raw_variables, _ = checkpoints.load_for_inference(path, ema=False)
      threshold = checkpoints.load_threshold(path)
    assert not foreign.messages(), f"{path}:\n" + "\n".join(foreign.messages())
    trees.assert_trees_equal(_as_numpy(variables), expected)
    trees.assert_trees_equal(_as_numpy(raw_variables), raw)
    assert not np.array_equal(np.asarray(variables["params"]["predictions"]["kernel"]),
                              raw["params"]["predictions"]["kernel"])
    # On this process's default device, as jax arrays.
    assert all(isinstance(x, jax.Array) and x.devices() == {jax.devices()[0]} for x in jax.tree.leaves(variables))
    assert model == train.create_model(small_config().model) and config.model.backbones == ["resnet50"]
    assert threshold == (THRESHOLD, 0.75)


def test_predictor_from_checkpoint_without_foreign_warnings(run, caplog):
  workdir, state = run
  with Foreign(caplog) as foreign:
    predictor = predict.Predictor.from_checkpoint(workdir, threshold="best")
  assert not foreign.messages(), "\n".join(foreign.messages())
  trees.assert_trees_equal(_as_numpy(predictor.variables), _as_numpy(state.eval_variables))
  assert predictor.threshold == THRESHOLD


def test_resume_restore_is_exact_and_quiet(run, caplog):
  """The engine's resume path (checkpoints.restore with a template) stays exact and quiet too."""
  workdir, state = run
  config = small_config()
  manager = checkpoints.create_manager(workdir / "checkpoints", async_save=False)
  try:
    with Foreign(caplog) as foreign:
      # A template of zeros: what comes back is what was saved, not the template.
      template = jax.tree.map(jnp.zeros_like, state)
      restored, iterator = checkpoints.restore(manager, STEP, template, _iterator())
      meta = checkpoints.restore_meta(manager, STEP)
  finally:
    manager.close()
  assert not foreign.messages(), "\n".join(foreign.messages())
  trees.assert_trees_equal(_as_numpy(restored), _as_numpy(state))
  assert iterator.get_state() == _iterator().get_state() and meta["phase"] == 0
  assert config.train.ema_decay and restored.ema is not None


SAVE_ON_TWO_DEVICES = textwrap.dedent("""
    import pathlib, sys
    import jax, numpy as np
    from flax import traverse_util
    sys.path.insert(0, {tests!r})
    import test_checkpoints_restore as t
    from resdense_jax import sharding
    assert len(jax.devices()) == 2, jax.devices()
    mesh = sharding.create_mesh()

    def place(state):
      # The head's kernel split over the 2 devices, the rest replicated: the saved shardings name both.
      state = jax.device_put(state, sharding.replicated(mesh))
      split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
      head = dict(state.params["predictions"], kernel=jax.device_put(state.params["predictions"]["kernel"], split))
      return state.replace(params=dict(state.params, predictions=head))

    config = t.small_config()
    config.train.ema_decay = 0.0
    state = t.write_run(pathlib.Path({workdir!r}), config, place)
    assert len(state.params["predictions"]["kernel"].sharding.device_set) == 2
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, state.variables))
    np.savez(pathlib.Path({workdir!r}) / "expected.npz", **{{"/".join(k): v for k, v in flat.items()}})
""")


def test_checkpoint_of_a_two_device_run_opens_on_one_device_quietly(tmp_path, caplog):
  workdir = tmp_path / "two_devices"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  code = SAVE_ON_TWO_DEVICES.format(tests=str(ROOT / "tests"), workdir=str(workdir))
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert len(jax.devices()) == 1
  with Foreign(caplog) as foreign:
    _, variables, _ = checkpoints.load_for_inference(workdir)
  assert not foreign.messages(), "\n".join(foreign.messages())
  expected = dict(np.load(workdir / "expected.npz"))
  got = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(variables).items()}
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
