"""Small-row float32 matmuls on the CPU backend through a BLAS sgemm custom call; `jnp.dot` elsewhere."""

from pallas_kernels.cpu_matmul.library import load
from pallas_kernels.cpu_matmul.ops import MAX_ROWS, matmul, reference, small_m_blas, uses_blas

__all__ = ["MAX_ROWS", "load", "matmul", "reference", "small_m_blas", "uses_blas"]
