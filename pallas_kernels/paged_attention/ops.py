"""Public ragged paged attention: writes the step's KV into its pages, then attends.

The write is an XLA scatter on the (donated) cache; the attention runs the Pallas
Triton kernel where the step is lowered for CUDA and the shapes allow it
(`pallas_kernels.dispatch.on_cuda`), and the tiled jnp path (`tiled.py`: per-sequence
query tiles, 3-6x faster than the reference for prefill on CPU) elsewhere; a shape
the kernel does not cover is logged once at WARNING. `implementation` forces one
("kernel", "interpret" for the kernel on the Pallas interpreter, "tiled", or
"reference", the definition of correct).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.dispatch import on_cuda, warn_fallback
from pallas_kernels.paged_attention import reference, tiled, triton_kernel
from pallas_kernels.paged_attention.reference import PagedMetadata


def choose_implementation(q: jax.Array, k_cache: jax.Array) -> str:
    """What runs when lowering for CUDA: "kernel" where it covers the shapes, else "tiled"."""
    reason = triton_kernel.unsupported_reason(q.shape[1], k_cache.shape[0], q.shape[2], k_cache.shape[2], k_cache.size)
    return "tiled" if reason else "kernel"


def ragged_paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    meta: PagedMetadata,
    *,
    implementation: str | None = None,
    **options,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """See `reference.py` for the contract; `options` are `scale`, `sliding_window`, `softcap`,
    `sinks`, `alibi_slopes`.

    Returns (out [T,H,D], k_cache, v_cache).
    """
    k_cache, v_cache = reference.write_kv(k, v, k_cache, v_cache, meta)
    if implementation is None:
        reason = triton_kernel.unsupported_reason(q.shape[1], k_cache.shape[0], q.shape[2], k_cache.shape[2],
                                                  k_cache.size)
        if reason is None:
            kernel = functools.partial(triton_kernel.paged_attention, **options)
            attend = functools.partial(tiled.paged_attention, **options)
            return on_cuda(kernel, attend, q, k_cache, v_cache, meta), k_cache, v_cache
        warn_fallback("ragged_paged_attention", reason)
        implementation = "tiled"
    if implementation == "reference":
        out = reference.paged_attention(q, k_cache, v_cache, meta, **options)
    elif implementation == "tiled":
        out = tiled.paged_attention(q, k_cache, v_cache, meta, **options)
    elif implementation in ("kernel", "interpret"):
        out = triton_kernel.paged_attention(q, k_cache, v_cache, meta, **options, interpret=implementation == "interpret")
    else:
        raise ValueError(f"unknown paged attention implementation {implementation!r}")
    return out, k_cache, v_cache
