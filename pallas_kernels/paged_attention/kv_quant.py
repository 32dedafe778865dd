"""Quantized KV pages: int8 / float8 values with a float32 scale per (kv head, token slot).

A page pool of a float dtype is one array `[K, P, B, D]`. A quantized pool is a
`QuantizedPages(values [K, P, B, D], scales [K, P, B])`: a pytree that travels
wherever the array did (the runner's opaque cache tree, shard_map specs, a scan),
its scales split on kv heads like its values. Each token's key (or value) vector of
one kv head is quantized when it is written (`quantize_kv`): scale = absmax / qmax,
with qmax 127 for int8 and the largest finite value for float8 (448 for e4m3, 57344
for e5m2), so the largest entry maps onto the format's range; a zero vector gets a
zero scale. Readers multiply the values back by their scales (`dequantize_pages`);
the Triton kernel folds the scales into the logits and the probabilities instead.

Bytes per token and kv head, K or V: D * itemsize, plus 4 for the scale when
quantized (head_dim 64: 128 in bfloat16, 68 in int8 or fp8, so ~1.9x the pages).

Names follow vLLM's `--kv-cache-dtype` (`KV_CACHE_DTYPES`); "auto" is the model dtype.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# name -> page dtype (None: the model's dtype)
KV_CACHE_DTYPES: dict[str, Any] = {
    "auto": None,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float32": jnp.float32,
    "fp8": jnp.float8_e4m3fn,
    "fp8_e4m3": jnp.float8_e4m3fn,
    "fp8_e5m2": jnp.float8_e5m2,
    "int8": jnp.int8,
}
# Quantized page dtype -> the largest magnitude a scaled value may take.
QMAX = {
    jnp.dtype(jnp.int8): 127.0,
    jnp.dtype(jnp.float8_e4m3fn): float(jnp.finfo(jnp.float8_e4m3fn).max),
    jnp.dtype(jnp.float8_e5m2): float(jnp.finfo(jnp.float8_e5m2).max),
}
SCALE_DTYPE = jnp.float32


class QuantizedPages(NamedTuple):
    """One quantized page pool (K or V of one layer)."""

    values: jax.Array  # [..., K, P, B, D] int8 / float8
    scales: jax.Array  # [..., K, P, B] float32


Pages = jax.Array | QuantizedPages


def resolve_kv_cache_dtype(name: str, model_dtype: Any) -> jnp.dtype:
    """The page dtype a `kv_cache_dtype` name asks for; ValueError naming the valid ones."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; supported: {', '.join(KV_CACHE_DTYPES)}")
    dtype = KV_CACHE_DTYPES[name]
    return jnp.dtype(model_dtype if dtype is None else dtype)


def is_quantized(dtype: Any) -> bool:
    """Whether pages of `dtype` hold scaled values (int8, float8) rather than plain floats."""
    return jnp.dtype(dtype) in QMAX


def bytes_per_token(head_dim: int, dtype: Any) -> int:
    """Bytes one token takes in one kv head's K (or V) pages, its scale included."""
    return head_dim * jnp.dtype(dtype).itemsize + (np.dtype(SCALE_DTYPE).itemsize if is_quantized(dtype) else 0)


def empty_pages(
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype: Any,
    sharding_fn: Callable[[tuple, tuple], jax.sharding.Sharding] | None = None,
) -> Pages:
    """A zeroed pool `shape` (`[..., K, P, B, D]`, logical `axes`): an array, or `QuantizedPages` for a
    quantized dtype (its scales `[..., K, P, B]` placed like the values without the last axis)."""

    def zeros(shape, axes, dtype):
        return jnp.zeros(shape, dtype, device=None if sharding_fn is None else sharding_fn(axes, shape))

    if not is_quantized(dtype):
        return zeros(shape, axes, dtype)
    return QuantizedPages(zeros(shape, axes, dtype), zeros(shape[:-1], axes[:-1], SCALE_DTYPE))


def page_values(pages: Pages) -> jax.Array:
    """The array whose shape is the pool's `[..., K, P, B, D]`."""
    return pages.values if isinstance(pages, QuantizedPages) else pages


def quantize_kv(x: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Vectors `x [..., D]` -> (values `[..., D]` of `dtype`, float32 scales `[...]`), one scale per vector."""
    dtype = jnp.dtype(dtype)
    qmax = QMAX[dtype]
    x = x.astype(jnp.float32)
    scales = jnp.max(jnp.abs(x), axis=-1) / qmax
    scaled = x / jnp.where(scales > 0, scales, 1.0)[..., None]
    if jnp.issubdtype(dtype, jnp.integer):
        scaled = jnp.round(scaled)
    return jnp.clip(scaled, -qmax, qmax).astype(dtype), scales.astype(SCALE_DTYPE)


def dequantize_pages(pages: Pages, dtype: Any) -> jax.Array:
    """Gathered pages back to floats of `dtype` (`values * scales`); plain float pages come back as they are."""
    if not isinstance(pages, QuantizedPages):
        return pages
    return (pages.values.astype(jnp.float32) * pages.scales[..., None]).astype(dtype)


def store_tokens(pages: Pages, index: tuple, x: jax.Array) -> Pages:
    """`pages.at[index].set(x)` with out-of-range indices dropped; `x [..., D]` is quantized on the way in
    (quantized pools) or cast to the pool's dtype."""
    if not isinstance(pages, QuantizedPages):
        return pages.at[index].set(x.astype(pages.dtype), mode="drop")
    values, scales = quantize_kv(x, pages.values.dtype)
    return QuantizedPages(pages.values.at[index].set(values, mode="drop"), pages.scales.at[index].set(scales, mode="drop"))


def gather_pages(pages: Pages, page_ids: jax.Array, dtype: Any) -> jax.Array:
    """`pages[:, page_ids]` (kv heads first), dequantized to `dtype` when the pool is quantized."""
    return dequantize_pages(jax.tree.map(lambda a: a[:, page_ids], pages), dtype)
