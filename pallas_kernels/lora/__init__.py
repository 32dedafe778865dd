"""Batched LoRA product for many adapters in one batch: `lora_delta(x, a_stack, b_stack, slots)`."""

from pallas_kernels.lora.ops import lora_delta

__all__ = ["lora_delta"]
