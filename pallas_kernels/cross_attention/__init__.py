"""Cross attention of a ragged decoder step over per-slot encoder keys and values (`reference.py`)."""

from pallas_kernels.cross_attention.reference import cross_attention, dense_cross_attention, write_cross

__all__ = ["cross_attention", "dense_cross_attention", "write_cross"]
