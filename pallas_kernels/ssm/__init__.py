"""State-space mixers (Mamba's selective scan, Mamba-2's SSD, the causal conv1d): `reference.py` is the jnp
definition; `selective_scan`, `ssd_chunked` and `ssd_chunked_states` pick the Pallas kernels (`triton_kernel.py`,
`ssd_kernel.py`) where they apply (`ops.py`)."""

from pallas_kernels.ssm.ops import selective_scan, ssd_chunked, ssd_chunked_states
from pallas_kernels.ssm.reference import (
    causal_conv1d,
    conv1d_step,
    gated_rms_norm,
    run_ids,
    selective_state_step,
    ssd_scan,
    ssd_state_step,
)

__all__ = [
    "causal_conv1d",
    "conv1d_step",
    "gated_rms_norm",
    "run_ids",
    "selective_scan",
    "selective_state_step",
    "ssd_chunked",
    "ssd_chunked_states",
    "ssd_scan",
    "ssd_state_step",
]
