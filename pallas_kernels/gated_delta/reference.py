"""The gated delta rule (Gated DeltaNet, Qwen3-Next's linear attention) in plain jnp.

The definition of correct and the CPU path. Per value head, with a state `S [K, V]`:

    S_t = exp(g_t) S_{t-1}
    S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T      (the delta rule: write only what S mispredicts)
    o_t = S_t^T q_t

`q` and `k` arrive normalised and scaled as the model wants them; `g <= 0` is the log decay and
`beta` in [0, 1] the write strength. Query/key heads are shared by groups of value heads (head h
reads q/k head h // (H / G), as transformers' `repeat_interleave`).

Rows follow `pallas_kernels/ssm/reference.py` (whose run helpers this file imports): `segment_ids
[B, T]` (0 = padding, an identity step that neither reads nor changes a state), each sequence a
run; run r starts from `initial[:, r]` (zeros where absent) and the states after each of the first
R runs come back, so a flat serving batch is one row of sequences continuing from their slots.

`gated_delta_chunked` is the chunked form (transformers' `torch_chunk_gated_delta_rule`, FLA's
`chunk_gated_delta_rule`): within a chunk of L tokens the delta-rule writes are solved at once as
a unit lower-triangular system (the UT transform, only between tokens of one run), and a
`lax.scan` carries the state across chunks. `gated_delta_step` is the per-token recurrence.

Glossary: B rows, T tokens, G query/key heads, H value heads (H % G == 0), K key head dim,
V value head dim, L chunk length, Q chunks, R runs with a state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ssm.reference import _run_layout

L2_EPS = 1e-6  # transformers' and FLA's `l2norm` epsilon


def l2_normalize(x: jax.Array, eps: float = L2_EPS) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis, in float32 (FLA's `l2norm`)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def rms_norm_gated(x: jax.Array, gate: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Qwen3-Next's gated norm: RMS-normalise `x` over its last axis, scale by `weight`, then
    multiply by silu(gate) (norm before gate, unlike Mamba-2's); the result in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    scaled = (weight.astype(x.dtype) * normed).astype(jnp.float32)
    return (scaled * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


def _heads(a: jax.Array, heads: int, axis: int) -> jax.Array:
    """q/k heads repeated for the value heads they serve, in float32."""
    return jnp.repeat(a.astype(jnp.float32), heads // a.shape[axis], axis=axis)


def gated_delta_step(
    q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, state: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token per row: `q, k [B, G, K]`, `v [B, H, V]`, `g, beta [B, H]`, `state [B, H, K, V]`
    -> (`o [B, H, V]`, the new state), in float32."""
    f32 = jnp.float32
    H = v.shape[1]
    q, k = _heads(q, H, 1), _heads(k, H, 1)
    state = state.astype(f32) * jnp.exp(g.astype(f32))[..., None, None]
    predicted = jnp.einsum("bhkv,bhk->bhv", state, k)
    delta = (v.astype(f32) - predicted) * beta.astype(f32)[..., None]
    state = state + k[..., None] * delta[..., None, :]
    return jnp.einsum("bhkv,bhk->bhv", state, q), state


def unit_lower_inverse(strict: jax.Array, precision: jax.lax.Precision | None = None) -> jax.Array:
    """`(I + A)^-1` for strictly lower triangular `A [..., L, L]`, by matmuls only: with N = -A
    nilpotent, the inverse is sum_{n<L} N^n = prod_{k<ceil(log2 L)} (I + N^(2^k)). (XLA's
    triangular solve does not partition well over a device mesh; matmuls do; the Pallas kernel
    reuses this inside a program.)"""
    size = strict.shape[-1]
    eye = (jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
           == jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)).astype(strict.dtype)
    power = -strict
    inverse = eye + power
    for _ in range(max(0, (size - 1).bit_length() - 1)):
        power = jnp.matmul(power, power, precision=precision)
        inverse = inverse + jnp.matmul(inverse, power, precision=precision)
    return inverse


def _chunks(a: jax.Array, chunk: int) -> jax.Array:
    """`[B, Q*L, ...]` -> `[Q, B, L, ...]`."""
    b, t = a.shape[:2]
    return jnp.moveaxis(a.reshape(b, t // chunk, chunk, *a.shape[2:]), 1, 0)


def gated_delta_chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    segment_ids: jax.Array,
    chunk: int,
    initial: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The gated delta rule over rows of runs: `q, k [B, T, G, K]`, `v [B, T, H, V]`, `g, beta
    [B, T, H]`, per-run `initial [B, R, H, K, V]` -> (`o [B, T, H, V]` float32, the states after
    each of the R runs, None without `initial`).

    Within a chunk, token i of a run reads the state its run had entering the chunk, or, for a
    run that starts inside the chunk, the run's initial state; call it S_in(i), and D_i the decay
    from that point to i. With Gamma_ij = exp(c_i - c_j) for j <= i of one run (c the in-chunk
    cumulative log decay) and A the strictly lower part of beta_i (k_i . k_j) Gamma_ij:
        u = (I + A)^-1 (beta v),  w = (I + A)^-1 (beta D k),  v'_i = u_i - S_in(i)^T w_i,
        o_i = S_in(i)^T (D_i q_i) + sum_j (q_i . k_j) Gamma_ij v'_j,
        S after i = D_i S_in(i) + sum_j Gamma_ij k_j v'_j^T.
    """
    f32 = jnp.float32
    b, T, H, V = v.shape
    K = k.shape[-1]
    real = segment_ids != 0
    q, k = _heads(q, H, 2), _heads(k, H, 2)
    # Padding: no decay and no write, an identity step.
    g = jnp.where(real[..., None], g.astype(f32), 0.0)
    beta = jnp.where(real[..., None], beta.astype(f32), 0.0)
    num_runs = 1 if initial is None else initial.shape[1]
    runs, token_start, _, last = _run_layout(segment_ids, num_runs)
    # The last token (real or padding) of each run: where its final state is read.
    is_end = jnp.concatenate([runs[:, 1:] != runs[:, :-1], jnp.ones((b, 1), bool)], axis=1)
    pad = (-T) % chunk
    if pad:  # padding tokens are identity steps in the last run
        q, k, v, g, beta = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (q, k, v, g, beta))
        runs, token_start = (jnp.pad(a, [(0, 0), (0, pad)], mode="edge") for a in (runs, token_start))
        is_end = jnp.pad(is_end, [(0, 0), (0, pad)])
    Q = (T + pad) // chunk
    qs, ks, vs, gs, betas, rs, starts, ends = (
        _chunks(a, chunk) for a in (q, k, v, g, beta, runs, token_start, is_end)
    )
    # The run each chunk inherits: that of the previous chunk's last token (run 0 for the first).
    carried_run = jnp.concatenate([jnp.zeros((1, b), jnp.int32), rs[:-1, :, -1]], axis=0)  # [Q, B]
    continues = rs == carried_run[..., None]  # [Q, B, L]
    cum = jnp.cumsum(gs, axis=2)  # [Q, B, L, H] inclusive, from the chunk start
    # Log decay accumulated before each token's incoming state: 0 when it continues the carried
    # run, else the exclusive cumsum at its run's first token in this chunk.
    local_start = jnp.clip(starts - (jnp.arange(Q, dtype=jnp.int32) * chunk)[:, None, None], 0, chunk - 1)
    exclusive = cum - gs
    base = jnp.where(continues[..., None], 0.0, jnp.take_along_axis(exclusive, local_start[..., None], axis=2))
    decay_in = jnp.exp(cum - base)  # D [Q, B, L, H]
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    same_run = (rs[..., :, None] == rs[..., None, :]) & causal  # [Q, B, i, j]
    diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [Q, B, i, j, H]
    gamma = jnp.where(same_run[..., None], jnp.exp(jnp.where(same_run[..., None], diff, 0.0)), 0.0)
    strict = same_run & ~jnp.eye(chunk, dtype=bool)
    kk = jnp.einsum("qbihk,qbjhk->qbijh", ks, ks)
    system = jnp.where(strict[..., None], betas[:, :, :, None, :] * kk * gamma, 0.0)  # A [Q, B, i, j, H]
    inverse = unit_lower_inverse(jnp.moveaxis(system, -1, 2))  # (I + A)^-1  [Q, B, H, i, j]

    def solve(rhs: jax.Array) -> jax.Array:  # [Q, B, L, H, X] -> (I + A)^-1 rhs, same layout
        return jnp.einsum("qbhij,qbjhx->qbihx", inverse, rhs)

    u = solve(betas[..., None] * vs)  # [Q, B, L, H, V]
    w = solve((betas * decay_in)[..., None] * ks)  # [Q, B, L, H, K]
    scores = jnp.einsum("qbihk,qbjhk->qbijh", qs, ks) * gamma  # [Q, B, i, j, H]
    q_in = qs * decay_in[..., None]
    to_end = jnp.moveaxis(gamma[:, :, -1], -1, 2)  # [Q, B, H, j]: decay from j to the chunk's last token
    with_finals = initial is not None
    if with_finals:
        initial = initial.astype(f32)
        finals0 = jnp.zeros_like(initial)
        h0 = initial[:, 0]
    else:
        finals0 = jnp.zeros((b, 0, H, K, V), f32)
        h0 = jnp.zeros((b, H, K, V), f32)

    def body(carry, inputs):
        h, finals = carry  # state after the previous chunk's last token [B, H, K, V], finals [B, R, H, K, V]
        u_q, w_q, q_in_q, k_q, d_q, cont_q, run_q, end_q, scores_q, gamma_q, to_end_q = inputs
        if with_finals:
            own = jnp.take_along_axis(initial, jnp.clip(run_q, 0, num_runs - 1)[..., None, None, None], axis=1)
            own = jnp.where((run_q < num_runs)[..., None, None, None], own, 0.0)
            s_in = jnp.where(cont_q[..., None, None, None], h[:, None], own)  # [B, L, H, K, V]
            v_new = u_q - jnp.einsum("blhkv,blhk->blhv", s_in, w_q)
            o = jnp.einsum("blhkv,blhk->blhv", s_in, q_in_q)
            after = d_q[..., None, None] * s_in + jnp.einsum("bijh,bjhk,bjhv->bihkv", gamma_q, k_q, v_new)
            h_next = after[:, -1]
            rows = jnp.where(end_q, run_q, num_runs)  # one end per run; others dropped
            finals = finals.at[jnp.arange(b)[:, None], rows].add(after, mode="drop")
        else:  # dense rows: every run but the carried one starts from zeros
            v_new = u_q - jnp.where(cont_q[..., None, None], jnp.einsum("bhkv,blhk->blhv", h, w_q), 0.0)
            o = jnp.where(cont_q[..., None, None], jnp.einsum("bhkv,blhk->blhv", h, q_in_q), 0.0)
            last_cont = cont_q[:, -1][:, None, None, None]
            h_next = jnp.where(last_cont, d_q[:, -1][..., None, None] * h, 0.0) + jnp.einsum(
                "bhj,bjhk,bjhv->bhkv", to_end_q, k_q, v_new
            )
        o = o + jnp.einsum("bijh,bjhv->bihv", scores_q, v_new)
        return (h_next, finals), o

    inputs = (u, w, q_in, ks, decay_in, continues, rs, ends, scores, gamma, to_end)
    (_, finals), o = jax.lax.scan(body, (h0, finals0), inputs)
    o = jnp.moveaxis(o, 0, 1).reshape(b, Q * chunk, H, V)[:, :T]
    if not with_finals:
        return o, None
    return o, jnp.where((last >= 0)[..., None, None, None], finals, initial)
