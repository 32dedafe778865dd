"""The RG-LRU's linear recurrence as a Pallas Triton kernel: one program per (row, block of channels).

Each program keeps its channels' state `h [block_d]` in registers and walks the row's T tokens
in order (`fori_loop`): h = decay_t * h + inputs_t, writing h after every token. Memory traffic
is one read of decay and inputs and one write of the states; the associative-scan reference
moves its `[B, T, D]` operands log2(T) times. The operands come from
`reference.scan_operands` (padding an identity step, run starts cut), so the kernel knows
nothing of segments. `reverse=True` walks from the last token to the first: the backward pass
of the same recurrence (`ops.py`).

From states (`rglru_from_states`, the serving path: forward only): the runs' ids come in instead
of cut decays; where the id changes, the program writes the state of the run that ended (one of
the first R) and reads the next run's initial state (`[B, R, D]`, zeros past R). The per-token
update is the same (`_advance`).

The time loop is sequential: parallelism comes from rows x channel blocks (RecurrentGemma-2B:
lru_width 2560, 80 blocks of 32 per row).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.whole_arrays import call_on_whole_arrays

BLOCK_D = 32  # channels per program: one warp, one float32 per thread


def supported(channels: int) -> bool:
    """Triton tiles need power-of-two sides: whole channel blocks."""
    return channels % BLOCK_D == 0


def _check(channels: int) -> None:
    if not supported(channels):
        raise ValueError(f"linear_scan kernel: {channels} channels, a multiple of {BLOCK_D} needed")


def _program():
    """This program's row and slice of channels."""
    return pl.program_id(0), pl.ds(pl.program_id(1) * BLOCK_D, BLOCK_D)


def _advance(h, decay_ref, inputs_ref, states_ref, row, t, channels):
    """One token: h = decay_t * h + inputs_t, written as the state after it; returns h."""
    h = decay_ref[row, t, channels] * h + inputs_ref[row, t, channels]
    states_ref[row, t, channels] = h
    return h


def _kernel(decay_ref, inputs_ref, states_ref, *, length: int, reverse: bool):
    row, channels = _program()

    def step(i, h):
        t = length - 1 - i if reverse else i
        return _advance(h, decay_ref, inputs_ref, states_ref, row, t, channels)

    lax.fori_loop(0, length, step, jnp.zeros((BLOCK_D,), jnp.float32))


def _states_kernel(decay_ref, inputs_ref, runs_ref, initial_ref, states_ref, finals_ref, *, length: int):
    """The forward from per-run initial states: h = 0 while the run id is -1 (before the row's first real token);
    where the id changes, the state after the run that ended is written (one of the first R) and the new run's
    initial state read (zeros past R); the row's last run writes its state at the end."""
    row, channels = _program()
    num_runs = initial_ref.shape[1]

    def finish(run, h):
        @pl.when((run >= 0) & (run < num_runs))
        def _():
            finals_ref[row, run, channels] = h

    def enter(h, run, r):
        finish(run, h)
        initial = initial_ref[row, jnp.minimum(r, num_runs - 1), channels].astype(jnp.float32)
        return jnp.where(r < num_runs, initial, 0.0)

    def step(t, carry):
        h, run = carry
        r = runs_ref[row, t]
        h = lax.cond(r == run, lambda: h, lambda: enter(h, run, r))
        return _advance(h, decay_ref, inputs_ref, states_ref, row, t, channels), r

    h, run = lax.fori_loop(0, length, step, (jnp.zeros((BLOCK_D,), jnp.float32), jnp.int32(-1)))
    finish(run, h)


def _call(kernel, args, outputs, name: str, interpret: bool):
    rows, _, channels = args[0].shape
    return call_on_whole_arrays(kernel, args, outputs, (rows, channels // BLOCK_D), name, 1, interpret)


@functools.partial(jax.jit, static_argnames=("reverse", "interpret"))
def linear_scan(decay: jax.Array, inputs: jax.Array, *, reverse: bool = False, interpret: bool = False) -> jax.Array:
    """`decay, inputs [B, T, D]` float32 -> states `[B, T, D]` float32 (h = 0 before the first step)."""
    _check(decay.shape[-1])
    f32 = jnp.float32
    return _call(functools.partial(_kernel, length=decay.shape[1], reverse=reverse),
                 (decay.astype(f32), inputs.astype(f32)), [jax.ShapeDtypeStruct(decay.shape, f32)],
                 f"rglru_scan_d{BLOCK_D}{'_reverse' if reverse else ''}", interpret)[0]


@functools.partial(jax.jit, static_argnames=("interpret",))
def rglru_from_states(decay: jax.Array, inputs: jax.Array, runs: jax.Array, initial: jax.Array, *,
                      interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`decay, inputs [B, T, D]` (padding already an identity step), `runs [B, T]` int32 (`reference.run_ids`, -1
    before the row's first real token), run r starting from `initial [B, R, D]` (zeros past R) -> (the states after
    every token `[B, T, D]`, after each of the R runs `[B, R, D]`; a run without tokens keeps its initial state),
    float32: `reference.linear_scan`'s contract. Forward only (the serving path)."""
    rows, length, channels = decay.shape
    _check(channels)
    if initial.ndim != 3 or initial.shape[0] != rows or initial.shape[1] < 1 or initial.shape[2] != channels:
        raise ValueError(f"rglru_from_states kernel: initial states {initial.shape} do not fit "
                         f"[{rows}, R >= 1, {channels}]")
    f32 = jnp.float32
    outputs = [jax.ShapeDtypeStruct(decay.shape, f32), jax.ShapeDtypeStruct(initial.shape, f32)]
    states, finals = _call(functools.partial(_states_kernel, length=length),
                           (decay.astype(f32), inputs.astype(f32), runs.astype(jnp.int32), initial), outputs,
                           f"rglru_from_states_d{BLOCK_D}", interpret)
    # Runs past the row's last hold no token: their states pass through (the kernel writes no others).
    present = jnp.arange(initial.shape[1])[None, :] <= jnp.max(runs, axis=1)[:, None]
    return states, jnp.where(present[..., None], finals, initial.astype(f32))
