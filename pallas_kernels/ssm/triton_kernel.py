"""Mamba's selective scan as a Pallas Triton kernel: one program per (row, block of channels).

Each program keeps its channels' state `h [block_d, N]` in registers and walks the row's T
tokens in order (`fori_loop`): h = keep_t * exp(dt_t A) * h + dt_t x_t B_t, y_t = h C_t + D x_t,
reading one token's x/dt (`[block_d]`) and B/C (`[N]`) per step, so memory traffic is one pass
over the inputs and the `[T, D, N]` states the associative-scan reference materialises never
exist. `keep` is 0 where a sequence starts fresh (packed rows); the wrapper (`ops.py`) turns
padding into identity steps (dt = x = 0) beforehand, exactly as the reference does.

The time loop is sequential: parallelism comes from rows x channel blocks (Mamba-130m: D =
1536 channels, 24 blocks of 64 per row). Forward only; `ops.py` differentiates through the
reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK_D = 64  # channels per program


def supported(channels: int, state_size: int) -> bool:
    """Triton tiles need power-of-two sides: whole channel blocks and a power-of-two state size."""
    return channels % BLOCK_D == 0 and state_size >= 1 and state_size & (state_size - 1) == 0


def _kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, keep_ref, y_ref, *, length: int):
    row, block = pl.program_id(0), pl.program_id(1)
    channels = pl.ds(block * BLOCK_D, BLOCK_D)
    f32 = jnp.float32
    A = a_ref[channels, :].astype(f32)  # [block_d, N]
    D = d_ref[channels].astype(f32)

    def step(t, h):
        x = x_ref[row, t, channels].astype(f32)
        dt = dt_ref[row, t, channels].astype(f32)
        B = b_ref[row, t, :].astype(f32)
        C = c_ref[row, t, :].astype(f32)
        keep = keep_ref[row, t]
        h = h * (jnp.exp(dt[:, None] * A) * keep) + (dt * x)[:, None] * B[None, :]
        y_ref[row, t, channels] = (jnp.sum(h * C[None, :], axis=1) + D * x).astype(y_ref.dtype)
        return h

    lax.fori_loop(0, length, step, jnp.zeros(A.shape, f32))


@functools.partial(jax.jit, static_argnames=("interpret",))
def selective_scan(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                   keep: jax.Array, *, interpret: bool = False) -> jax.Array:
    """`x, dt [B, T, D]`, `A [D, N]`, `B, C [B, T, N]`, `D [D]`, `keep [B, T]` float32 -> `y [B, T, D]` float32."""
    rows, length, channels = x.shape
    state = A.shape[1]
    if not supported(channels, state):
        raise ValueError(f"selective_scan kernel: {channels} channels (multiple of {BLOCK_D}) and state {state} "
                         "(a power of two) needed")
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))  # noqa: E731
    args = (x, dt, A, B, C, D, keep)
    return pl.pallas_call(
        functools.partial(_kernel, length=length),
        grid=(rows, channels // BLOCK_D),
        in_specs=[whole(a.shape) for a in args],
        out_specs=whole(x.shape),
        out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=f"selective_scan_d{BLOCK_D}_n{state}",
    )(*args)
