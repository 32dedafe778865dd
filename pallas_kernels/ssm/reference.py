"""State-space mixers in plain jnp: Mamba's selective scan, Mamba-2's SSD, the causal conv1d.

The definition of correct and the CPU path. Every op takes rows `[B, T, ...]` that may
hold several sequences (packed training rows) or one sequence continuing from a state
(serving), described by `runs`:

- `segment_ids [B, T]` int32: 0 = padding, equal ids = one sequence (as in `DenseBatch`).
- A sequence *starts fresh* where its id differs from the previous token's (never at
  t = 0: the first real tokens of a row continue from the row's initial state, which is
  zero unless given). Padding tokens are identity steps: they neither read nor change
  the state, so a right-padded row ends in the state of its last real token and a
  left-padded one starts fresh at its first.

States per row: the conv tail `[B, W-1, C]` (the last W-1 inputs before the row, oldest
first; W the kernel width) and the SSM state, `[B, D, N]` for Mamba and `[B, H, P, N]`
for Mamba-2. The `*_step` functions are the per-token recurrences used for decode.

Glossary: B rows, T tokens, C conv channels, W conv width, D Mamba channels
(intermediate size), N state size, H Mamba-2 heads, P head dim, G groups of B/C
(H % G == 0), L chunk length, Q chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def run_starts(segment_ids: jax.Array) -> jax.Array:
    """`[B, T]` -> `[B, T]` bool: the token starts a fresh sequence (its id differs from the last real id before it)."""
    real = segment_ids != 0
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    last_real = jax.lax.cummax(jnp.where(real, index, -1), axis=1)
    before = jnp.concatenate([jnp.full_like(last_real[:, :1], -1), last_real[:, :-1]], axis=1)
    previous_id = jnp.take_along_axis(segment_ids, jnp.maximum(before, 0), axis=1)
    return real & (before >= 0) & (previous_id != segment_ids)


def run_ids(segment_ids: jax.Array) -> jax.Array:
    """`[B, T]` -> `[B, T]` index of the state run of each token (0: the run of the row's initial state).

    A run begins at every fresh sequence start; padding stays in the run before it.
    """
    return jnp.cumsum(run_starts(segment_ids).astype(jnp.int32), axis=1)


def causal_conv1d(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None, segment_ids: jax.Array, tail: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal conv over time, per sequence: `x [B, T, C]`, `weight [C, W]` -> (`[B, T, C]`, new tail).

    Token t sees inputs t-W+1..t of its own run (the tail `[B, W-1, C]` belongs to run
    0); padding inputs count as zero. No activation. The new tail holds the last W-1
    inputs of each row's last run (padding skipped), for the next chunk of that sequence.
    """
    B, T, C = x.shape
    W = weight.shape[1]
    real = segment_ids != 0
    x = jnp.where(real[..., None], x, 0).astype(jnp.float32)
    if tail is None:
        tail = jnp.zeros((B, W - 1, C), jnp.float32)
    runs = run_ids(segment_ids)
    # Compact each row so that real tokens sit in order after the tail: padding then never
    # sits inside a window (a left-padded row sees its tail, a packed row its own run).
    order = jnp.argsort(jnp.where(real, 0, 1), axis=1, stable=True)  # real tokens first, in order
    packed = jnp.take_along_axis(x, order[..., None], axis=1)
    packed_runs = jnp.take_along_axis(jnp.where(real, runs, -1), order, axis=1)
    ext = jnp.concatenate([tail.astype(jnp.float32), packed], axis=1)  # [B, W-1+T, C]
    ext_runs = jnp.concatenate([jnp.zeros((B, W - 1), jnp.int32), packed_runs], axis=1)
    out = jnp.zeros((B, T, C), jnp.float32)
    for k in range(W):  # output t (packed) reads ext[t + k], weight column k
        same = (ext_runs[:, k : k + T] == packed_runs)[..., None]
        out = out + jnp.where(same, ext[:, k : k + T], 0) * weight[:, k].astype(jnp.float32)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    # Back to the row's token order (padding rows get whatever; callers mask them).
    inverse = jnp.argsort(order, axis=1)
    out = jnp.take_along_axis(out, inverse[..., None], axis=1)
    # Tail: the last W-1 entries of ext up to the last real token, within its run.
    count = jnp.sum(real, axis=1)  # real tokens in the row
    last_run = jnp.max(jnp.where(real, runs, 0), axis=1)
    window = count[:, None] + jnp.arange(W - 1)[None, :]  # ext indices of the new tail
    new_tail = jnp.take_along_axis(ext, window[..., None], axis=1)
    # Inputs of earlier runs are not history of the last one (the row's tail is run 0).
    keep = jnp.take_along_axis(ext_runs, window, axis=1) == last_run[:, None]
    new_tail = jnp.where(keep[..., None], new_tail, 0.0)
    return out, new_tail


def conv1d_step(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None, tail: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token per row: `x [B, C]`, `tail [B, W-1, C]` -> (`[B, C]`, new tail)."""
    window = jnp.concatenate([tail.astype(jnp.float32), x[:, None].astype(jnp.float32)], axis=1)  # [B, W, C]
    out = jnp.einsum("bwc,cw->bc", window, weight.astype(jnp.float32))
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out, window[:, 1:]


def _identity_on_padding(dt: jax.Array, x: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    real = segment_ids != 0

    def mask(a: jax.Array) -> jax.Array:
        return jnp.where(real.reshape(real.shape + (1,) * (a.ndim - 2)), a, 0.0)

    return mask(dt), mask(x)


def selective_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    segment_ids: jax.Array,
    state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mamba's selective scan: `x, dt [B, T, D]` (dt after softplus), `A [D, N]`, `B, C [B, T, N]`, `D [D]`.

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t (h reset to 0 where a sequence starts fresh),
    y_t = C_t . h_t + D x_t. An associative scan over T (float32). Returns (`y [B, T, D]`,
    the state after each row's last real token `[B, D, N]`).
    """
    f32 = jnp.float32
    dt, x = _identity_on_padding(dt.astype(f32), x.astype(f32), segment_ids)
    decay = jnp.exp(dt[..., None] * A.astype(f32))  # [B, T, D, N]
    decay = jnp.where(run_starts(segment_ids)[..., None, None], 0.0, decay)
    inputs = (dt * x)[..., None] * B.astype(f32)[:, :, None, :]  # [B, T, D, N]
    if state is not None:
        inputs = inputs.at[:, 0].add(decay[:, 0] * state.astype(f32))

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    _, states = jax.lax.associative_scan(combine, (decay, inputs), axis=1)
    y = jnp.einsum("btdn,btn->btd", states, C.astype(f32)) + x * D.astype(f32)
    return y, states[:, -1]


def selective_state_step(
    x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array, state: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token of `selective_scan`: `x, dt [B, D]`, `B, C [B, N]`, `state [B, D, N]` -> (`y [B, D]`, state)."""
    f32 = jnp.float32
    dt, x = dt.astype(f32), x.astype(f32)
    state = jnp.exp(dt[..., None] * A.astype(f32)) * state.astype(f32) + (dt * x)[..., None] * B.astype(f32)[:, None]
    return jnp.einsum("bdn,bn->bd", state, C.astype(f32)) + x * D.astype(f32), state


def ssd_chunked(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    segment_ids: jax.Array,
    chunk: int,
    state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mamba-2's SSD as a chunked scan: `x [B, T, H, P]`, `dt [B, T, H]` (after softplus and clamp),
    `A [H]`, `B, C [B, T, G, N]`, `D [H]`.

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T per head (`[H, P, N]`), y_t = h_t C_t + D x_t.
    Within a chunk of L tokens the output is a masked quadratic form (decay-weighted
    C.B scores, only between tokens of the same run); across chunks a `lax.scan` carries
    the state, which reaches a chunk's tokens only while their run continues. Returns
    (`y [B, T, H, P]`, the state after each row's last real token `[B, H, P, N]`).
    """
    f32 = jnp.float32
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    dt, x = _identity_on_padding(dt.astype(f32), x.astype(f32), segment_ids)
    runs = run_ids(segment_ids)
    pad = (-T) % chunk
    if pad:  # padding tokens are identity steps in the last run
        x, dt, B, C = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (x, dt, B, C))
        runs = jnp.pad(runs, [(0, 0), (0, pad)], mode="edge")
    Q = x.shape[1] // chunk
    heads_per_group = H // G
    Bh = jnp.repeat(B.astype(f32), heads_per_group, axis=2)  # [B, T, H, N]
    Ch = jnp.repeat(C.astype(f32), heads_per_group, axis=2)

    def chunks(a):  # [B, Q*L, ...] -> [Q, B, L, ...]
        return jnp.moveaxis(a.reshape(b, Q, chunk, *a.shape[2:]), 1, 0)

    xs, dts, Bs, Cs, rs = (chunks(a) for a in (x, dt, Bh, Ch, runs))
    log_decay = dts * A.astype(f32)  # [Q, B, L, H]
    cum = jnp.cumsum(log_decay, axis=2)
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    same_run = (rs[:, :, :, None] == rs[:, :, None, :]) & causal  # [Q, B, L(i), L(j)]
    diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [Q, B, i, j, H]
    weights = jnp.where(same_run[..., None], jnp.exp(jnp.where(same_run[..., None], diff, 0.0)), 0.0)
    scores = jnp.einsum("qbihn,qbjhn->qbijh", Cs, Bs) * weights
    y_diag = jnp.einsum("qbijh,qbjh,qbjhp->qbihp", scores, dts, xs)
    # Each chunk's own contribution to the state after its last token (its last run only).
    last_run = rs[:, :, -1]  # [Q, B]
    to_end = jnp.exp(cum[:, :, -1:, :] - cum) * (rs == last_run[..., None])[..., None]  # [Q, B, L, H]
    chunk_states = jnp.einsum("qblh,qblh,qblhn,qblhp->qbhpn", to_end, dts, Bs, xs)
    chunk_decay = jnp.exp(cum[:, :, -1, :])  # [Q, B, H]

    def carry_over(carry, inputs):
        h, run = carry  # state entering the chunk and the run it belongs to
        own, total_decay, runs_q, last_q, cum_q, C_q = inputs
        continues = (runs_q == run[:, None])[..., None]  # [B, L, 1]: tokens still in the carried run
        y_off = jnp.einsum("blhn,bhpn->blhp", C_q, h) * (jnp.exp(cum_q) * continues)[..., None]
        keep = (last_q == run)[:, None, None, None]
        h = jnp.where(keep, total_decay[..., None, None] * h, 0.0) + own
        return (h, last_q), y_off

    h0 = jnp.zeros((b, H, P, N), f32) if state is None else state.astype(f32)
    (h_end, _), y_off = jax.lax.scan(
        carry_over, (h0, jnp.zeros((b,), jnp.int32)), (chunk_states, chunk_decay, rs, last_run, cum, Cs)
    )
    y = y_diag + y_off + xs * D.astype(f32)[:, None]
    y = jnp.moveaxis(y, 0, 1).reshape(b, Q * chunk, H, P)[:, :T]
    return y, h_end


def ssd_state_step(
    x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array, state: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token of `ssd_chunked`: `x [B, H, P]`, `dt [B, H]`, `B, C [B, G, N]`, `state [B, H, P, N]`."""
    f32 = jnp.float32
    heads_per_group = x.shape[1] // B.shape[1]
    Bh = jnp.repeat(B.astype(f32), heads_per_group, axis=1)
    Ch = jnp.repeat(C.astype(f32), heads_per_group, axis=1)
    dt, x = dt.astype(f32), x.astype(f32)
    decay = jnp.exp(dt * A.astype(f32))[..., None, None]
    state = decay * state.astype(f32) + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    return jnp.einsum("bhpn,bhn->bhp", state, Ch) + x * D.astype(f32)[:, None], state


def gated_rms_norm(x: jax.Array, gate: jax.Array, weight: jax.Array, group_size: int, eps: float) -> jax.Array:
    """Mamba-2's norm: RMS-normalise `x * silu(gate)` over groups of `group_size` features, scale by `weight`."""
    h = x.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))
    grouped = h.reshape(*h.shape[:-1], h.shape[-1] // group_size, group_size)
    grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * grouped.reshape(h.shape)).astype(x.dtype)
