"""XLA's CPU convolutions: YNNPACK fusions (XLA's default) or Eigen's, chosen before JAX starts its backends.

Measured on the 2-core AMD EPYC (no AVX-512) these figures come from, jax 0.10.2, the paper's model at 128x128,
batch 8, float32 (WORKSPACE_NOTES.md, "Throughput"): with XLA's YNNPACK convolution fusions the eval step ran at
7.0-7.1 images/s and phase 2 at 1.71; with them off (`--xla_cpu_experimental_ynn_fusion_type=`, Eigen
convolutions) 10.3-11.0 and 2.45. So the command lines turn them off on CPU unless told otherwise
(`config.cpu_ynnpack`, `--cpu_ynnpack`); GPUs and TPUs never read the flag.
"""

from __future__ import annotations

import os

from jax._src import xla_bridge  # backends_are_initialized: no public equivalent

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def set_ynnpack(enabled: bool) -> bool:
  """Adds `--xla_cpu_experimental_ynn_fusion_type=` to XLA_FLAGS when `enabled` is False.

  Returns whether XLA_FLAGS now says what was asked. Leaves a value the user put in XLA_FLAGS alone, and does
  nothing once JAX's backends run (XLA reads its flags once, when the first backend starts).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if YNN_FLAG in flags:
    return False
  if enabled:
    return True
  if xla_bridge.backends_are_initialized():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
  return True
