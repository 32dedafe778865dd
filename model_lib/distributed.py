"""Joining a multi-process (multi-host) run through `jax.distributed`, JAX's multi-controller runtime.

Every process runs the same program over one global mesh of all processes' devices;
`jax.distributed.initialize` connects them through a coordinator (process 0's host). It
is called when the run asks for it: the coordinator address, process count and process id
(`train --coordinator_address / --num_processes / --process_id`, `serve --coordinator-address
/ --num-processes / --process-id`, `LLM(coordinator_address=..., ...)`), or the environment
that `jax.distributed` itself reads (`JAX_COORDINATOR_ADDRESS`, or a SLURM / Open MPI / MPI
job of more than one task, whose coordinator, process count and id it detects). A single
process never initializes. Shared by training and serving.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax

logger = logging.getLogger(__name__)

# Task counts of the launchers whose settings jax.distributed detects on its own.
CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def multi_process_requested(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None, environ: Mapping[str, str]
) -> bool:
    if coordinator_address or num_processes or process_id is not None or environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return any(int(environ.get(name) or 1) > 1 for name in CLUSTER_SIZE_VARIABLES)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Call `jax.distributed.initialize` if this run spans processes; True when it does.

    Must run before the first JAX computation. Unset values are filled by jax.distributed
    from its environment and cluster detection.
    """
    environ = os.environ if environ is None else environ
    if not multi_process_requested(coordinator_address, num_processes, process_id, environ):
        return False
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    logger.info(
        "process %d of %d: %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True


def is_leader() -> bool:
    """The process that writes shared files (metrics, exports): process 0."""
    return jax.process_index() == 0
