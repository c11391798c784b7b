"""Entry point: fine-tune Res-Dense Net from a config file.

    python -m resdense_jax.main --config=configs/finetune.py --workdir=runs/resdense \
        --config.data.root=/path/to/COV19-CT-DB --config.train.batch_size=16
    python -m resdense_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m resdense_jax.main --config=configs/finetune.py --workdir=runs/x --config.data.root=... --dry_run

Re-running with the same workdir resumes from its latest checkpoint.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from resdense_jax import cpu_flags, train

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard events and config.json.")
config_flags.DEFINE_config_file("config", None, "Training configuration file (e.g. configs/finetune.py).",
                                lock_config=True)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first: multi-host runs (TPU VM pods, "
                  "GPU clusters), with the coordinator found from the environment. The workdir must be shared.")
flags.DEFINE_bool("dry_run", False, "Resolve the config and the data, write config.json, print each phase's steps "
                  "and trainable parameters, and exit without loading weights or training.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:  # absl sets the flag itself, so using_default_value is always False
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
  cpu_flags.set_ynnpack(FLAGS.config.get("cpu_ynnpack", False))  # before anything starts a JAX backend
  if FLAGS.distributed:
    jax.distributed.initialize()
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(), jax.process_count())
  if FLAGS.dry_run:
    print(_plan_table(train.dry_run(FLAGS.config, FLAGS.workdir)), flush=True)
    print(f"JAX backend {jax.default_backend()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    print(f"dry run: resolved config in {FLAGS.workdir}/config.json; nothing trained", flush=True)
    return
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  best = result.get("best_" + FLAGS.config.eval.best_metric)
  print(f"done: best {FLAGS.config.eval.best_metric} {best} at step {result.get('best_step')}; "
        f"workdir {FLAGS.workdir}", flush=True)


def _plan_table(plan: dict) -> str:
  lines = [f"{' + '.join(plan['backbones'])} at {plan['image_size']}x{plan['image_size']}, batch {plan['batch_size']}: "
           f"{plan['train_scans']} training scans ({plan['train_slices']} slices, {plan['steps_per_epoch']} steps "
           f"per epoch), {plan['validation_scans']} validation scans",
           "| phase | steps | freeze | optimizer | trainable params | frozen params |",
           "| --- | --- | --- | --- | --- | --- |"]
  for p in plan["phases"]:
    lines.append(f"| {p['name']} | {p['start_step']}-{p['end_step']} | {', '.join(p['freeze']) or '-'} | "
                 f"{p['optimizer']} {p['learning_rate']:g} | {p['trainable_params']:,} | {p['frozen_params']:,} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
