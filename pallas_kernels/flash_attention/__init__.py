"""Dense and packed (segment-id) causal attention over `[batch, seq]` batches."""

from pallas_kernels.flash_attention.ops import attention

__all__ = ["attention"]
