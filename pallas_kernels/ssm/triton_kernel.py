"""Mamba's selective scan as a Pallas Triton kernel: one program per (row, block of channels).

Each program keeps its channels' state `h [block_d, N]` in registers and walks the row's T
tokens in order (`fori_loop`): h = keep_t * exp(dt_t A) * h + dt_t x_t B_t, y_t = h C_t + D x_t,
reading one token's x/dt (`[block_d]`) and B/C (`[N]`) per step, so memory traffic is one pass
over the inputs and the `[T, D, N]` states the associative-scan reference materialises never
exist. `keep` is 0 where a sequence starts fresh (packed rows); the wrapper (`ops.py`) turns
padding into identity steps (dt = x = 0) beforehand, exactly as the reference does.

From states (`selective_scan_from_states`, the serving path: forward only): the runs' ids come in
instead of `keep`; where the id changes, the program writes the state of the run that ended (one
of the first R) and reads the next run's initial state (`[B, R, D, N]`, zeros past R).

The time loop is sequential: parallelism comes from rows x channel blocks (Mamba-130m: D =
1536 channels, 24 blocks of 64 per row).

Backward (`selective_scan_vjp`, a `custom_vjp` over the forward kernel): the forward kernel runs
again and writes the state after every token (`[B, T, D, N]` float32, alive only inside the
backward pass), then a second kernel walks time in reverse carrying the adjoint g of the state:
g_t = dy_t C_t + keep_{t+1} exp(dt_{t+1} A) g_{t+1}; from g_t and the stored h_{t-1}, h_t it
writes dx, ddt per token, dB and dC per token and channel block (summed over blocks outside), and
accumulates dA per row in registers. dD = sum dy x needs no scan and is formed outside.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.whole_arrays import call_on_whole_arrays

BLOCK_D = 64  # channels per program


def supported(channels: int, state_size: int) -> bool:
    """Triton tiles need power-of-two sides: whole channel blocks and a power-of-two state size."""
    return channels % BLOCK_D == 0 and state_size >= 1 and state_size & (state_size - 1) == 0


def _program(a_ref, d_ref):
    """This program's row, block of channels (index and slice), and their A `[block_d, N]` and D `[block_d]`
    (float32)."""
    block = pl.program_id(1)
    channels = pl.ds(block * BLOCK_D, BLOCK_D)
    return pl.program_id(0), block, channels, a_ref[channels, :].astype(jnp.float32), d_ref[channels].astype(jnp.float32)


def _token(x_ref, dt_ref, b_ref, c_ref, keep_ref, row, t, channels):
    """One token's inputs for a block of channels, float32: x, dt `[block_d]`, B, C `[N]`, and its entry of
    `keep_ref` (keep, or the run id in `_states_kernel`)."""
    f32 = jnp.float32
    return (x_ref[row, t, channels].astype(f32), dt_ref[row, t, channels].astype(f32), b_ref[row, t, :].astype(f32),
            c_ref[row, t, :].astype(f32), keep_ref[row, t])


def _advance(h, x, dt, A, B, C, D, y_ref, row, t, channels):
    """One token: h = exp(dt A) h + dt x B, and y = h C + D x written; returns h."""
    h = h * jnp.exp(dt[:, None] * A) + (dt * x)[:, None] * B[None, :]
    y_ref[row, t, channels] = (jnp.sum(h * C[None, :], axis=1) + D * x).astype(y_ref.dtype)
    return h


def _kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, keep_ref, y_ref, *states_ref, length: int):
    """The forward; with `states_ref`, also the state after every token."""
    row, block, channels, A, D = _program(a_ref, d_ref)
    f32 = jnp.float32

    def step(t, h):
        x, dt, B, C, keep = _token(x_ref, dt_ref, b_ref, c_ref, keep_ref, row, t, channels)
        h = _advance(h * keep, x, dt, A, B, C, D, y_ref, row, t, channels)
        if states_ref:
            states_ref[0][row, t, channels, :] = h
        return h

    lax.fori_loop(0, length, step, jnp.zeros(A.shape, f32))


def _states_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, runs_ref, initial_ref, y_ref, finals_ref, *,
                   length: int):
    """The forward from per-run initial states (`[B, R, D, N]`; zeros for runs past R): where the run id
    changes, the state after the run that ended is written (one of the first R) and the new run's initial
    state read; the row's last run writes its state at the end."""
    row, block, channels, A, D = _program(a_ref, d_ref)
    num_runs = initial_ref.shape[1]

    def initial(r):
        return jnp.where(r < num_runs, initial_ref[row, jnp.minimum(r, num_runs - 1), channels, :].astype(
            jnp.float32), 0.0)

    def finish(r, h):
        @pl.when(r < num_runs)
        def _():
            finals_ref[row, r, channels, :] = h

    def next_run(h, run, r):
        finish(run, h)
        return initial(r)

    def step(t, carry):
        h, run = carry
        x, dt, B, C, r = _token(x_ref, dt_ref, b_ref, c_ref, runs_ref, row, t, channels)
        h = lax.cond(r == run, lambda: h, lambda: next_run(h, run, r))
        return _advance(h, x, dt, A, B, C, D, y_ref, row, t, channels), r

    h, run = lax.fori_loop(0, length, step, (initial(jnp.int32(0)), jnp.int32(0)))
    finish(run, h)


def _backward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, keep_ref, states_ref, dy_ref,
                     dx_ref, ddt_ref, db_ref, dc_ref, da_ref, *, length: int):
    """Reverse time, carrying g (the adjoint of the state after the token), as in the module docstring."""
    row, block, channels, A, D = _program(a_ref, d_ref)
    f32 = jnp.float32

    def step(i, carry):
        g, dA = carry  # g: the adjoint reaching h_t from later tokens
        t = length - 1 - i
        x, dt, B, C, keep = _token(x_ref, dt_ref, b_ref, c_ref, keep_ref, row, t, channels)
        dy = dy_ref[row, t, channels].astype(f32)
        h = states_ref[row, t, channels, :]
        h_prev = states_ref[row, jnp.maximum(t - 1, 0), channels, :] * (t > 0).astype(f32)
        g = g + dy[:, None] * C[None, :]
        decay = jnp.exp(dt[:, None] * A) * keep
        carried = g * decay * h_prev  # d/d(log-decay) of the state's carried part
        dx_ref[row, t, channels] = dt * jnp.sum(g * B[None, :], axis=1) + D * dy
        ddt_ref[row, t, channels] = jnp.sum(g * (x[:, None] * B[None, :]) + carried * A, axis=1)
        db_ref[row, t, block, :] = jnp.sum(g * (dt * x)[:, None], axis=0)
        dc_ref[row, t, block, :] = jnp.sum(h * dy[:, None], axis=0)
        return g * decay, dA + carried * dt[:, None]

    zeros = jnp.zeros(A.shape, f32)
    _, dA = lax.fori_loop(0, length, step, (zeros, zeros))
    da_ref[row, channels, :] = dA


def _call(kernel, args, outputs, name: str, interpret: bool):
    rows, _, channels = args[0].shape
    return call_on_whole_arrays(kernel, args, outputs, (rows, channels // BLOCK_D), name, 4, interpret)


def _check(channels: int, state: int) -> None:
    if not supported(channels, state):
        raise ValueError(f"selective_scan kernel: {channels} channels (multiple of {BLOCK_D}) and state {state} "
                         "(a power of two) needed")


def _forward(x, dt, A, B, C, D, keep, *, interpret: bool, states: bool):
    rows, length, channels = x.shape
    state = A.shape[1]
    _check(channels, state)
    outputs = [jax.ShapeDtypeStruct(x.shape, jnp.float32)]
    if states:
        outputs.append(jax.ShapeDtypeStruct((rows, length, channels, state), jnp.float32))
    return _call(functools.partial(_kernel, length=length), (x, dt, A, B, C, D, keep), outputs,
                 f"selective_scan{'_states' if states else ''}_d{BLOCK_D}_n{state}", interpret)


@functools.partial(jax.jit, static_argnames=("interpret",))
def selective_scan(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                   keep: jax.Array, *, interpret: bool = False) -> jax.Array:
    """`x, dt [B, T, D]`, `A [D, N]`, `B, C [B, T, N]`, `D [D]`, `keep [B, T]` float32 -> `y [B, T, D]` float32."""
    return _forward(x, dt, A, B, C, D, keep, interpret=interpret, states=False)[0]


@functools.partial(jax.jit, static_argnames=("interpret",))
def selective_scan_from_states(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                               runs: jax.Array, initial: jax.Array, *,
                               interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`selective_scan` with run r (`runs [B, T]` int32, `reference.run_ids`) starting from `initial [B, R, D, N]`
    (zeros past R) -> (`y`, the states after each of the R runs `[B, R, D, N]` float32; a run without tokens
    keeps its initial state), `reference.selective_scan`'s contract. Forward only (the serving path)."""
    rows, length, channels = x.shape
    state = A.shape[1]
    _check(channels, state)
    if initial.ndim != 4 or initial.shape[0] != rows or initial.shape[1] < 1 or initial.shape[2:] != (channels, state):
        raise ValueError(f"selective_scan kernel: initial states {initial.shape} do not fit "
                         f"[{rows}, R >= 1, {channels}, {state}]")
    outputs = [jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(initial.shape, jnp.float32)]
    y, finals = _call(functools.partial(_states_kernel, length=length), (x, dt, A, B, C, D, runs, initial), outputs,
                      f"selective_scan_from_states_d{BLOCK_D}_n{state}", interpret)
    # Runs past the row's last hold no token: their states pass through (the kernel writes no others).
    present = jnp.arange(initial.shape[1])[None, :] <= jnp.max(runs, axis=1)[:, None]
    return y, jnp.where(present[..., None, None], finals, initial.astype(jnp.float32))


def selective_scan_backward(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                            keep: jax.Array, dy: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, ...]:
    """The gradients (dx, ddt, dA, dB, dC, dD) float32 of `sum(dy * selective_scan(...))`."""
    rows, length, channels = x.shape
    state, blocks = A.shape[1], channels // BLOCK_D
    _, states = _forward(x, dt, A, B, C, D, keep, interpret=interpret, states=True)
    f32 = jnp.float32
    outputs = [jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct(x.shape, f32),
               jax.ShapeDtypeStruct((rows, length, blocks, state), f32),
               jax.ShapeDtypeStruct((rows, length, blocks, state), f32),
               jax.ShapeDtypeStruct((rows, channels, state), f32)]
    dx, ddt, dB, dC, dA = _call(functools.partial(_backward_kernel, length=length),
                                (x, dt, A, B, C, D, keep, states, dy.astype(f32)), outputs,
                                f"selective_scan_bwd_d{BLOCK_D}_n{state}", interpret)
    dD = jnp.einsum("btd,btd->d", dy.astype(f32), x.astype(f32))
    return dx, ddt, dA.sum(0), dB.sum(2), dC.sum(2), dD


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def selective_scan_vjp(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                       keep: jax.Array, interpret: bool = False) -> jax.Array:
    """`selective_scan`, differentiable through `selective_scan_backward` (not through `keep`)."""
    return selective_scan(x, dt, A, B, C, D, keep, interpret=interpret)


def _vjp_forward(x, dt, A, B, C, D, keep, interpret):
    return selective_scan_vjp(x, dt, A, B, C, D, keep, interpret), (x, dt, A, B, C, D, keep)


def _vjp_backward(interpret, inputs, dy):
    grads = selective_scan_backward(*inputs, dy, interpret=interpret)
    return (*(g.astype(a.dtype) for g, a in zip(grads, inputs)), jnp.zeros_like(inputs[-1]))


selective_scan_vjp.defvjp(_vjp_forward, _vjp_backward)
