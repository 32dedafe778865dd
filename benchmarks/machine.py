"""What the benchmarks ran on, for their headers: the CPU model matters (torch's MKL runs its fastest
paths on Intel CPUs only, so a jaxllm/transformers ratio on an Intel Xeon and on an AMD EPYC differ)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import jax


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_device() -> str:
    """`CPU (<model>, <n> cores), <k> jax device(s)`."""
    return f"CPU ({cpu_model()}, {os.cpu_count()} cores), {jax.device_count()} jax device(s)"
