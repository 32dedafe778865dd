"""Launching jax.distributed processes on 127.0.0.1 for the multi-host tests (training and serving)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(
    argv: Callable[[int, str], list[str]], num_processes: int = 2, devices_per_process: int = 4
) -> list[subprocess.Popen]:
    """Start `python argv(process_id, coordinator_address)` for every process, each with its own CPU devices.

    Output goes to a temporary file per process (`proc.log`), read back by `finish`.
    """
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
           "JAX_PLATFORMS": "cpu"}
    procs = []
    for i in range(num_processes):
        log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([sys.executable, *argv(i, coordinator)], env=env, cwd=os.getcwd(), stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        proc.log = log
        procs.append(proc)
    return procs


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for every process (killing all at the timeout); assert each exited 0; their outputs."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = [output(proc) for proc in procs]
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{out[-4000:]}"
    return outputs
