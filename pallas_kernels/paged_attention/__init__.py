"""Ragged paged attention over a paged KV cache (serving)."""

from pallas_kernels.paged_attention.ops import ragged_paged_attention

__all__ = ["ragged_paged_attention"]
