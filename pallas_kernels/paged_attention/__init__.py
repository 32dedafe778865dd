"""Ragged paged attention over a paged KV cache (serving)."""

from pallas_kernels.paged_attention.kv_quant import KV_CACHE_DTYPES, QuantizedPages
from pallas_kernels.paged_attention.ops import attend_pages, attend_rows, ragged_paged_attention
from pallas_kernels.paged_attention.reference import PagedMetadata, write_kv

__all__ = ["KV_CACHE_DTYPES", "PagedMetadata", "QuantizedPages", "attend_pages", "attend_rows", "ragged_paged_attention", "write_kv"]
