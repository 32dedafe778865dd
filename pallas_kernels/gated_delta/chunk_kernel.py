"""The chunked gated delta rule as Pallas Triton kernels, forward and backward: one program per
(row, value head, block of the value dim).

Each program keeps its slice of the head's state `S [K, block_v]` in registers and walks the row's
chunks of L tokens (`fori_loop`), doing per chunk what `reference.gated_delta_chunked` does for
rows from zero states, with matmuls only (`tl.dot`): with c the in-chunk cumulative log decay
(a masked row sum over an `[L, L]` tile), Gamma_ij = exp(c_i - c_j) between tokens i >= j of one
run, D_i = exp(c_i) for tokens continuing the carried run (0 for a run that starts in the chunk,
which starts from zeros), A the strictly lower part of beta_i (k_i . k_j) Gamma_ij, and
T = (I + A)^-1 (`reference.unit_lower_inverse`: log2 L squarings, no serial solve):

    u = T (beta v),  w = T (beta D k),  v' = u - w S,
    o = (D q) S + ((q k^T) * Gamma) v',    S <- D_L S + (Gamma_L k)^T v'.

Blocks of the value dim are independent (`T`, `w` depend on keys only and are recomputed per
block), which gives the GPU rows x heads x blocks programs and keeps `S` within registers at
Qwen3-Next's K = V = 128.

From states (`gated_delta_from_states`, the serving path: forward only): run r starts from its
initial state (`[B, R, H, K, V]`, zeros past R) and the states after the first R runs come back.
The chunk's tokens then read several entering states (the carried one, and that of every run
starting in the chunk), so the program loops over the chunk's runs, from the carried one to its
last: each reads its entering state through D, w and v' of its own (the decay masked to the run),
while T and Gamma, which never mix runs, are shared; a run ending in the chunk writes its state.

Backward (`gated_delta_vjp`, a `custom_vjp`), three kernels on the same grid: the forward runs again
writing the state entering every chunk (`[B, H, Q, K, V]` float32, alive only inside the backward
pass); a second kernel walks the chunks in reverse carrying dS, the adjoint of the state leaving the
chunk, and writes it per chunk; a third, with no carry, forms each chunk's gradients from those two
(one kernel doing both spills registers at K = V = 128). With dO the output's adjoint:

    dv' = ((q k^T) * Gamma)^T dO + (Gamma_L k) dS,   dS <- (D q)^T dO + D_L dS - w^T dv',
    d(beta v) = T^T dv',  d(beta D k) = -T^T dv' S^T,  dA = -(d(beta v) u^T + d(beta D k) w^T)
    (the inverse's adjoint, -T^T dT T^T, folded into the two solves), then the chain through
    A, Gamma and D to dq, dk, dv, dbeta and dc, and dg as the reverse cumulative sum of dc.

Every gradient but dv is a sum over value blocks (and, for dq and dk, over the value heads of a
q/k head): the kernel writes per-block partials and the wrapper sums them.

Run ids (`ssm.reference.run_ids`, nondecreasing along a row) come in precomputed; padding is an
identity step (g = beta = 0), as in the reference, and the last chunk is padded the same way. The
chunk length is the kernel's own: the result does not depend on it. Matmuls take the tensor
cores' float32 mode (tf32 on a GPU), except the inverse's squarings (`INVERSE_PRECISION`), whose
errors compound; interpret mode is exact.

Glossary: B rows, T tokens, G q/k heads, H value heads, K key head dim, V value head dim, L chunk
length, Q chunks, NV value blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta.reference import unit_lower_inverse
from pallas_kernels.whole_arrays import call_on_whole_arrays

# At K = V = 128 (Qwen3-Next) chunks of 32 or 64 spill registers on sm_90 in every kernel here
# (255 registers, 8 warps); 16 does not (`tests/pallas_kernels/test_gpu_lowering.py`).
CHUNK = 16  # tokens per chunk, forward and backward
BLOCK_V = 32  # value-dim features per program
INVERSE_PRECISION = lax.Precision.HIGHEST  # IEEE float32 for the (I + A)^-1 squarings
WARPS = 8  # per program, every kernel


def supported(key_dim: int, value_dim: int) -> bool:
    """Triton tiles: a power-of-two key dim of at least 16, whole blocks of the value dim."""
    return key_dim >= 16 and key_dim & (key_dim - 1) == 0 and value_dim % BLOCK_V == 0


def _check(key_dim: int, value_dim: int) -> None:
    if not supported(key_dim, value_dim):
        raise ValueError(f"gated_delta kernel: key dim {key_dim} (a power of two >= 16) and value dim {value_dim} "
                         f"(a multiple of {BLOCK_V}) needed")


def _chunk_terms(k, g, beta, runs, carried_run, chunk: int) -> dict:
    """The chunk's key-side terms (module docstring), all float32; `carried_run` is the run of the
    state entering the chunk."""
    i = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    j = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    causal = j <= i
    cum = jnp.sum(jnp.where(causal, g[None, :], 0.0), axis=1)  # [L] inclusive
    same = causal & (runs[:, None] == runs[None, :])
    gamma = jnp.where(same, jnp.exp(jnp.where(same, cum[:, None] - cum[None, :], 0.0)), 0.0)
    decay = jnp.where(runs == carried_run, jnp.exp(cum), 0.0)  # D
    kk = jnp.dot(k, k.T)
    strict = same & (j < i)
    solve = unit_lower_inverse(jnp.where(strict, beta[:, None] * kk * gamma, 0.0), INVERSE_PRECISION)  # T
    # The last token's run and decay: what the state leaving the chunk keeps.
    last_run, total = jnp.max(runs), jnp.sum(g)
    to_end = jnp.where(runs == last_run, jnp.exp(total - cum), 0.0)  # Gamma_L
    keep = jnp.where(last_run == carried_run, jnp.exp(total), 0.0)  # D_L
    last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    return dict(causal=causal, last=last, gamma=gamma, decay=decay, kk=kk, strict=strict,
                solve=solve, last_run=last_run, to_end=to_end, keep=keep)


def _solve_values(t: dict, k, v, beta, S):
    """u = T (beta v), w = T (beta D k) and v' = u - w S (module docstring)."""
    u = jnp.dot(t["solve"], beta[:, None] * v)
    w = jnp.dot(t["solve"], (beta * t["decay"])[:, None] * k)
    return u, w, u - jnp.dot(w, S)


def _program():
    """This program's row, value head and block of the value dim (index and slice)."""
    block = pl.program_id(2)
    return pl.program_id(0), pl.program_id(1), block, pl.ds(block * BLOCK_V, BLOCK_V)


def _chunk_inputs(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, row, head, group, features, tokens):
    """One chunk's q, k `[L, K]`, v `[L, block_v]`, g, beta `[L]` (float32) and runs `[L]`."""
    f32 = jnp.float32
    return (q_ref[row, tokens, group, :].astype(f32), k_ref[row, tokens, group, :].astype(f32),
            v_ref[row, tokens, head, features].astype(f32), g_ref[row, tokens, head].astype(f32),
            beta_ref[row, tokens, head].astype(f32), runs_ref[row, tokens])


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, o_ref, *states_ref, chunks: int, chunk: int,
                    heads_per_group: int):
    """The forward; with `states_ref`, also the state entering every chunk."""
    row, head, block, features = _program()
    group = head // heads_per_group

    def step(c, carry):
        S, carried_run = carry  # state entering the chunk [K, block_v], and its run
        tokens = pl.ds(c * chunk, chunk)
        q, k, v, g, beta, runs = _chunk_inputs(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, row, head, group,
                                               features, tokens)
        if states_ref:
            states_ref[0][row, head, c, :, features] = S
        t = _chunk_terms(k, g, beta, runs, carried_run, chunk)
        _, _, v_new = _solve_values(t, k, v, beta, S)
        o = jnp.dot(q * t["decay"][:, None], S) + _within_chunk(t, q, k, v_new)
        o_ref[row, tokens, head, features] = o.astype(o_ref.dtype)
        return _leaving(t["keep"], t["to_end"], k, S, v_new), t["last_run"]

    S0 = jnp.zeros((k_ref.shape[-1], BLOCK_V), jnp.float32)
    lax.fori_loop(0, chunks, step, (S0, jnp.int32(0)))


def _within_chunk(t: dict, q, k, v_new):
    """The outputs' in-chunk part, ((q k^T) * Gamma) v'."""
    return jnp.dot(jnp.dot(q, k.T) * t["gamma"], v_new)


def _leaving(keep, to_end, k, S, v_new):
    """The state after a run's last token in the chunk: D_L S + (Gamma_L k)^T v'."""
    return keep * S + jnp.dot((k * to_end[:, None]).T, v_new)


def _run_decay(g, in_run, causal) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For one run of the chunk (mask `in_run`), from the state it enters the chunk with (carried, or its
    initial state where it starts here): D to each of its tokens, Gamma from each to its last token in the
    chunk, and D to that token (zeros off the run)."""
    g = jnp.where(in_run, g, 0.0)  # the run's tokens are contiguous: a masked sum decays within the run only
    cum, total = jnp.sum(jnp.where(causal, g[None, :], 0.0), axis=1), jnp.sum(g)
    return jnp.where(in_run, jnp.exp(cum), 0.0), jnp.where(in_run, jnp.exp(total - cum), 0.0), jnp.exp(total)


def _forward_states_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, initial_ref, o_ref, finals_ref, *,
                           chunks: int, chunk: int, heads_per_group: int):
    """The forward from per-run initial states (`[B, R, H, K, V]`), writing the state after each of the first R
    runs that has a token. Per chunk, every run in it reads its entering state (the carried one, or its initial
    state where it starts in the chunk) through its own D, w and v' (`_run_decay`; T and Gamma are shared: runs
    never mix in them), and a run that ends in the chunk writes its final state there."""
    row, head, block, features = _program()
    group = head // heads_per_group
    num_runs = initial_ref.shape[1]

    def initial(r):
        return jnp.where(r < num_runs, initial_ref[row, jnp.minimum(r, num_runs - 1), head, :, features].astype(
            jnp.float32), 0.0)

    def finish(r, S):
        @pl.when(r < num_runs)
        def _():
            finals_ref[row, r, head, :, features] = S

    def step(c, carry):
        S, carried_run = carry
        tokens = pl.ds(c * chunk, chunk)
        q, k, v, g, beta, runs = _chunk_inputs(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, row, head, group,
                                               features, tokens)
        t = _chunk_terms(k, g, beta, runs, carried_run, chunk)
        last_run = t["last_run"]

        def per_run(r, acc):
            o, S = acc  # the outputs so far [L, block_v]; the state after run r - 1 (the carried one at first)
            S = lax.cond(r == carried_run, lambda: S, lambda: initial(r))  # entering run r
            in_run = runs == r
            decay, to_end, keep = _run_decay(g, in_run, t["causal"])
            _, _, v_new = _solve_values(dict(t, decay=decay), k, v, jnp.where(in_run, beta, 0.0), S)
            o = o + jnp.dot(q * decay[:, None], S) + _within_chunk(t, q, k, v_new)
            S = _leaving(keep, to_end, k, S, v_new)

            @pl.when(r < last_run)
            def _():
                finish(r, S)

            return o, S

        # From the carried run: it may have ended at the chunk edge, with no token here.
        o, S = lax.fori_loop(carried_run, last_run + 1, per_run, (jnp.zeros((chunk, BLOCK_V), jnp.float32), S))
        o_ref[row, tokens, head, features] = o.astype(o_ref.dtype)
        return S, last_run

    S, last_run = lax.fori_loop(0, chunks, step, (initial(jnp.int32(0)), jnp.int32(0)))
    finish(last_run, S)


def _backward_chunk(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, states_ref, do_ref, program, c, *, chunk: int,
                    heads_per_group: int) -> dict:
    """Chunk `c`'s inputs, key-side terms and recomputed forward (u, w, v', q k^T), from the saved state
    entering it; `program` is `_program()`'s (read outside the chunk loop, as interpret mode needs)."""
    row, head, block, features = program
    tokens = pl.ds(c * chunk, chunk)
    q, k, v, g, beta, runs = _chunk_inputs(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, row, head,
                                           head // heads_per_group, features, tokens)
    carried_run = jnp.where(c > 0, runs_ref[row, jnp.maximum(c * chunk - 1, 0)], 0)
    t = _chunk_terms(k, g, beta, runs, carried_run, chunk)
    S = states_ref[row, head, c, :, features]
    u, w, v_new = _solve_values(t, k, v, beta, S)
    return dict(t, q=q, k=k, v=v, beta=beta, S=S, u=u, w=w, v_new=v_new, qk=jnp.dot(q, k.T),
                dO=do_ref[row, tokens, head, features].astype(jnp.float32), row=row, head=head, block=block,
                features=features, tokens=tokens)


def _d_v_new(t: dict, dS: jax.Array) -> jax.Array:
    """The adjoint of v' from o's (dO) and the leaving state's (dS)."""
    return jnp.dot((t["qk"] * t["gamma"]).T, t["dO"]) + jnp.dot(t["k"] * t["to_end"][:, None], dS)


def _state_adjoint_kernel(*refs, chunks: int, chunk: int, heads_per_group: int):
    """Reverse over chunks carrying dS (module docstring), writing the adjoint of the state leaving
    every chunk."""
    *inputs, d_states_ref = refs
    program = _program()

    def step(r, dS):
        c = chunks - 1 - r
        t = _backward_chunk(*inputs, program, c, chunk=chunk, heads_per_group=heads_per_group)
        d_states_ref[t["row"], t["head"], c, :, t["features"]] = dS
        d_v_new = _d_v_new(t, dS)
        return jnp.dot((t["q"] * t["decay"][:, None]).T, t["dO"]) + t["keep"] * dS - jnp.dot(t["w"].T, d_v_new)

    lax.fori_loop(0, chunks, step, jnp.zeros((inputs[1].shape[-1], BLOCK_V), jnp.float32))


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, states_ref, do_ref, d_states_ref,
                     dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, *, chunks: int, chunk: int, heads_per_group: int):
    """Every chunk's gradients from the states entering and the adjoints leaving it (module docstring)."""
    inputs = (q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, states_ref, do_ref)
    program = _program()

    def step(c, carry):
        t = _backward_chunk(*inputs, program, c, chunk=chunk, heads_per_group=heads_per_group)
        row, head, block, features, tokens = t["row"], t["head"], t["block"], t["features"], t["tokens"]
        q, k, v, beta, S, dO, gamma, decay, solve, to_end = (
            t[n] for n in ("q", "k", "v", "beta", "S", "dO", "gamma", "decay", "solve", "to_end"))
        dS = d_states_ref[row, head, c, :, features]
        # Through o and the leaving state to v', then the solves u = T (beta v), w = T (beta D k) and
        # T = (I + A)^-1.
        d_v_new = _d_v_new(t, dS)
        d_beta_v = jnp.dot(solve.T, d_v_new)
        dv_ref[row, tokens, head, features] = beta[:, None] * d_beta_v
        d_beta_k = -jnp.dot(solve.T, jnp.dot(d_v_new, S.T))
        dA = jnp.where(t["strict"], -(jnp.dot(d_beta_v, t["u"].T) + jnp.dot(d_beta_k, t["w"].T)), 0.0)
        d_keep = jnp.sum(S * dS) * t["keep"]
        d_weighted = jnp.dot(dO, t["v_new"].T)  # d((q k^T) * Gamma)
        d_scores = d_weighted * gamma  # d(q k^T)
        dO_S = jnp.dot(dO, S.T)  # d(D q)
        dq_ref[row, tokens, head, block, :] = jnp.dot(d_scores, k) + decay[:, None] * dO_S
        d_decay = jnp.sum(q * dO_S, axis=1)
        v_dS = jnp.dot(t["v_new"], dS.T)  # d(Gamma_L k)
        d_to_end = jnp.sum(k * v_dS, axis=1) * to_end
        k_d_beta_k = jnp.sum(k * d_beta_k, axis=1)
        d_kk = dA * beta[:, None] * gamma
        dk_ref[row, tokens, head, block, :] = (jnp.dot(d_scores.T, q) + jnp.dot(d_kk + d_kk.T, k)
                                               + to_end[:, None] * v_dS + (beta * decay)[:, None] * d_beta_k)
        dbeta_ref[row, tokens, head, block] = (jnp.sum(v * d_beta_v, axis=1) + decay * k_d_beta_k
                                               + jnp.sum(dA * t["kk"] * gamma, axis=1))
        d_decay += beta * k_d_beta_k
        # Through Gamma, D, Gamma_L and D_L to the cumulative log decay, then to g.
        d_exp = (d_weighted * t["qk"] + dA * beta[:, None] * t["kk"]) * gamma  # d(Gamma) * Gamma
        d_cum = jnp.sum(d_exp, axis=1) - jnp.sum(d_exp, axis=0) + d_decay * decay - d_to_end
        d_cum += jnp.where(t["last"], jnp.sum(d_to_end) + d_keep, 0.0)
        dg_ref[row, tokens, head, block] = jnp.sum(jnp.where(t["causal"], d_cum[:, None], 0.0), axis=0)  # i >= j
        return carry

    lax.fori_loop(0, chunks, step, jnp.int32(0))


def _call(kernel, args, outputs, name: str, num_warps: int, interpret: bool):
    rows, _, heads, value_dim = args[2].shape
    return call_on_whole_arrays(kernel, args, outputs, (rows, heads, value_dim // BLOCK_V), name, num_warps, interpret)


def _padded(q, k, v, g, beta, runs, chunk: int):
    """The inputs padded to whole chunks with identity steps in the row's last run."""
    pad = (-q.shape[1]) % chunk
    if pad:
        q, k, v, g, beta = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (q, k, v, g, beta))
        runs = jnp.pad(runs, [(0, 0), (0, pad)], mode="edge")
    return q, k, v, g, beta, runs.astype(jnp.int32)


def _forward(q, k, v, g, beta, runs, *, chunk: int, interpret: bool, states: bool):
    rows, length, heads, value_dim = v.shape
    key_dim = k.shape[-1]
    _check(key_dim, value_dim)
    args = _padded(q, k, v, g, beta, runs, chunk)
    chunks = args[0].shape[1] // chunk
    outputs = [jax.ShapeDtypeStruct(args[2].shape, jnp.float32)]
    if states:
        outputs.append(jax.ShapeDtypeStruct((rows, heads, chunks, key_dim, value_dim), jnp.float32))
    kernel = functools.partial(_forward_kernel, chunks=chunks, chunk=chunk, heads_per_group=heads // k.shape[2])
    name = f"gated_delta{'_states' if states else ''}_l{chunk}_k{key_dim}_v{BLOCK_V}"
    return args, _call(kernel, args, outputs, name, WARPS, interpret)


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def gated_delta(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, runs: jax.Array, *,
                chunk: int = CHUNK, interpret: bool = False) -> jax.Array:
    """`q, k [B, T, G, K]`, `v [B, T, H, V]`, `g, beta [B, T, H]` (zero on padding), `runs [B, T]` int32 ->
    `o [B, T, H, V]` float32, every run from a zero state."""
    _, (o,) = _forward(q, k, v, g, beta, runs, chunk=chunk, interpret=interpret, states=False)
    return o[:, : q.shape[1]]


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def gated_delta_from_states(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, runs: jax.Array,
                            initial: jax.Array, *, chunk: int = CHUNK,
                            interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`gated_delta` with run r starting from `initial [B, R, H, K, V]` (zeros for runs past R) -> (`o`, the
    states after each of the R runs `[B, R, H, K, V]` float32; a run without tokens keeps its initial
    state), `reference.gated_delta_chunked`'s contract. Forward only (the serving path)."""
    rows, length, heads, value_dim = v.shape
    key_dim = k.shape[-1]
    _check(key_dim, value_dim)
    if initial.ndim != 5 or initial.shape[0] != rows or initial.shape[1] < 1 or initial.shape[2:] != (
            heads, key_dim, value_dim):
        raise ValueError(f"gated_delta kernel: initial states {initial.shape} do not fit "
                         f"[{rows}, R >= 1, {heads}, {key_dim}, {value_dim}]")
    args = (*_padded(q, k, v, g, beta, runs, chunk), initial)
    outputs = [jax.ShapeDtypeStruct(args[2].shape, jnp.float32), jax.ShapeDtypeStruct(initial.shape, jnp.float32)]
    kernel = functools.partial(_forward_states_kernel, chunks=args[0].shape[1] // chunk, chunk=chunk,
                               heads_per_group=heads // k.shape[2])
    o, finals = _call(kernel, args, outputs, f"gated_delta_from_states_l{chunk}_k{key_dim}_v{BLOCK_V}", WARPS,
                      interpret)
    # Runs past the row's last hold no token: their states pass through (the kernel writes no others).
    present = jnp.arange(initial.shape[1])[None, :] <= jnp.max(args[5], axis=1)[:, None]
    return o[:, :length], jnp.where(present[..., None, None, None], finals, initial.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def gated_delta_backward(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, runs: jax.Array,
                         do: jax.Array, *, chunk: int = CHUNK,
                         interpret: bool = False) -> tuple[jax.Array, ...]:
    """The gradients (dq, dk, dv, dg, dbeta) float32 of `sum(do * gated_delta(...))`."""
    rows, length, heads, value_dim = v.shape
    groups, key_dim = k.shape[2], k.shape[3]
    args, (_, states) = _forward(q, k, v, g, beta, runs, chunk=chunk, interpret=interpret, states=True)
    padded = args[0].shape[1]
    do = jnp.pad(do.astype(jnp.float32), [(0, 0), (0, padded - length), (0, 0), (0, 0)])
    blocks = value_dim // BLOCK_V
    f32 = jnp.float32
    outputs = [jax.ShapeDtypeStruct((rows, padded, heads, blocks, key_dim), f32)] * 2 + [
        jax.ShapeDtypeStruct((rows, padded, heads, value_dim), f32)] + [
        jax.ShapeDtypeStruct((rows, padded, heads, blocks), f32)] * 2
    settings = dict(chunks=padded // chunk, chunk=chunk, heads_per_group=heads // groups)
    inputs = (*args, states, do)
    (d_states,) = _call(functools.partial(_state_adjoint_kernel, **settings), inputs, [states],
                        f"gated_delta_dstates_l{chunk}_k{key_dim}_v{BLOCK_V}", WARPS, interpret)
    dq, dk, dv, dg, dbeta = _call(functools.partial(_backward_kernel, **settings), (*inputs, d_states), outputs,
                                  f"gated_delta_bwd_l{chunk}_k{key_dim}_v{BLOCK_V}", WARPS, interpret)

    def per_group(d):  # [B, T, H, NV, K] -> [B, T, G, K]
        return d[:, :length].sum(3).reshape(rows, length, groups, heads // groups, key_dim).sum(3)

    return per_group(dq), per_group(dk), dv[:, :length], dg[:, :length].sum(3), dbeta[:, :length].sum(3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def gated_delta_vjp(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, runs: jax.Array,
                    chunk: int = CHUNK, interpret: bool = False) -> jax.Array:
    """`gated_delta`, differentiable through `gated_delta_backward` (not through `runs`)."""
    return gated_delta(q, k, v, g, beta, runs, chunk=chunk, interpret=interpret)


def _vjp_forward(q, k, v, g, beta, runs, chunk, interpret):
    return gated_delta_vjp(q, k, v, g, beta, runs, chunk, interpret), (q, k, v, g, beta, runs)


def _vjp_backward(chunk, interpret, inputs, do):
    grads = gated_delta_backward(*inputs, do, chunk=chunk, interpret=interpret)
    runs = inputs[-1]
    return (*(d.astype(a.dtype) for d, a in zip(grads, inputs)), np.zeros(runs.shape, jax.dtypes.float0))


gated_delta_vjp.defvjp(_vjp_forward, _vjp_backward)
