"""Public many-adapter LoRA product (SGMV-style): tokens sorted by adapter, two grouped matmuls.

Contract (see `reference.py`): `lora_delta(x [T, K], a [L, K, R], b [L, R, N], slots [T]) -> [T, N]`,
token t multiplied by adapter `slots[t]`'s `A` then `B`; slots outside `[0, L)` (-1: no
adapter) give zeros.

How: a stable sort of the tokens by slot (no-adapter tokens last) makes each adapter's tokens
one contiguous group, so the shrink `x @ A` and the expand `h @ B` are the grouped matmuls of
`pallas_kernels.moe` (rows past the groups, the no-adapter tokens, come out as zeros), and the
rows are put back in token order. Each adapter's weights are read once per call, however many
of its tokens the batch holds, which is what makes one batch of many adapters cheap (the
segmented gather matmul of Punica / S-LoRA). On CUDA the grouped matmuls are the Pallas Triton
kernels where K, R and N are multiples of 16 (the serving stacks pad R to one). Elsewhere a step
of at most `GATHER_MAX_TOKENS` tokens (decode) takes the per-token gather of `reference.py`, which
XLA:CPU runs about twice as fast as `jax.lax.ragged_dot` there, and longer ones the grouped form
on `jax.lax.ragged_dot` (3-4x faster than the gather at 128 tokens; SmolLM2-135M's widest layer,
4 adapters of rank 16, benchmarks/RESULTS.md). `implementation` forces the grouped form on one
grouped matmul implementation (`pallas_kernels.moe.IMPLEMENTATIONS`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import on_cuda
from pallas_kernels.lora import reference
from pallas_kernels.moe import grouped_matmul

GATHER_MAX_TOKENS = 16  # off CUDA: up to this many tokens, gather each token's adapter


def lora_delta(
    x: jax.Array, a: jax.Array, b: jax.Array, slots: jax.Array, *, implementation: str | None = None, **options
) -> jax.Array:
    """See the module docstring; `[T, N]` in x's dtype. `options` go to both grouped matmuls."""
    if x.ndim != 2 or a.ndim != 3 or b.ndim != 3 or slots.shape != x.shape[:1]:
        raise ValueError(f"expected x [T, K], a [L, K, R], b [L, R, N], slots [T]; got {x.shape}, {a.shape}, "
                         f"{b.shape}, {slots.shape}")
    if a.shape[1] != x.shape[1] or b.shape[:2] != (a.shape[0], a.shape[2]):
        raise ValueError(f"stacks do not fit: x {x.shape}, a {a.shape}, b {b.shape}")
    if implementation is not None:
        return _grouped(x, a, b, slots, implementation, **options)
    if x.shape[0] <= GATHER_MAX_TOKENS:
        return on_cuda(lambda *args: _grouped(*args, None, **options), reference.lora_delta, x, a, b, slots)
    return _grouped(x, a, b, slots, None, **options)


def _grouped(x: jax.Array, a: jax.Array, b: jax.Array, slots: jax.Array, implementation: str | None,
             **options) -> jax.Array:
    num_slots = a.shape[0]
    group = jnp.where((slots >= 0) & (slots < num_slots), slots, num_slots).astype(jnp.int32)  # L: no adapter
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=num_slots + 1)[:num_slots].astype(jnp.int32)
    h = grouped_matmul(x[order], a.astype(x.dtype), sizes, implementation=implementation, **options)  # [T, R] by slot
    out = grouped_matmul(h, b.astype(x.dtype), sizes, implementation=implementation, **options)  # [T, N] by slot
    return jnp.zeros_like(out).at[order].set(out)
