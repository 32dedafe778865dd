"""Public ragged paged attention: writes the step's KV into its pages, then attends.

The write is an XLA scatter on the (donated) cache; the attention runs the Pallas
Triton kernel on NVIDIA GPUs when the shapes allow it, and the jnp reference
elsewhere. `implementation` forces one ("kernel", "interpret" for the kernel on
the Pallas interpreter, "reference").
"""

from __future__ import annotations

import jax

from pallas_kernels.paged_attention import reference, triton_kernel
from pallas_kernels.paged_attention.reference import PagedMetadata


def choose_implementation(q: jax.Array, k_cache: jax.Array) -> str:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, page_size = k_cache.shape[0], k_cache.shape[2]
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and triton_kernel.supported(num_heads, num_kv_heads, head_dim, page_size):
        return "kernel"
    return "reference"


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
    implementation = implementation or choose_implementation(q, k_cache)
    if implementation == "reference":
        out = reference.paged_attention(q, k_cache, v_cache, meta, **options)
    elif implementation in ("kernel", "interpret"):
        out = triton_kernel.paged_attention(q, k_cache, v_cache, meta, **options, interpret=implementation == "interpret")
    else:
        raise ValueError(f"unknown paged attention implementation {implementation!r}")
    return out, k_cache, v_cache
