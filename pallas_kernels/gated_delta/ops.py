"""Public gated delta rule: the Pallas kernel where it applies, else the jnp reference (contract in
`reference.py`).

Implementations, picked by `implementation` or, when it is None, by lowering platform and shape
(`pallas_kernels.dispatch.on_cuda`):
- "kernel": `chunk_kernel.py` where the computation is lowered for CUDA, for rows from zero states
  (dense training rows and whole prompts; no states out), a power-of-two key dim of 16 or more and
  whole blocks of the value dim;
- "interpret": the same kernel on the Pallas interpreter (any backend; for tests);
- "reference": `reference.gated_delta_chunked` (every other platform, the serving path that carries
  states in and out, and the logged fallback).
Gradients through the kernel come from its backward kernels (`chunk_kernel.gated_delta_vjp`). The
kernel chunks by its own length (`chunk_kernel.CHUNK`); `chunk` is the reference's, and the result
does not depend on either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import on_cuda, warn_fallback
from pallas_kernels.gated_delta import chunk_kernel, reference
from pallas_kernels.ssm.reference import run_ids

IMPLEMENTATIONS = ("kernel", "interpret", "reference")


def _kernel(q, k, v, g, beta, segment_ids, interpret=False):
    real = (segment_ids != 0)[..., None]
    # Padding: no decay and no write, an identity step (as in the reference).
    g, beta = jnp.where(real, g.astype(jnp.float32), 0.0), jnp.where(real, beta.astype(jnp.float32), 0.0)
    return chunk_kernel.gated_delta_vjp(q, k, v, g, beta, run_ids(segment_ids), chunk_kernel.CHUNK, interpret)


def gated_delta(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, segment_ids: jax.Array,
                chunk: int, initial: jax.Array | None = None, *,
                implementation: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """`reference.gated_delta_chunked`'s contract; the kernel serves calls without `initial` (no states out: None)."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown gated_delta implementation {implementation!r}; "
                         f"supported: {', '.join(IMPLEMENTATIONS)}")
    if initial is not None or implementation == "reference":
        return reference.gated_delta_chunked(q, k, v, g, beta, segment_ids, chunk, initial)
    args = (q, k, v, g, beta, segment_ids)
    if implementation is None:
        if not chunk_kernel.supported(k.shape[-1], v.shape[-1]):
            warn_fallback("gated_delta", f"key dim {k.shape[-1]}, value dim {v.shape[-1]} (a power-of-two key dim "
                                         f">= 16, value dim in blocks of {chunk_kernel.BLOCK_V})")
            return reference.gated_delta_chunked(*args, chunk)
        return on_cuda(_kernel, lambda *a: reference.gated_delta_chunked(*a, chunk)[0], *args), None
    return _kernel(*args, interpret=implementation == "interpret"), None
