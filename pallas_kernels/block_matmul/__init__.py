"""Weight-only matmul over affine blocks of 4- or 8-bit values (GGUF's Q4_0, Q4_1, Q8_0)."""

from pallas_kernels.block_matmul.ops import block_matmul

__all__ = ["block_matmul"]
