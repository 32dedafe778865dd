"""Serving many LoRA adapters in one batch: adapter slots, their stacked weights, `LoRARequest`."""

from serving.lora.manager import LoRAManager, LoadedAdapter
from serving.lora.request import LoRARequest

__all__ = ["LoRAManager", "LoRARequest", "LoadedAdapter"]
