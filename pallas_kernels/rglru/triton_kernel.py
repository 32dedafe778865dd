"""The RG-LRU's linear recurrence as a Pallas Triton kernel: one program per (row, block of channels).

Each program keeps its channels' state `h [block_d]` in registers and walks the row's T tokens
in order (`fori_loop`): h = decay_t * h + inputs_t, writing h after every token. Memory traffic
is one read of decay and inputs and one write of the states; the associative-scan reference
moves its `[B, T, D]` operands log2(T) times. The operands come from
`reference.scan_operands` (padding an identity step, run starts cut), so the kernel knows
nothing of segments. `reverse=True` walks from the last token to the first: the backward pass
of the same recurrence (`ops.py`).

The time loop is sequential: parallelism comes from rows x channel blocks (RecurrentGemma-2B:
lru_width 2560, 80 blocks of 32 per row).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK_D = 32  # channels per program: one warp, one float32 per thread


def supported(channels: int) -> bool:
    """Triton tiles need power-of-two sides: whole channel blocks."""
    return channels % BLOCK_D == 0


def _kernel(decay_ref, inputs_ref, states_ref, *, length: int, reverse: bool):
    row, block = pl.program_id(0), pl.program_id(1)
    channels = pl.ds(block * BLOCK_D, BLOCK_D)

    def step(i, h):
        t = length - 1 - i if reverse else i
        h = decay_ref[row, t, channels] * h + inputs_ref[row, t, channels]
        states_ref[row, t, channels] = h
        return h

    lax.fori_loop(0, length, step, jnp.zeros((BLOCK_D,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("reverse", "interpret"))
def linear_scan(decay: jax.Array, inputs: jax.Array, *, reverse: bool = False, interpret: bool = False) -> jax.Array:
    """`decay, inputs [B, T, D]` float32 -> states `[B, T, D]` float32 (h = 0 before the first step)."""
    rows, length, channels = decay.shape
    if not supported(channels):
        raise ValueError(f"linear_scan kernel: {channels} channels, a multiple of {BLOCK_D} needed")
    whole = pl.BlockSpec(decay.shape, lambda i, j: (0, 0, 0))
    return pl.pallas_call(
        functools.partial(_kernel, length=length, reverse=reverse),
        grid=(rows, channels // BLOCK_D),
        in_specs=[whole, whole],
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct(decay.shape, jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name=f"rglru_scan_d{BLOCK_D}{'_reverse' if reverse else ''}",
    )(decay.astype(jnp.float32), inputs.astype(jnp.float32))
