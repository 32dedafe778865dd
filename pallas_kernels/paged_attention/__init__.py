"""Ragged paged attention over a paged KV cache (serving)."""

from pallas_kernels.paged_attention.ops import attend_pages, ragged_paged_attention
from pallas_kernels.paged_attention.reference import PagedMetadata, write_kv

__all__ = ["PagedMetadata", "attend_pages", "ragged_paged_attention", "write_kv"]
