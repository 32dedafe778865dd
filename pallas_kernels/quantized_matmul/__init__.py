"""Weight-only quantized matmuls (int4 with group scales and zero points, int8 per channel)."""

from pallas_kernels.quantized_matmul.ops import int4_matmul, int8_matmul

__all__ = ["int4_matmul", "int8_matmul"]
