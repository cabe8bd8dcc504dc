"""Multi-host start-up: one process per host, `jax.distributed.initialize` from the environment.

`initialize_from_env()` is the first thing `jaxinfer train` does. It looks, in order, at:

1. explicit arguments, or the variables JAXINFER_COORDINATOR (host:port of process 0), JAXINFER_NUM_PROCESSES,
   JAXINFER_PROCESS_ID (and optionally JAXINFER_LOCAL_DEVICE_IDS, comma separated);
2. a SLURM job step with more than one task (SLURM_NTASKS > 1): JAX's own SLURM cluster detection;
3. a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES lists more than one host, or MEGASCALE_* multi-slice
   variables): JAX's own TPU cluster detection;
4. otherwise nothing: a single process needs no coordinator.

Calling it again after a successful initialisation is a no-op, so tests and notebooks may call it freely.
It must run before anything touches a JAX backend (the first jax.devices() or computation).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping, Sequence

import jax

__all__ = ["DistributedInfo", "initialize_from_env", "detect_cluster"]

log = logging.getLogger("parallel.distributed")

ENV_COORDINATOR = "JAXINFER_COORDINATOR"
ENV_NUM_PROCESSES = "JAXINFER_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXINFER_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAXINFER_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  source: str  # "explicit", "env", "slurm", "tpu", "single", "already"
  process_id: int
  num_processes: int
  coordinator: str | None = None


def _int_env(env: Mapping[str, str], name: str) -> int:
  value = env.get(name, "")
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r}: expected an integer") from None


def detect_cluster(env: Mapping[str, str] | None = None) -> str:
  """Which start-up applies: 'env', 'slurm', 'tpu' or 'single' (pure function of the environment)."""
  env = os.environ if env is None else env
  if env.get(ENV_COORDINATOR) or env.get(ENV_NUM_PROCESSES) or env.get(ENV_PROCESS_ID):
    return "env"
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
    return "slurm"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
    return "tpu"
  return "single"


def initialize_from_env(coordinator: str | None = None, num_processes: int | None = None,
                        process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
                        env: Mapping[str, str] | None = None, timeout_s: int = 300) -> DistributedInfo:
  """Starts JAX's multi-controller runtime when the arguments or the environment ask for it; see module doc."""
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
    return DistributedInfo("already", jax.process_index(), jax.process_count())
  source = "explicit" if coordinator is not None or num_processes is not None or process_id is not None \
      else detect_cluster(env)
  if source in ("explicit", "env"):
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    if num_processes is None:
      num_processes = _int_env(env, ENV_NUM_PROCESSES) if env.get(ENV_NUM_PROCESSES) else None
    if process_id is None:
      process_id = _int_env(env, ENV_PROCESS_ID) if env.get(ENV_PROCESS_ID) else None
    if local_device_ids is None and env.get(ENV_LOCAL_DEVICE_IDS):
      local_device_ids = [int(i) for i in env[ENV_LOCAL_DEVICE_IDS].split(",") if i.strip()]
    missing = [name for name, value in ((ENV_COORDINATOR, coordinator), (ENV_NUM_PROCESSES, num_processes),
                                        (ENV_PROCESS_ID, process_id)) if value is None]
    if missing:
      raise ValueError(f"multi-process start-up needs {', '.join(missing)} as well (got coordinator="
                       f"{coordinator!r}, num_processes={num_processes!r}, process_id={process_id!r})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"{ENV_PROCESS_ID}={process_id} must lie in [0, {ENV_NUM_PROCESSES}={num_processes})")
    if num_processes == 1:
      log.info("one process: no distributed runtime needed")
      return DistributedInfo("single", 0, 1)
    log.info("jax.distributed.initialize: coordinator %s, process %d of %d", coordinator, process_id, num_processes)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)
    return DistributedInfo(source, jax.process_index(), jax.process_count(), coordinator)
  if source in ("slurm", "tpu"):
    log.info("jax.distributed.initialize: %s cluster detected from the environment", source)
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return DistributedInfo(source, jax.process_index(), jax.process_count())
  return DistributedInfo("single", 0, 1)
