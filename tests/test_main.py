"""The entry point's flags: required flags, config overrides, and the clear message when data is missing."""

import json
import os
import pathlib
import subprocess
import sys

import demo_configs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(*args, timeout=120):
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "resdense_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_finetune_without_data_root_says_how_to_get_the_data(tmp_path):
  proc = _main("--config=configs/finetune.py", f"--workdir={tmp_path}", "--config.train.batch_size=16")
  assert proc.returncode != 0
  assert "--config.data.root" in proc.stderr and "COV19-CT-DB" in proc.stderr


def test_missing_workdir_flag_is_a_usage_error():
  proc = _main("--config=configs/finetune.py")
  assert proc.returncode != 0 and "workdir" in proc.stderr


def test_command_line_overrides_reach_the_saved_config(tmp_path):
  """The README's override forms (a tuple, a nested field, an element of the phase list, numbers, strings,
  booleans) through the real command line; --dry_run writes config.json and the plan without training."""
  root = demo_configs.tiny_collection(tmp_path / "ct")
  workdir = tmp_path / "run"
  proc = _main("--config=configs/finetune.py", f"--workdir={workdir}", f"--config.data.root={root}",
               """--config.model.backbones=("resnet152","densenet201")""", "--config.model.pooling=gem",
               "--config.train.batch_size=16", "--config.phases[1].epochs=3", "--config.phases[0].optimizer.name=adam",
               "--config.phases[0].optimizer.learning_rate=0.003", "--config.data.augment=False",
               "--config.model.fusion_filters=256", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  saved = json.loads((workdir / "config.json").read_text())
  assert saved == json.loads((workdir / "checkpoints" / "config.json").read_text())
  assert saved["model"]["backbones"] == ["resnet152", "densenet201"]
  assert saved["model"]["pooling"] == "gem" and saved["model"]["fusion_filters"] == 256
  assert saved["train"]["batch_size"] == 16 and saved["data"]["augment"] is False
  assert saved["data"]["root"] == str(root)
  assert [p["epochs"] for p in saved["phases"]] == [10, 3]
  assert saved["phases"][0]["optimizer"] == {**saved["phases"][1]["optimizer"], "name": "adam",
                                             "learning_rate": 0.003}
  # Fields not overridden keep configs/finetune.py's values.
  assert saved["data"]["image_size"] == 256 and saved["model"]["pretrained"] == "imagenet"
  # The plan the run would follow: 30 training slices at batch 16 -> 1 step per epoch, 10 + 3 epochs.
  out = proc.stdout
  assert "resnet152 + densenet201 at 256x256, batch 16: 6 training scans (30 slices, 1 steps per epoch)" in out
  assert "| head | 0-10 | backbones | adam 0.003 |" in out and "| finetune | 10-13 | backbones:100 | rmsprop" in out
  assert "nothing trained" in out and not (workdir / "metrics.jsonl").exists()
  assert not [p for p in (workdir / "checkpoints").iterdir() if p.name != "config.json"]
  # On CPU the command line turns XLA's YNNPACK convolution fusions off before JAX starts (cpu_flags.py).
  assert "JAX backend cpu; XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type='" in out


def test_cpu_ynnpack_on_leaves_xla_flags_alone(tmp_path):
  root = demo_configs.tiny_collection(tmp_path / "ct")
  proc = _main("--config=configs/finetune.py", f"--workdir={tmp_path / 'run'}", f"--config.data.root={root}",
               "--config.train.batch_size=16", "--config.cpu_ynnpack=True", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert "JAX backend cpu; XLA_FLAGS=''" in proc.stdout


def test_configs_resolve():
  sys.path.insert(0, str(ROOT / "configs"))
  import demo
  import finetune
  config = finetune.get_config()
  assert config.data.image_size == 256 and config.train.batch_size == 32
  assert [p.freeze for p in config.phases] == [("backbones",), ("backbones:100",)]
  assert sum(p.epochs for p in config.phases) == 20
  assert all(p.optimizer.name == "rmsprop" and p.optimizer.learning_rate == 1e-4 for p in config.phases)
  assert config.model.backbones == ("resnet101", "densenet121") and config.model.pretrained == "imagenet"
  assert demo.get_config().model.pretrained == "none"
