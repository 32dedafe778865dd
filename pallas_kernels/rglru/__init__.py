"""RecurrentGemma's RG-LRU: `reference.py` is the jnp definition (associative scan over runs, per-token step)."""

from pallas_kernels.rglru.reference import gate_inputs, linear_scan, rg_lru, rg_lru_step

__all__ = ["gate_inputs", "linear_scan", "rg_lru", "rg_lru_step"]
