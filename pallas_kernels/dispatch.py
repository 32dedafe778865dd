"""Kernel-or-reference choice shared by the ops: by lowering platform, with logged fallbacks.

`on_cuda(kernel, reference, *args)` runs the kernel where the computation is lowered for
CUDA and the reference elsewhere (`jax.lax.platform_dependent`: both are traced, only the
lowering platform's branch is compiled). So the choice follows the device a jitted step is
compiled for, not the process's default backend, and a CUDA lowering on a CPU-only machine
(`pallas_kernels.gpu_lowering`) sees the kernels the GPU will run.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import jax

logger = logging.getLogger("pallas_kernels")


def on_cuda(kernel: Callable, reference: Callable, *args: Any) -> Any:
    """`kernel(*args)` when lowered for CUDA, `reference(*args)` on every other platform."""
    return jax.lax.platform_dependent(*args, cuda=kernel, default=reference)


@functools.lru_cache(maxsize=None)
def warn_fallback(op: str, reason: str) -> None:
    """Log once per (op, reason) that the kernel is skipped for the reference, and why."""
    logger.warning("%s: the GPU kernel does not cover this call (%s); using the jnp reference, which is much slower "
                   "on a GPU", op, reason)
