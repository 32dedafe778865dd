"""Quantized matmuls: weight-only int4 (group scales and zero points) and int8 (per channel), W8A8 FP8."""

from pallas_kernels.quantized_matmul.fp8_ops import fp8_matmul
from pallas_kernels.quantized_matmul.ops import int4_matmul, int8_matmul

__all__ = ["fp8_matmul", "int4_matmul", "int8_matmul"]
