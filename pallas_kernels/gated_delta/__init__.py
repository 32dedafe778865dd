"""The gated delta rule (Qwen3-Next's Gated DeltaNet): `reference.py` is the jnp definition, chunked
over rows of runs with per-run states, and the per-token step; `gated_delta` picks the Pallas kernels
(`chunk_kernel.py`, forward and backward) where they apply (`ops.py`)."""

from pallas_kernels.gated_delta.ops import gated_delta
from pallas_kernels.gated_delta.reference import gated_delta_chunked, gated_delta_step, l2_normalize, rms_norm_gated

__all__ = ["gated_delta", "gated_delta_chunked", "gated_delta_step", "l2_normalize", "rms_norm_gated"]
