"""The entry point's flags: required flags, config overrides, and the clear message when data is missing."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(*args, timeout=120):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "resdense_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_finetune_without_data_root_says_how_to_get_the_data(tmp_path):
  proc = _main("--config=configs/finetune.py", f"--workdir={tmp_path}", "--config.train.batch_size=16")
  assert proc.returncode != 0
  assert "--config.data.root" in proc.stderr and "COV19-CT-DB" in proc.stderr


def test_missing_workdir_flag_is_a_usage_error():
  proc = _main("--config=configs/finetune.py")
  assert proc.returncode != 0 and "workdir" in proc.stderr


def test_configs_resolve_with_overrides():
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
