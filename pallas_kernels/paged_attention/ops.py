"""Public ragged paged attention: writes the step's KV into its pages, then attends.

The write is an XLA scatter on the (donated) cache; the attention runs the Pallas
Triton kernel where the step is lowered for CUDA and the shapes allow it
(`pallas_kernels.dispatch.on_cuda`), and the tiled jnp path (`tiled.py`: per-sequence
query tiles, 3-6x faster than the reference for prefill on CPU) elsewhere; a shape
the kernel does not cover is logged once at WARNING. `implementation` forces one
("kernel", "interpret" for the kernel on the Pallas interpreter, "tiled", "reference"
(the definition of correct), or "mosaic": the Mosaic GPU decode kernel of
`mosaic_decode.py`, CUDA only, for the subset it documents: decode-only batches, `scale`
alone, page size 64/128, head_dim a multiple of 64; never chosen by itself until a GPU
measures it faster, `benchmarks/paged_attention.py`; float pages only).

Caches are page pools `[K, P, B, D]` or quantized pages with scales (`kv_quant.py`):
the write quantizes, every implementation but "mosaic" dequantizes on read.
Bidirectional spans (`PagedMetadata.visible_until`, `reference.py`) are taken by "reference", "tiled"
and the Triton kernel; "mosaic" (decode tokens never sit in a span) and latent pages refuse them.
Latent pages (MLA, `value_dim`): one pool `[1, P, B, D]` and no V pool (`v`, `v_cache`
None); V is the first `value_dim` columns of K (`reference.py`). Every implementation
but "mosaic" takes them, quantized ones included; "mosaic" refuses them by name.
`layer` names the layer of a stacked pool `[K, L, P, B, D]` (a scanned layer stack);
it is folded into the page axis once here (`reference.layer_pages`), so every
implementation reads that layer's pages in place as if it had a one-layer pool.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import on_cuda, warn_fallback
from pallas_kernels.paged_attention import mosaic_decode, reference, tiled, triton_kernel
from pallas_kernels.paged_attention.kv_quant import Pages, QuantizedPages, page_values
from pallas_kernels.paged_attention.reference import PagedMetadata


def _kernel_unsupported(q: jax.Array, k_cache: Pages, value_dim: int | None = None) -> str | None:
    """Why the Triton kernel cannot take q over this one-layer (or folded) pool `[K, P, B, D]`."""
    pages = page_values(k_cache)
    return triton_kernel.unsupported_reason(q.shape[1], pages.shape[0], q.shape[2], pages.shape[2], pages.size,
                                            pages.dtype.itemsize, value_dim)


def choose_implementation(q: jax.Array, k_cache: Pages, value_dim: int | None = None) -> str:
    """What runs when lowering for CUDA: "kernel" where it covers the shapes, else "tiled"."""
    return "tiled" if _kernel_unsupported(q, k_cache, value_dim) else "kernel"


def ragged_paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array | None,
    k_cache: Pages,
    v_cache: Pages | None,
    meta: PagedMetadata,
    *,
    layer: jax.Array | int | None = None,
    implementation: str | None = None,
    attend_meta: PagedMetadata | None = None,
    **options,
) -> tuple[jax.Array, Pages, Pages | None]:
    """See `reference.py` for the contract; `options` are `scale`, `sliding_window`, `softcap`,
    `sinks`, `alibi_slopes`, `chunk_size`, `value_dim` (latent pages: `v`, `v_cache` None);
    `layer` as the module docstring says. `attend_meta`: the rows that attend here when only some
    of the written ones do (MLA's expanded rows, `latent_expanded.absorbed_rows`); default `meta`.

    Returns (out [T,H,D] (`[T,H,value_dim]`), k_cache, v_cache).
    """
    k_cache, v_cache = reference.write_kv(k, v, k_cache, v_cache, meta, layer)
    out = attend_rows(q, k_cache, v_cache, meta, attend_meta, layer=layer, implementation=implementation, **options)
    return out, k_cache, v_cache


def attend_rows(q: jax.Array, k_cache: Pages, v_cache: Pages | None, meta: PagedMetadata,
                attend_meta: PagedMetadata | None, **options) -> jax.Array:
    """`attend_pages` over `attend_meta`'s rows (default `meta`'s); with no row at all it runs nothing and
    returns zeros (the CPU paths' cost is static in the step's shape, not in its rows)."""
    if attend_meta is None:
        return attend_pages(q, k_cache, v_cache, meta, **options)

    def attend():
        return attend_pages(q, k_cache, v_cache, attend_meta, **options)

    shape = jax.eval_shape(attend)
    return jax.lax.cond(attend_meta.num_seqs > 0, attend, lambda: jnp.zeros(shape.shape, shape.dtype))


def attend_pages(
    q: jax.Array,
    k_cache: Pages,
    v_cache: Pages | None,
    meta: PagedMetadata,
    *,
    layer: jax.Array | int | None = None,
    head: jax.Array | int | None = None,
    implementation: str | None = None,
    **options,
) -> jax.Array:
    """The attention half of `ragged_paged_attention`, over caches that already hold the step's KV.

    `head` reads a pool whose kv heads are all present (replicated) with the one kv head `head`
    (every query head of `q` uses it), again without slicing a copy (`reference.layer_pages`).
    """
    (k_cache, v_cache), meta = reference.layer_pages((k_cache, v_cache), meta, layer, head)
    if meta.visible_until is not None and (options.get("value_dim") is not None or implementation == "mosaic"):
        path = "the Mosaic decode attention" if implementation == "mosaic" else "latent pages (MLA, value_dim)"
        raise ValueError(f"bidirectional spans (visible_until) are not supported by {path}")
    if implementation is None and options.get("position_bias") is not None:
        implementation = "reference"  # T5's relative buckets: no kernel or tiled path takes them yet
    if implementation is None:
        reason = _kernel_unsupported(q, k_cache, options.get("value_dim"))
        if reason is None:
            kernel = functools.partial(triton_kernel.paged_attention, **options)
            attend = functools.partial(tiled.paged_attention, **options)
            return on_cuda(kernel, attend, q, k_cache, v_cache, meta)
        warn_fallback("ragged_paged_attention", reason)
        implementation = "tiled"
    if implementation == "reference":
        return reference.paged_attention(q, k_cache, v_cache, meta, **options)
    if implementation == "tiled":
        return tiled.paged_attention(q, k_cache, v_cache, meta, **options)
    if implementation in ("kernel", "interpret"):
        return triton_kernel.paged_attention(q, k_cache, v_cache, meta, **options, interpret=implementation == "interpret")
    if implementation == "mosaic":
        if v_cache is None:
            raise ValueError("the Mosaic decode attention does not cover latent pages (value_dim); "
                             "use the Triton kernel")
        if isinstance(k_cache, QuantizedPages):
            raise ValueError(f"the Mosaic decode attention does not cover quantized KV pages "
                             f"({k_cache.values.dtype.name}); use the Triton kernel")
        reason = mosaic_decode.unsupported_reason(q.shape[0], meta.kv_lens.shape[0], q.shape[1], k_cache.shape[0],
                                                  q.shape[2], k_cache.shape[2], q.dtype)
        unsupported = {k: v for k, v in options.items() if k != "scale" and v is not None}
        if reason or unsupported:
            raise ValueError(f"the Mosaic decode attention does not cover {reason or sorted(unsupported)}")
        return mosaic_decode.paged_attention(q, k_cache, v_cache, meta, scale=options["scale"])
    raise ValueError(f"unknown paged attention implementation {implementation!r}")
