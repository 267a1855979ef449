"""Mesh, shardings and host-to-device batch transfer (single- and multi-host).

One `jax.jit` over global arrays: the batch is sharded on the mesh axis `data`, parameters and
optimizer states are replicated. Every process feeds only its slice of the global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aeir_jax.errors import ConfigError


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices, ("data",))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(name: str, global_batch: int, mesh: Mesh):
  n = mesh.devices.size
  if global_batch % n:
    raise ConfigError(f"{name}={global_batch} is not divisible by the {n} devices of the mesh; "
                      f"set it to a multiple of {n} (e.g. {((global_batch + n - 1) // n) * n})")


def to_global(local_batch, sharding: NamedSharding):
  """Assembles each process's numpy slice into one global array sharded on `data`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)
