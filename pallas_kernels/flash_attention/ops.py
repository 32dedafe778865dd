"""Public dense-attention op: the one place that picks an implementation.

Only the jnp reference exists so far (XLA fuses it well enough on CPU and small
GPU shapes), so the public op is the reference itself. A Pallas flash kernel
replaces this binding with a function that chooses by backend and shape, with
no change to the model code that calls `attention`.
"""

from pallas_kernels.flash_attention.reference import attention

__all__ = ["attention"]
