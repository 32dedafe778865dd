"""Serving many LoRA adapters at once: per-layer adapter stacks and the step's per-token slot index.

A served linear layer holds `lora_stack_a [L, in, R]` and `lora_stack_b [L, R, out]` (L =
max_loras slots, R = max_lora_rank padded; each slot's scaling folded into its B, zeros where an
adapter does not target the layer). Which slot each token uses is a property of the step, not
of the layer, so the serving step sets it once for the whole forward (`adapter_slots`) and every
layer with stacks reads it (`current_adapter_slots`); outside that context the stacks are idle.
The context holds the traced `[T]` array while the step is traced, nothing after.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
from flax import nnx

_SLOTS: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("lora_adapter_slots", default=None)


class LoRAStack(nnx.Variable):
    """Serving adapters' stacked weights (filled and replaced by the server, never trained)."""


@contextlib.contextmanager
def adapter_slots(slots: jax.Array) -> Iterator[None]:
    """Within: every layer with adapter stacks applies adapter `slots[t]` to token t (-1: none)."""
    token = _SLOTS.set(slots)
    try:
        yield
    finally:
        _SLOTS.reset(token)


def current_adapter_slots() -> jax.Array | None:
    """The per-token slot index `[T]` of the forward being traced, or None outside a multi-LoRA step."""
    return _SLOTS.get()
