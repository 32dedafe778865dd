"""`LoRARequest`: which adapter a request runs with (vLLM's offline convention)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter folder served under `lora_name`; `lora_int_id` is vLLM's id (>= 1, kept for
    compatibility and reporting: the engine tells adapters apart by name)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("a LoRA request needs a lora_name")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1, got {self.lora_int_id}")
