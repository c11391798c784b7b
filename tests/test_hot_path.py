"""The speed options of the training hot path: prefetch, remat, dtype "auto", the compilation cache, FSDP.

Each is a behaviour (same numbers, smaller buffers, the right dtype, a cache folder), never a time.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from resdense_jax import compilation_cache, data, losses, sharding, train
from resdense_jax.data import pipeline, prefetch
from resdense_jax.models import build

import demo_configs
import trees

SIZE = 32


# ------------------------------------------------------------------------------------------------ prefetch


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
  root = demo_configs.tiny_collection(tmp_path_factory.mktemp("collection"))
  return data.RawScans(data.discover(root).train, progress=False)


def _pipeline(source):
  return iter(pipeline.train_pipeline(source, image_size=SIZE, batch_size=4, seed=3, num_epochs=None))


def test_prefetcher_yields_the_iterator_batches_and_the_state_of_the_last_one_handed_out(tiny_source):
  mesh = sharding.create_mesh()
  reference = _pipeline(tiny_source)
  expected, states = [], [reference.get_state()]
  for _ in range(5):
    expected.append(next(reference))
    states.append(reference.get_state())
  prefetcher = prefetch.DevicePrefetcher(_pipeline(tiny_source), sharding.data_sharded(mesh), size=2)
  try:
    assert json.loads(prefetcher.get_state()) == states[0]
    for i in range(3):
      batch = next(prefetcher)
      assert isinstance(batch["image"], jax.Array)
      for key in expected[i]:
        np.testing.assert_array_equal(np.asarray(batch[key]), expected[i][key])
      # Two more batches are already queued: the state is still the one after batch i.
      assert json.loads(prefetcher.get_state()) == states[i + 1]
  finally:
    prefetcher.close()
  # A fresh iterator set to that state resumes at batch 3, the first no step has seen.
  resumed = _pipeline(tiny_source)
  resumed.set_state(json.loads(prefetcher.get_state()))
  np.testing.assert_array_equal(next(resumed)["image"], expected[3]["image"])


def test_prefetcher_raises_the_loader_error_in_the_consumer():
  class Broken:
    def __init__(self):
      self.n = 0

    def get_state(self):
      return {"n": self.n}

    def __next__(self):
      self.n += 1
      if self.n == 2:
        raise OSError("slice 7 of /data/scan_3: truncated JPEG")
      return {"image": np.zeros((2, 4, 4, 3), np.uint8)}

  prefetcher = prefetch.DevicePrefetcher(Broken(), sharding.data_sharded(sharding.create_mesh()), size=2)
  try:
    next(prefetcher)
    with pytest.raises(OSError, match="truncated JPEG"):
      next(prefetcher)
  finally:
    prefetcher.close()


# --------------------------------------------------------------------------------------------------- remat


def _one_step(remat, phase, state, batch):
  step = train.compile_train_step(phase, losses.binary_cross_entropy, sharding.create_mesh(), remat=remat)
  compiled = step.lower(state, batch).compile()
  new_state, metrics = compiled(jax.tree.map(jnp.array, state), batch)  # a copy: the step donates it
  return compiled.as_text().count(" convolution("), jax.tree.map(np.asarray, (new_state, metrics))


def _remat_setup():
  config = demo_configs.tiny_config()  # one block per stage: 4 residual blocks, 4 dense conv blocks
  config.phases = [ml_collections.ConfigDict(dict(config.phases[1]))]
  config.phases[0].freeze = ()
  model = train.create_model(config.model)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"])
  phase = train.create_phase(0, train.plan_phases(config, 1), config, params)
  return config, model, phase


def test_remat_blocks_recomputes_in_the_lowered_step():
  """The fast check (no compile): the backward pass of the lowered program recomputes the blocks' convs."""
  _, model, phase = _remat_setup()
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))
  state = jax.eval_shape(lambda v: train.create_train_state(jax.random.PRNGKey(1), v, phase), variables)
  batch = {"image": jax.ShapeDtypeStruct((8, SIZE, SIZE, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((8,), jnp.int32)}

  def convs(remat):
    step = train.compile_train_step(phase, losses.binary_cross_entropy, sharding.create_mesh(), remat=remat)
    return step.lower(state, batch).as_text().count("stablehlo.convolution")

  assert convs("blocks") >= convs("none") + 8
  with pytest.raises(ValueError, match="config.train.remat"):
    train.remat_policy("layers")


@pytest.mark.long
def test_remat_blocks_recomputes_inside_the_blocks_and_gives_the_same_step():
  # XLA's CPU buffer assignment reports the same temporary size with or without remat (even with
  # nothing_saveable; see WORKSPACE_NOTES), so what is checked here is the program: the backward pass
  # recomputes the convolutions inside each block instead of reading them back, and the numbers agree.
  config = demo_configs.tiny_config()  # one block per stage: 4 residual blocks, 4 dense conv blocks
  config.phases = [ml_collections.ConfigDict(dict(config.phases[1]))]
  config.phases[0].freeze = ()
  model = train.create_model(config.model)
  variables = train.initialized(jax.random.key(0, impl="rbg"), model, SIZE)
  phase = train.create_phase(0, train.plan_phases(config, 1), config, variables["params"])
  state = train.create_train_state(jax.random.PRNGKey(1), variables, phase)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (8, SIZE, SIZE, 3)), jnp.uint8),
           "label": jnp.asarray(rng.integers(0, 2, 8), jnp.int32)}
  plain_convs, plain = _one_step("none", phase, state, batch)
  remat_convs, remat = _one_step("blocks", phase, state, batch)
  # Recomputing a block's inside is the same arithmetic as keeping it.
  trees.assert_trees_close(remat, plain, rtol=1e-5, atol=1e-6)
  # Every conv of a block but its last is computed twice (forward, then again in the backward pass); the
  # block outputs, and with them the ResNet blocks' last convs and DenseNet's new channels, are kept.
  assert remat_convs >= plain_convs + 8, (remat_convs, plain_convs)
  with pytest.raises(ValueError, match="config.train.remat"):
    train.remat_policy("layers")


# --------------------------------------------------------------------------------------------------- dtype


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
  assert build.compute_dtype("auto", "gpu") == build.compute_dtype("auto", "tpu") == "bfloat16"
  assert build.compute_dtype("auto", "cpu") == "float32"
  assert build.compute_dtype("float32", "tpu") == "float32" and build.compute_dtype("bfloat16", "cpu") == "bfloat16"
  config = demo_configs.tiny_config()
  assert config.model.dtype == "auto" and jax.default_backend() == "cpu"
  assert train.create_model(config.model).dtype == jnp.float32
  with pytest.raises(ValueError, match="config.model.dtype"):
    build.compute_dtype("float16")


# -------------------------------------------------------------------------------------- compilation cache


def test_compilation_cache_is_on_by_default_off_when_empty_and_keeps_a_folder_jax_already_has(tmp_path):
  script = textwrap.dedent("""
      import json, sys
      import jax
      from resdense_jax import compilation_cache
      preset, requested = sys.argv[1], sys.argv[2]
      if preset:
        jax.config.update("jax_compilation_cache_dir", preset)
      used = compilation_cache.enable(requested)
      jax.jit(lambda x: x + 1)(1.0)
      print(json.dumps({"used": used, "jax": jax.config.jax_compilation_cache_dir}))
  """)

  def run(preset, requested):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", script, preset, requested], capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])

  home_cache = tmp_path / "home" / "xla"
  assert run("", str(home_cache)) == {"used": str(home_cache), "jax": str(home_cache)} and home_cache.is_dir()
  assert run("", "") == {"used": None, "jax": None}
  theirs = str(tmp_path / "theirs")
  assert run(theirs, str(home_cache)) == {"used": theirs, "jax": theirs}
  assert compilation_cache.DEFAULT_DIR == "~/.cache/resdense_jax/xla"
  assert demo_configs.tiny_config().compilation_cache_dir == compilation_cache.DEFAULT_DIR


# ---------------------------------------------------------------------------------------------------- FSDP


def test_fsdp_splits_the_largest_divisible_axis_and_leaves_small_leaves_replicated():
  assert sharding.fsdp_spec((3, 3, 512, 1024), 2) == jax.sharding.PartitionSpec(None, None, None, "data")
  assert sharding.fsdp_spec((3, 3, 1024, 510), 4) == jax.sharding.PartitionSpec(None, None, "data")
  assert sharding.fsdp_spec((1023, 17), 2) == jax.sharding.PartitionSpec()  # nothing divides
  assert sharding.fsdp_spec((64,), 2) == jax.sharding.PartitionSpec()  # too small to be worth it
  assert sharding.fsdp_spec((3, 3, 512, 1024), 1) == jax.sharding.PartitionSpec()


FSDP_RUN = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from resdense_jax import losses, sharding, train
import demo_configs
config = demo_configs.tiny_config()
config.model.fusion_filters = 128  # a fusion kernel of 3x3x32x128: above FSDP_MIN_SIZE, split over 2 devices
model = train.create_model(config.model)
variables = train.initialized(jax.random.key(0, impl="rbg"), model, 32)
phase = train.create_phase(1, train.plan_phases(config, 3), config, variables["params"])
mesh = sharding.create_mesh()
rng = np.random.default_rng(0)
batches = [{{"image": rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8),
            "label": rng.integers(0, 2, 8).astype(np.int32)}} for _ in range(2)]
out = {{}}
host = jax.tree.map(np.asarray, variables)  # each run starts from its own copy: the step donates its state
for fsdp in (False, True):
  state = train.create_train_state(jax.random.PRNGKey(1), jax.tree.map(np.array, host), phase)
  shardings = sharding.state_sharding(state, mesh, fsdp=fsdp)
  state = jax.device_put(state, shardings)
  step = train.compile_train_step(phase, losses.binary_cross_entropy, mesh, state_shardings=shardings)
  for batch in batches:
    state, metrics = step(state, {{k: jax.device_put(v, sharding.data_sharded(mesh)) for k, v in batch.items()}})
  kernel = state.params["resnet50_fusion_conv"]["kernel"]
  out[str(fsdp)] = {{"spec": list(kernel.sharding.spec), "shard": list(kernel.addressable_shards[0].data.shape),
                    "params": jax.tree.map(lambda a: np.asarray(a).tolist(), state.params)}}
print(json.dumps(out))
"""


@pytest.mark.long
def test_fsdp_trains_the_same_weights_as_a_replicated_state_on_two_devices():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
         "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
  tests = os.path.dirname(os.path.abspath(__file__))
  done = subprocess.run([sys.executable, "-c", FSDP_RUN.format(tests=tests)], capture_output=True, text=True,
                        env=env, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out["False"]["spec"] == [] and out["False"]["shard"] == [3, 3, 32, 128]
  assert out["True"]["spec"] == [None, None, None, "data"] and out["True"]["shard"] == [3, 3, 32, 64]
  replicated = jax.tree.map(np.asarray, out["False"]["params"], is_leaf=lambda x: isinstance(x, list))
  split = jax.tree.map(np.asarray, out["True"]["params"], is_leaf=lambda x: isinstance(x, list))
  # The split program sums over devices in another order: float noise. Conv biases right before a BatchNorm
  # (every ResNet conv) have a zero exact gradient, so Adam turns that noise into values of ~1e-5 (as in
  # tests/test_multiprocess.py): a looser bound there. Elsewhere Adam's step (lr 1e-3, whatever the gradient's
  # size) moves a weight with a tiny gradient by a full step on either side of a rounding: atol 1e-4, as there.
  flat_split, flat_replicated = traverse_util.flatten_dict(split), traverse_util.flatten_dict(replicated)
  assert flat_split.keys() == flat_replicated.keys()
  noise = {k for k in flat_split if k[0] == "resnet50" and k[-2].endswith("_conv") and k[-1] == "bias"}
  assert noise
  for key, value in flat_split.items():
    np.testing.assert_allclose(value, flat_replicated[key], rtol=1e-5, atol=1e-3 if key in noise else 1e-4,
                               err_msg="/".join(key))


# --------------------------------------------------------------------------------------- CPU convolutions

YNN_RUN = """
import json, os, sys
from resdense_jax import cpu_flags
import jax
first = cpu_flags.set_ynnpack(sys.argv[1] == "on")
flags = os.environ.get("XLA_FLAGS", "")
jax.devices()  # the backend starts: XLA has read its flags
late = cpu_flags.set_ynnpack(False)
print(json.dumps({"first": first, "flags": flags, "late": late, "after": os.environ.get("XLA_FLAGS", "")}))
"""


@pytest.mark.parametrize("preset,mode,want", [
    ("", "off", {"first": True, "flags": "--xla_cpu_experimental_ynn_fusion_type="}),
    ("--xla_cpu_enable_fast_math=false", "off",
     {"first": True, "flags": "--xla_cpu_enable_fast_math=false --xla_cpu_experimental_ynn_fusion_type="}),
    # The user's own value wins.
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION", "off",
     {"first": False, "flags": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}),
])
def test_ynnpack_flag_is_set_only_before_jax_starts_and_never_over_the_users(preset, mode, want):
  env = {**os.environ, "XLA_FLAGS": preset, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", YNN_RUN, mode], capture_output=True, text=True, env=env, check=True)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert {k: got[k] for k in want} == want
  # Once the backend runs, nothing changes (XLA would not read it).
  assert got["after"] == got["flags"] and got["late"] is False
