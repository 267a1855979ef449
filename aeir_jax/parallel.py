"""Multi-host start, mesh, shardings and host-to-device batch transfer.

One `jax.jit` over global arrays: the batch is sharded on the mesh axis `data`, parameters and
optimizer states are replicated. Every process feeds only its slice of the global batch.
Multi-host runs call `initialize_distributed()` first, before any other JAX call.
"""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aeir_jax.errors import ConfigError


def _env_int(name):
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _launcher_process_count():
  """The process count a cluster launcher announces (SLURM, Open MPI), or None."""
  if "SLURM_STEP_NODELIST" in os.environ:     # inside `srun`, as jax's SLURM detection needs
    return _env_int("SLURM_NTASKS")
  if "OMPI_MCA_orte_hnp_uri" in os.environ:
    return _env_int("OMPI_COMM_WORLD_SIZE")
  return None


def _on_tpu_vm() -> bool:
  """Whether this host has TPU chips (Cloud TPU VMs expose them as these device files)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Joins this process to a multi-process JAX job; a no-op for a single process.

  Call it once, before any other JAX call. Values not given come from the environment
  (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); on Cloud TPU VMs, under
  SLURM's `srun` and under Open MPI's `mpirun`, `jax.distributed.initialize` detects what is
  still missing. Elsewhere, without any of the three values, the process runs alone.

  Args:
    coordinator_address: `host:port` of process 0's coordinator service.
    num_processes: number of processes in the job.
    process_id: this process's index in `[0, num_processes)`.
  Returns:
    True when `jax.distributed` is initialised (now or before), False for a single process.
  Raises:
    ConfigError: some but not all of the three values are set outside a managed cluster.
  """
  if jax.distributed.is_initialized():
    return True
  given = {"coordinator_address": coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
           "num_processes": (num_processes if num_processes is not None
                             else _env_int("JAX_NUM_PROCESSES")),
           "process_id": process_id if process_id is not None else _env_int("JAX_PROCESS_ID")}
  launcher_count = _launcher_process_count()
  if given["num_processes"] == 1 or (given["num_processes"] is None and launcher_count == 1):
    return False
  if launcher_count is None and not _on_tpu_vm():
    missing = [name for name, value in given.items() if value is None]
    if len(missing) == len(given):
      return False
    if missing:
      raise ConfigError(f"a multi-process start needs {', '.join(missing)} as well (arguments or "
                        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
  jax.distributed.initialize(given["coordinator_address"], given["num_processes"],
                             given["process_id"])
  return True


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
  """Assembles each process's numpy slice into one global array sharded on `data`.

  The one intended host-to-device copy of a step: allowed under `jax.transfer_guard`, which
  the train loop sets to catch any other.
  """
  with jax.transfer_guard_host_to_device("allow"):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                        local_batch)
