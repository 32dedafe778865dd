"""Grouped (ragged) matmul for mixture-of-experts layers: `grouped_matmul(lhs, rhs, group_sizes)`."""

from pallas_kernels.moe.ops import grouped_matmul

__all__ = ["grouped_matmul"]
