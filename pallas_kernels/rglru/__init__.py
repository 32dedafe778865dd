"""RecurrentGemma's RG-LRU: `reference.py` is the jnp definition (associative scan over runs, per-token step);
`rg_lru` / `linear_scan` pick the Pallas kernel (`triton_kernel.py`) where it applies (`ops.py`)."""

from pallas_kernels.rglru.ops import linear_scan, rg_lru
from pallas_kernels.rglru.reference import gate_inputs, rg_lru_step

__all__ = ["gate_inputs", "linear_scan", "rg_lru", "rg_lru_step"]
