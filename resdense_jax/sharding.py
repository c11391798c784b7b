"""Where arrays live: a 1-D device mesh with axis "data"; batches split over it, the train state replicated
or, with `config.train.fsdp`, each parameter (and its optimizer state) split over the same axis.

One CPU, several GPUs or a TPU VM run the same code; only the mesh grows.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
# Leaves smaller than this stay replicated under FSDP: splitting them costs more in collectives than it saves.
FSDP_MIN_SIZE = 2**14


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis "data" over all devices."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: Sequence[int], num_devices: int) -> P:
  """Split the largest axis that divides evenly over the devices; small or indivisible leaves replicated."""
  if num_devices == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_devices == 0:
      return P(*([None] * axis + [DATA_AXIS]))
  return P()


def state_sharding(state: Any, mesh: Mesh, *, fsdp: bool = False) -> Any:
  """A tree of shardings for `state` (arrays or ShapeDtypeStructs): replicated, or FSDP-split per leaf."""
  if not fsdp:
    return jax.tree.map(lambda _: replicated(mesh), state)
  return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), mesh.size)), state)
