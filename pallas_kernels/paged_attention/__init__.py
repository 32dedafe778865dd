"""Ragged paged attention over a paged KV cache (serving)."""

from pallas_kernels.paged_attention.ops import ragged_paged_attention
from pallas_kernels.paged_attention.reference import PagedMetadata

__all__ = ["PagedMetadata", "ragged_paged_attention"]
