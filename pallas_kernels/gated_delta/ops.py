"""Public gated delta rule: the Pallas kernels where they apply, else the jnp reference (contract in
`reference.py`).

Implementations, picked by `implementation` or, when it is None, by lowering platform and shape
(`pallas_kernels.dispatch.on_cuda`):
- "kernel": `chunk_kernel.py` where the computation is lowered for CUDA, for a power-of-two key dim
  of 16 or more and whole blocks of the value dim: rows from zero states (dense training rows and
  whole prompts; no states out: None) take `gated_delta_vjp`, differentiable through its backward
  kernels; calls with per-run `initial` states (the serving path: prefill chunks continuing from
  their slots) take `gated_delta_from_states`, forward only, which also returns the states after
  the runs;
- "interpret": the same kernels on the Pallas interpreter (any backend; for tests);
- "reference": `reference.gated_delta_chunked` (every other platform, and the logged fallback).
The kernels chunk by their own length (`chunk_kernel.CHUNK`); `chunk` is the reference's, and the
result does not depend on either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import on_cuda, warn_fallback
from pallas_kernels.gated_delta import chunk_kernel, reference
from pallas_kernels.ssm.reference import run_ids

IMPLEMENTATIONS = ("kernel", "interpret", "reference")


def _kernel(q, k, v, g, beta, segment_ids, initial=None, interpret=False):
    real = (segment_ids != 0)[..., None]
    # Padding: no decay and no write, an identity step (as in the reference).
    g, beta = jnp.where(real, g.astype(jnp.float32), 0.0), jnp.where(real, beta.astype(jnp.float32), 0.0)
    runs = run_ids(segment_ids)
    if initial is None:
        return chunk_kernel.gated_delta_vjp(q, k, v, g, beta, runs, chunk_kernel.CHUNK, interpret), None
    return chunk_kernel.gated_delta_from_states(q, k, v, g, beta, runs, initial, chunk=chunk_kernel.CHUNK,
                                                interpret=interpret)


def gated_delta(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, segment_ids: jax.Array,
                chunk: int, initial: jax.Array | None = None, *,
                implementation: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """`reference.gated_delta_chunked`'s contract: (`o`, the states after each of the R runs `initial` starts;
    None without `initial`). Gradients only without `initial` through the kernels."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown gated_delta implementation {implementation!r}; "
                         f"supported: {', '.join(IMPLEMENTATIONS)}")
    args = (q, k, v, g, beta, segment_ids)

    def reference_call(*a):
        return reference.gated_delta_chunked(*a[:6], chunk, *a[6:])

    if implementation == "reference":
        return reference_call(*args, initial)
    if implementation is None:
        if not chunk_kernel.supported(k.shape[-1], v.shape[-1]):
            warn_fallback("gated_delta", f"key dim {k.shape[-1]}, value dim {v.shape[-1]} (a power-of-two key dim "
                                         f">= 16, value dim in blocks of {chunk_kernel.BLOCK_V})")
            return reference_call(*args, initial)
        if initial is None:
            return on_cuda(lambda *a: _kernel(*a)[0], lambda *a: reference_call(*a)[0], *args), None
        return on_cuda(_kernel, reference_call, *args, initial)
    return _kernel(*args, initial, interpret=implementation == "interpret")
