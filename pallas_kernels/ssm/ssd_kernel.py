"""Mamba-2's chunked SSD as Pallas Triton kernels, forward and backward: one program per (row, head,
block of the head dim).

Each program walks its row's chunks of L tokens, keeping its slice of the head's state `h [N, block_p]`
in registers (a block of 32 of the head dim keeps it from spilling; the `[L, L]` scores are recomputed
per block), and per chunk does what `reference.ssd_chunked` does for it. With a = dt A the log decay,
c its in-chunk cumulative sum (a masked row sum over an `[L, L]` tile), W_ij = exp(c_i - c_j) between
tokens i >= j of one run, E_i = exp(c_i) for tokens continuing the carried run (0 for a run that starts
in the chunk, which starts from zeros), e_j = exp(c_L - c_j) for tokens of the chunk's last run and
K = exp(c_L) when that run is the carried one (else 0):

    y = ((C B^T) * W) (dt x) + E (C h) + D x,    h <- K h + (B * e dt)^T x.

The state entering the first chunk is the row's initial state, carried by its first run (run 0; zeros
for dense training rows), and the state leaving the last is the state after the row's last real token (padding is
an identity step), as `reference.ssd_chunked` returns it: a serving prefill chunk continues its slot's
state and hands back the next.

From states (`ssd_from_states`, the serving path: forward only): run r starts from its initial state
(`[B, R, H, P, N]`, zeros past R) and the states after the first R runs come back. A chunk's tokens then read
several entering states (the carried one, and that of every run starting in the chunk), so the program loops
over the chunk's runs, from the carried one to its last: each reads its entering state (a conditional load
where it starts in the chunk) through an E, e and K of its own (the decay masked to the run) while W, which
never mixes runs, is shared; a run ending in the chunk writes its state. The per-run states travel in their
`[P, N]` layout (transposed in the kernel: no pass over them outside).

Backward (`ssd_chunked_vjp`, a `custom_vjp`), two kernels on the same grid, in chunks of their own
(`BACKWARD_CHUNK`): the forward runs again writing only the state entering every chunk (`[B, H, Q, N, P]`
float32, alive only inside the backward pass); a second kernel walks the chunks in reverse carrying dh, the
adjoint of the state leaving the chunk (it needs no state: the recurrence is linear in h; it starts as the
final state's adjoint and ends as the initial state's), and with S = (C B^T) * W and dy the output's adjoint
forms per chunk

    dS = dy (dt x)^T,  d(dt x) = S^T dy,  dC = (dS * W) B + E (dy h^T),  dB = (dS * W)^T C + e dt (x dh^T),
    dx = D dy + dt d(dt x) + (B * e dt) dh,   dh <- K dh + (C * E)^T dy,

then the chain through W, E, e and K to the cumulative log decay (dS * S gives W's part), to a by a
reverse cumulative sum, and to dt and A. Every gradient but dx is a sum over head-dim blocks (and, for
dB and dC, over the heads of a group): the kernel writes per-block partials and the wrapper sums them;
dD = sum dy x needs no scan and is formed outside.

Run ids (`reference.run_ids`, nondecreasing along a row) come in precomputed; padding is an identity
step (dt = x = 0), as in the reference, and the last chunk is padded the same way. The chunk length is
the kernels' own: the result does not depend on it. States travel as `[B, H, N, P]` (the kernels'
`h [N, block_p]` slices; the wrappers transpose `reference.ssd_chunked`'s `[B, H, P, N]`). Matmuls take
the tensor cores' float32 mode (tf32 on a GPU: relative error near 3e-4, as Mamba's own Triton kernels;
exact in interpret mode).

Glossary: B rows, T tokens, H heads, P head dim, G groups of B/C, N state size, L chunk length,
Q chunks, NP head-dim blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.whole_arrays import call_on_whole_arrays

# At N = 128 (Mamba-2, Granite 4.0) the forward spills registers on sm_90 at chunks of 64, the backward
# kernel at 32 (255 registers, 8 warps; `tests/pallas_kernels/test_gpu_lowering.py`).
CHUNK = 32  # tokens per chunk, forward
BACKWARD_CHUNK = 16  # tokens per chunk, both backward kernels
BLOCK_P = 32  # head-dim features per program
WARPS = 8  # per program, every kernel


def supported(head_dim: int, state_size: int) -> bool:
    """Triton matmul tiles: whole blocks of the head dim, a power-of-two state size of at least 16."""
    return head_dim % BLOCK_P == 0 and state_size >= 16 and state_size & (state_size - 1) == 0


def _check(head_dim: int, state_size: int) -> None:
    if not supported(head_dim, state_size):
        raise ValueError(f"ssd_chunked kernel: head dim {head_dim} (a multiple of {BLOCK_P}) and state {state_size} "
                         "(a power of two >= 16) needed")


def _chunk_terms(dt, A, runs, carried_run, chunk: int) -> dict:
    """The chunk's decay terms (module docstring), float32; `carried_run` is the run of the state
    entering the chunk."""
    i = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    j = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    causal = j <= i
    log_decay = dt * A
    cum = jnp.sum(jnp.where(causal, log_decay[None, :], 0.0), axis=1)  # [L] inclusive
    same = causal & (runs[:, None] == runs[None, :])
    weights = jnp.where(same, jnp.exp(jnp.where(same, cum[:, None] - cum[None, :], 0.0)), 0.0)  # W
    continues = jnp.where(runs == carried_run, jnp.exp(cum), 0.0)  # E
    last_run, total = jnp.max(runs), jnp.sum(log_decay)
    to_end = jnp.where(runs == last_run, jnp.exp(total - cum), 0.0)  # e
    keep = jnp.where(last_run == carried_run, jnp.exp(total), 0.0)  # K
    last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    return dict(causal=causal, last=last, log_decay=log_decay, cum=cum, weights=weights, continues=continues,
                last_run=last_run, to_end=to_end, keep=keep)


def _run_decay(log_decay, cum, runs, run) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For run `run` of the chunk, from the state it enters the chunk with (carried, or its initial state where it
    starts here): E to each of its tokens, e from each to its last token in the chunk, and K to that token (zeros
    off the run). Run ids never decrease along the chunk: the tokens before the run's are those of earlier runs."""
    in_run = runs == run
    before, total = jnp.sum(jnp.where(runs < run, log_decay, 0.0)), jnp.sum(jnp.where(in_run, log_decay, 0.0))
    return (jnp.where(in_run, jnp.exp(cum - before), 0.0), jnp.where(in_run, jnp.exp(before + total - cum), 0.0),
            jnp.exp(total))


def _within_chunk(t: dict, x, dt, B, C, D):
    """The outputs' part from the chunk's own tokens: ((C B^T) * W) (dt x) + D x."""
    return jnp.dot(jnp.dot(C, B.T) * t["weights"], dt[:, None] * x) + D * x


def _read_state(C, h, continues):
    """The outputs' part from an entering state h: E (C h)."""
    return jnp.dot(C, h) * continues[:, None]


def _leaving(keep, to_end, dt, B, x, h):
    """The state after a run's last token in the chunk: K h + (B * e dt)^T x."""
    return keep * h + jnp.dot((B * (to_end * dt)[:, None]).T, x)


def _program(a_ref, d_ref, heads_per_group: int):
    """This program's row, head, its group, block of the head dim (index and slice), A and D (float32)."""
    row, head, block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    f32 = jnp.float32
    return (row, head, head // heads_per_group, block, pl.ds(block * BLOCK_P, BLOCK_P), a_ref[head].astype(f32),
            d_ref[head].astype(f32))


def _chunk_inputs(x_ref, dt_ref, b_ref, c_ref, runs_ref, row, head, group, features, tokens):
    """One chunk's x `[L, block_p]`, dt `[L]`, B, C `[L, N]` (float32) and runs `[L]`."""
    f32 = jnp.float32
    return (x_ref[row, tokens, head, features].astype(f32), dt_ref[row, tokens, head].astype(f32),
            b_ref[row, tokens, group, :].astype(f32), c_ref[row, tokens, group, :].astype(f32),
            runs_ref[row, tokens])


def _forward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, runs_ref, initial_ref, out_ref, final_ref, *,
                    chunks: int, chunk: int, heads_per_group: int, states: bool):
    """The forward from the row's initial state: `out_ref` takes y, or with `states` (the backward's first
    pass) only the state entering every chunk; `final_ref` the state leaving the last."""
    row, head, group, _, features, A, D = _program(a_ref, d_ref, heads_per_group)

    def step(q, carry):
        h, carried_run = carry  # state entering the chunk [N, block_p], and the run it belongs to
        tokens = pl.ds(q * chunk, chunk)
        x, dt, B, C, runs = _chunk_inputs(x_ref, dt_ref, b_ref, c_ref, runs_ref, row, head, group, features, tokens)
        t = _chunk_terms(dt, A, runs, carried_run, chunk)
        if states:
            out_ref[row, head, q, :, features] = h
        else:
            y = _within_chunk(t, x, dt, B, C, D) + _read_state(C, h, t["continues"])
            out_ref[row, tokens, head, features] = y.astype(out_ref.dtype)
        return _leaving(t["keep"], t["to_end"], dt, B, x, h), t["last_run"]

    h, _ = lax.fori_loop(0, chunks, step, (initial_ref[row, head, :, features], jnp.int32(0)))
    final_ref[row, head, :, features] = h


def _forward_states_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, runs_ref, initial_ref, out_ref, finals_ref, *,
                           chunks: int, chunk: int, heads_per_group: int):
    """The forward from per-run initial states (`[B, R, H, P, N]`, zeros past R), writing the state after each of
    the first R runs that has a token (`finals_ref`, same layout). Per chunk, every run in it reads its entering
    state (the carried one, or its initial state where it starts in the chunk) through its own E (`_run_decay`;
    W is shared: runs never mix in it), and a run that ends in the chunk writes its final state there."""
    row, head, group, _, features, A, D = _program(a_ref, d_ref, heads_per_group)
    num_runs = initial_ref.shape[1]

    def initial(r):  # [N, block_p]
        return jnp.where(r < num_runs, initial_ref[row, jnp.minimum(r, num_runs - 1), head, features, :].astype(
            jnp.float32).T, 0.0)

    def finish(r, h):
        @pl.when(r < num_runs)
        def _():
            finals_ref[row, r, head, features, :] = h.T

    def step(q, carry):
        h, carried_run = carry
        tokens = pl.ds(q * chunk, chunk)
        x, dt, B, C, runs = _chunk_inputs(x_ref, dt_ref, b_ref, c_ref, runs_ref, row, head, group, features, tokens)
        t = _chunk_terms(dt, A, runs, carried_run, chunk)
        last_run = t["last_run"]

        def per_run(r, acc):
            y, h = acc  # the outputs so far [L, block_p]; the state after run r - 1 (the carried one at first)
            h = lax.cond(r == carried_run, lambda: h, lambda: initial(r))  # entering run r
            continues, to_end, keep = _run_decay(t["log_decay"], t["cum"], runs, r)
            y = y + _read_state(C, h, continues)
            h = _leaving(keep, to_end, dt, B, x, h)

            @pl.when(r < last_run)
            def _():
                finish(r, h)

            return y, h

        # From the carried run: it may have ended at the chunk edge, with no token here.
        y, h = lax.fori_loop(carried_run, last_run + 1, per_run, (_within_chunk(t, x, dt, B, C, D), h))
        out_ref[row, tokens, head, features] = y.astype(out_ref.dtype)
        return h, last_run

    h, last_run = lax.fori_loop(0, chunks, step, (initial(jnp.int32(0)), jnp.int32(0)))
    finish(last_run, h)


def _backward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, runs_ref, initial_ref, states_ref, dy_ref,
                     d_final_ref, dx_ref, ddt_ref, da_ref, db_ref, dc_ref, d_initial_ref, *, chunks: int, chunk: int,
                     heads_per_group: int):
    """Reverse over chunks carrying dh from the final state's adjoint, every chunk's gradients from the state
    entering it (module docstring); `da_ref` takes dt * d(a) per token, whose sum is dA."""
    row, head, group, block, features, A, D = _program(a_ref, d_ref, heads_per_group)
    f32 = jnp.float32

    def step(r, dh):  # dh: the adjoint of the state leaving the chunk [N, block_p]
        q = chunks - 1 - r
        tokens = pl.ds(q * chunk, chunk)
        x, dt, B, C, runs = _chunk_inputs(x_ref, dt_ref, b_ref, c_ref, runs_ref, row, head, group, features, tokens)
        carried_run = jnp.where(q > 0, runs_ref[row, jnp.maximum(q * chunk - 1, 0)], 0)
        t = _chunk_terms(dt, A, runs, carried_run, chunk)
        weights, continues, to_end, keep = (t[n] for n in ("weights", "continues", "to_end", "keep"))
        h = states_ref[row, head, q, :, features]
        dy = dy_ref[row, tokens, head, features].astype(f32)
        u = dt[:, None] * x
        scores = jnp.dot(C, B.T) * weights  # S
        d_scores = jnp.dot(dy, u.T)  # dS
        du = jnp.dot(scores.T, dy)
        d_cb = d_scores * weights  # d(C B^T)
        writes = to_end * dt  # e dt
        dy_h = jnp.dot(dy, h.T)  # [L, N]
        x_dh = jnp.dot(x, dh.T)  # [L, N]
        dc_ref[row, tokens, head, block, :] = jnp.dot(d_cb, B) + continues[:, None] * dy_h
        db_ref[row, tokens, head, block, :] = jnp.dot(d_cb.T, C) + writes[:, None] * x_dh
        dx_ref[row, tokens, head, features] = D * dy + dt[:, None] * du + jnp.dot(B * writes[:, None], dh)
        d_writes = jnp.sum(B * x_dh, axis=1)
        d_to_end = d_writes * writes  # d(e) * e
        # Through W (dS * S = d(W) * W), E, e and K to the cumulative log decay, then to a (i >= j).
        d_exp = d_scores * scores
        d_cum = jnp.sum(d_exp, axis=1) - jnp.sum(d_exp, axis=0) + jnp.sum(C * dy_h, axis=1) * continues - d_to_end
        d_cum += jnp.where(t["last"], jnp.sum(d_to_end) + jnp.sum(h * dh) * keep, 0.0)
        d_log_decay = jnp.sum(jnp.where(t["causal"], d_cum[:, None], 0.0), axis=0)
        ddt_ref[row, tokens, head, block] = jnp.sum(x * du, axis=1) + d_writes * to_end + A * d_log_decay
        da_ref[row, tokens, head, block] = dt * d_log_decay
        return keep * dh + jnp.dot((C * continues[:, None]).T, dy)

    d_initial_ref[row, head, :, features] = lax.fori_loop(0, chunks, step, d_final_ref[row, head, :, features])


def _call(kernel, args, outputs, name: str, interpret: bool):
    rows, _, heads, head_dim = args[0].shape
    return call_on_whole_arrays(kernel, args, outputs, (rows, heads, head_dim // BLOCK_P), name, WARPS, interpret)


def _check_initial(x: jax.Array, B: jax.Array, initial: jax.Array) -> None:
    want = (x.shape[0], x.shape[2], x.shape[3], B.shape[3])
    if initial.shape != want:
        raise ValueError(f"ssd_chunked kernel: initial state of shape {initial.shape}, expected {want} [B, H, P, N]")


def _padded(x, dt, B, C, runs, chunk: int):
    """The shapes checked, and x, dt, B, C, runs padded to whole chunks with identity steps in the row's last run."""
    _check(x.shape[3], B.shape[3])
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"ssd_chunked kernel: chunk length {chunk} must be a power of two")
    pad = (-x.shape[1]) % chunk
    if pad:
        x, dt, B, C = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (x, dt, B, C))
        runs = jnp.pad(runs, [(0, 0), (0, pad)], mode="edge")
    return x, dt, B, C, runs.astype(jnp.int32)


def _forward(x, dt, A, B, C, D, runs, initial, *, chunk: int, interpret: bool, states: bool):
    """(the inputs padded to whole chunks with identity steps in the row's last run, the initial states as
    `[B, H, N, P]`; y or the entering states; the final states `[B, H, N, P]`)."""
    rows, _, heads, head_dim = x.shape
    groups, state = B.shape[2], B.shape[3]
    x, dt, B, C, runs = _padded(x, dt, B, C, runs, chunk)
    _check_initial(x, B, initial)
    args = (x, dt, A, B, C, D, runs, jnp.swapaxes(initial.astype(jnp.float32), 2, 3))
    chunks = x.shape[1] // chunk
    if states:
        output, name = (rows, heads, chunks, state, head_dim), f"ssd_states_l{chunk}_p{BLOCK_P}_n{state}"
    else:
        output, name = x.shape, f"ssd_chunked_l{chunk}_p{head_dim}_n{state}"
    kernel = functools.partial(_forward_kernel, chunks=chunks, chunk=chunk, heads_per_group=heads // groups,
                               states=states)
    outputs = [jax.ShapeDtypeStruct(output, jnp.float32), jax.ShapeDtypeStruct(args[-1].shape, jnp.float32)]
    out, final = _call(kernel, args, outputs, name, interpret)
    return args, out, final


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def ssd_chunked(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                runs: jax.Array, initial: jax.Array, *, chunk: int = CHUNK,
                interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`x [B, T, H, P]`, `dt [B, T, H]` (zero on padding, as x), `A, D [H]`, `B, C [B, T, G, N]`, `runs [B, T]`
    int32, `initial [B, H, P, N]` (the state of each row's first run) -> (`y [B, T, H, P]`, the state after
    each row's last token `[B, H, P, N]`), float32."""
    _, y, final = _forward(x, dt, A, B, C, D, runs, initial, chunk=chunk, interpret=interpret, states=False)
    return y[:, : x.shape[1]], jnp.swapaxes(final, 2, 3)


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def ssd_from_states(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                    runs: jax.Array, initial: jax.Array, *, chunk: int = CHUNK,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`ssd_chunked` with run r starting from `initial [B, R, H, P, N]` (zeros for runs past R) -> (`y`, the states
    after each of the R runs `[B, R, H, P, N]` float32; a run without tokens keeps its initial state),
    `reference.ssd_chunked_states`' contract. Forward only (the serving path)."""
    rows, length, heads, head_dim = x.shape
    state = B.shape[3]
    if initial.ndim != 5 or initial.shape[0] != rows or initial.shape[1] < 1 or initial.shape[2:] != (
            heads, head_dim, state):
        raise ValueError(f"ssd_chunked kernel: initial states {initial.shape} do not fit "
                         f"[{rows}, R >= 1, {heads}, {head_dim}, {state}]")
    x, dt, B, C, runs = _padded(x, dt, B, C, runs, chunk)
    outputs = [jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(initial.shape, jnp.float32)]
    kernel = functools.partial(_forward_states_kernel, chunks=x.shape[1] // chunk, chunk=chunk,
                               heads_per_group=heads // B.shape[2])
    name = f"ssd_from_states_l{chunk}_p{BLOCK_P}_n{state}"
    y, finals = _call(kernel, (x, dt, A, B, C, D, runs, initial), outputs, name, interpret)
    # Runs past the row's last hold no token: their states pass through (the kernel writes no others).
    present = jnp.arange(initial.shape[1])[None, :] <= jnp.max(runs, axis=1)[:, None]
    return y[:, :length], jnp.where(present[..., None, None, None], finals, initial.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def ssd_chunked_backward(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                         runs: jax.Array, initial: jax.Array, dy: jax.Array, d_final: jax.Array, *,
                         chunk: int = BACKWARD_CHUNK, interpret: bool = False) -> tuple[jax.Array, ...]:
    """The gradients (dx, ddt, dA, dB, dC, dD, d_initial) float32 of `sum(dy * y) + sum(d_final * final)` for
    `y, final = ssd_chunked(...)`."""
    rows, length, heads, head_dim = x.shape
    groups, state = B.shape[2], B.shape[3]
    args, states, _ = _forward(x, dt, A, B, C, D, runs, initial, chunk=chunk, interpret=interpret, states=True)
    padded, blocks = args[0].shape[1], head_dim // BLOCK_P
    f32 = jnp.float32
    dy = jnp.pad(dy.astype(f32), [(0, 0), (0, padded - length), (0, 0), (0, 0)])
    outputs = [jax.ShapeDtypeStruct((rows, padded, heads, head_dim), f32)] + [
        jax.ShapeDtypeStruct((rows, padded, heads, blocks), f32)] * 2 + [
        jax.ShapeDtypeStruct((rows, padded, heads, blocks, state), f32)] * 2 + [
        jax.ShapeDtypeStruct(args[-1].shape, f32)]
    kernel = functools.partial(_backward_kernel, chunks=padded // chunk, chunk=chunk, heads_per_group=heads // groups)
    dx, ddt, da, dB, dC, d_initial = _call(kernel, (*args, states, dy, jnp.swapaxes(d_final.astype(f32), 2, 3)),
                                           outputs, f"ssd_bwd_l{chunk}_p{BLOCK_P}_n{state}", interpret)

    def per_group(d):  # [B, T, H, NP, N] -> [B, T, G, N]
        return d[:, :length].sum(3).reshape(rows, length, groups, heads // groups, state).sum(3)

    dD = jnp.einsum("bthp,bthp->h", dy[:, :length], x.astype(f32))
    return (dx[:, :length], ddt[:, :length].sum(3), da.sum((0, 1, 3)), per_group(dB), per_group(dC), dD,
            jnp.swapaxes(d_initial, 2, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def ssd_chunked_vjp(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                    runs: jax.Array, initial: jax.Array, chunk: int = CHUNK, backward_chunk: int = BACKWARD_CHUNK,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`ssd_chunked` (chunks of `chunk`), differentiable through `ssd_chunked_backward` (chunks of
    `backward_chunk`; not through `runs`)."""
    return ssd_chunked(x, dt, A, B, C, D, runs, initial, chunk=chunk, interpret=interpret)


def _vjp_forward(x, dt, A, B, C, D, runs, initial, chunk, backward_chunk, interpret):
    outputs = ssd_chunked_vjp(x, dt, A, B, C, D, runs, initial, chunk, backward_chunk, interpret)
    return outputs, (x, dt, A, B, C, D, runs, initial)


def _vjp_backward(chunk, backward_chunk, interpret, inputs, cotangents):
    dx, ddt, dA, dB, dC, dD, d_initial = ssd_chunked_backward(*inputs, *cotangents, chunk=backward_chunk,
                                                              interpret=interpret)
    runs, initial = inputs[6:]
    grads = (dx, ddt, dA, dB, dC, dD)
    return (*(d.astype(a.dtype) for d, a in zip(grads, inputs)), np.zeros(runs.shape, jax.dtypes.float0),
            d_initial.astype(initial.dtype))


ssd_chunked_vjp.defvjp(_vjp_forward, _vjp_backward)
