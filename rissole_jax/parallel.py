"""Processes, devices and the mesh: the one place that knows how work is spread.

Multi-host: `initialize_distributed` reads flags or the usual environment
variables; every process runs the same program on its own part of the data.
"""
from __future__ import annotations

import os

import jax


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts jax.distributed when several processes are asked for.

  Arguments win over the environment (RISSOLE_COORDINATOR, RISSOLE_NUM_PROCESSES,
  RISSOLE_PROCESS_ID); on TPU pods and SLURM, jax finds them by itself when
  RISSOLE_DISTRIBUTED=auto.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("RISSOLE_COORDINATOR")
  if num_processes is None and env.get("RISSOLE_NUM_PROCESSES"):
    num_processes = int(env["RISSOLE_NUM_PROCESSES"])
  if process_id is None and env.get("RISSOLE_PROCESS_ID"):
    process_id = int(env["RISSOLE_PROCESS_ID"])
  if coordinator_address and (num_processes or 1) > 1:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif env.get("RISSOLE_DISTRIBUTED") == "auto":
    jax.distributed.initialize()


def process_info() -> tuple[int, int]:
  return jax.process_index(), jax.process_count()


def sync(name: str) -> None:
  """A barrier across processes (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
