"""Public selective scan: the Pallas kernel where it applies, else the jnp reference (contract in `reference.py`).

Implementations, picked by `implementation` or, when it is None, by lowering platform and shape
(`pallas_kernels.dispatch.on_cuda`):
- "kernel": `triton_kernel.py` where the computation is lowered for CUDA, for calls without
  initial states (dense training rows and whole prompts), channels in blocks of 64 and a
  power-of-two state size;
- "interpret": the same kernel on the Pallas interpreter (any backend; for tests);
- "reference": the associative scan (every other platform, the serving path that carries
  states in and out, and the logged fallback).
Gradients through the kernel come from its backward kernel (`triton_kernel.selective_scan_vjp`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import on_cuda, warn_fallback
from pallas_kernels.ssm import reference, triton_kernel

IMPLEMENTATIONS = ("kernel", "interpret", "reference")


def _kernel_inputs(x, dt, segment_ids):
    dt, x = reference.identity_on_padding(dt.astype(jnp.float32), x.astype(jnp.float32), segment_ids)
    keep = 1.0 - reference.run_starts(segment_ids).astype(jnp.float32)
    return x, dt, keep


def _kernel(x, dt, A, B, C, D, segment_ids, interpret=False):
    x, dt, keep = _kernel_inputs(x, dt, segment_ids)
    return triton_kernel.selective_scan_vjp(x, dt, A, B, C, D, keep, interpret)


def _scan(x, dt, A, B, C, D, segment_ids, implementation):
    args = (x, dt, A, B, C, D, segment_ids)
    if implementation == "auto":
        return on_cuda(_kernel, lambda *a: reference.selective_scan(*a)[0], *args)
    return _kernel(*args, interpret=implementation == "interpret")


def selective_scan(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                   segment_ids: jax.Array, initial: jax.Array | None = None, *,
                   implementation: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """`reference.selective_scan`'s contract; the kernel serves calls without `initial` (no states out)."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown selective_scan implementation {implementation!r}; supported: "
                         f"{', '.join(IMPLEMENTATIONS)}")
    if initial is not None or implementation == "reference":
        return reference.selective_scan(x, dt, A, B, C, D, segment_ids, initial)
    if implementation is None:
        if not triton_kernel.supported(x.shape[-1], A.shape[-1]):
            warn_fallback("selective_scan", f"{x.shape[-1]} channels, state {A.shape[-1]} "
                                            f"(blocks of {triton_kernel.BLOCK_D}, a power-of-two state)")
            return reference.selective_scan(x, dt, A, B, C, D, segment_ids)
        implementation = "auto"
    return _scan(x, dt, A, B, C, D, segment_ids, implementation), None
