"""State-space mixers in plain jnp: Mamba's selective scan, Mamba-2's SSD, the causal conv1d.

The definition of correct and the CPU path. Every op takes rows `[B, T, ...]` that may
hold several sequences (packed training rows) or one sequence continuing from a state
(serving), described by `runs`:

- `segment_ids [B, T]` int32: 0 = padding, equal ids = one sequence (as in `DenseBatch`).
- Each sequence is one *run* of the row (`run_ids`: run r is the row's r-th sequence);
  padding sits only before the first run or after the last, and is an identity step: it
  neither reads nor changes a state.
- Run r starts from the initial states given for it (`[B, R, ...]`, one per run of the
  first R; zeros where absent), so a flat serving batch is one row whose runs are its
  sequences, each continuing from its slot's state; dense rows start every run from zero.
- The states after each of the first R runs come back in the same layout.

States: the conv tail `[W-1, C]` (the last W-1 inputs before the run, oldest first; W the
kernel width) and the SSM state, `[D, N]` for Mamba and `[H, P, N]` for Mamba-2. The
`*_step` functions are the per-token recurrences used for decode.

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


def _run_layout(segment_ids: jax.Array, num_runs: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(runs `[B, T]`, run start of each token `[B, T]`, first and last real token of each of
    `num_runs` runs `[B, R]`; -1 where a run has no token)."""
    real = segment_ids != 0
    runs = run_ids(segment_ids)
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    mine = real[..., None] & (runs[..., None] == jnp.arange(num_runs)[None, None, :])  # [B, T, R]
    first = jnp.min(jnp.where(mine, index[None, :, None], segment_ids.shape[1]), axis=1)
    first = jnp.where(first == segment_ids.shape[1], -1, first)
    last = jnp.max(jnp.where(mine, index[None, :, None], -1), axis=1)
    begins = real & (run_starts(segment_ids) | (jnp.cumsum(real, axis=1) == 1))
    token_start = jax.lax.cummax(jnp.where(begins, index, -1), axis=1)
    return runs, token_start, first, last


def _per_token(per_run: jax.Array, runs: jax.Array) -> jax.Array:
    """`[B, R, ...]` -> `[B, T, ...]`: each token's run's entry (zeros past the R given)."""
    num_runs = per_run.shape[1]
    index = jnp.minimum(runs, num_runs - 1).reshape(runs.shape + (1,) * (per_run.ndim - 2))
    picked = jnp.take_along_axis(per_run, index, axis=1)
    return jnp.where((runs < num_runs).reshape(index.shape), picked, 0.0)


def causal_conv1d(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None, segment_ids: jax.Array, tails: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal conv over time, per run: `x [B, T, C]`, `weight [C, W]` -> (`[B, T, C]`, new tails).

    Token t sees inputs t-W+1..t of its own run, preceded by the run's tail (`tails
    [B, R, W-1, C]`, zeros by default); padding inputs count as zero. No activation. The
    new tails `[B, R, W-1, C]` hold each run's last W-1 inputs (its old tail if it has no token).
    """
    b, T, C = x.shape
    W = weight.shape[1]
    f32 = jnp.float32
    real = segment_ids != 0
    x = jnp.where(real[..., None], x, 0).astype(f32)
    if tails is None:
        tails = jnp.zeros((b, 1, W - 1, C), f32)
    tails = tails.astype(f32)
    runs, token_start, first, last = _run_layout(segment_ids, tails.shape[1])
    index = jnp.arange(T, dtype=jnp.int32)
    offset = index[None, :] - token_start  # position of each token in its run
    token_tails = _per_token(tails, runs)  # [B, T, W-1, C]

    def tap(lag: jax.Array, offset: jax.Array, source_x: jax.Array, source_tail: jax.Array) -> jax.Array:
        """The input `lag` steps before a token at `offset` in its run: from x or from its run's tail."""
        in_tail = lag > offset
        from_tail = jnp.take_along_axis(
            source_tail, jnp.clip(W - 1 - (lag - offset), 0, W - 2)[..., None, None], axis=2
        )[:, :, 0] if W > 1 else jnp.zeros_like(source_x)
        return jnp.where(in_tail[..., None], from_tail, source_x)

    out = jnp.zeros((b, T, C), f32)
    for lag in range(W):  # x[t - lag] meets weight column W-1-lag
        shifted = jnp.pad(x, [(0, 0), (lag, 0), (0, 0)])[:, :T]
        out = out + tap(jnp.int32(lag), offset, shifted, token_tails) * weight[:, W - 1 - lag].astype(f32)
    if bias is not None:
        out = out + bias.astype(f32)
    # New tails: entries -(W-1)..-1 counted from one past each run's last token.
    length = jnp.where(last >= 0, last - first + 1, 0)  # [B, R]
    new = []
    for lag in range(W - 1, 0, -1):
        at = jnp.clip(first + length - lag, 0, T - 1)  # token index, when inside the run
        from_x = jnp.take_along_axis(x, at[..., None], axis=1)  # [B, R, C]
        new.append(tap(jnp.int32(lag), length, from_x, tails))
    new_tails = jnp.stack(new, axis=2) if new else tails
    return out, new_tails


def conv1d_step(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None, tail: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token per row: `x [B, C]`, `tail [B, W-1, C]` -> (`[B, C]`, new tail)."""
    window = jnp.concatenate([tail.astype(jnp.float32), x[:, None].astype(jnp.float32)], axis=1)  # [B, W, C]
    out = jnp.einsum("bwc,cw->bc", window, weight.astype(jnp.float32))
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out, window[:, 1:]


def identity_on_padding(dt: jax.Array, x: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """dt and x zeroed on padding tokens: exp(0 * A) = 1 and no input, an identity step."""
    real = segment_ids != 0

    def mask(a: jax.Array) -> jax.Array:
        return jnp.where(real.reshape(real.shape + (1,) * (a.ndim - 2)), a, 0.0)

    return mask(dt), mask(x)


def _segmented_scan(
    decay: jax.Array, inputs: jax.Array, segment_ids: jax.Array, initial: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
    """h_t = decay_t * h_{t-1} + inputs_t along T, each run from its initial state (`[B, R, ...]`).

    An associative scan. Returns the state after every token `[B, T, ...]` and after each
    of the R runs with an initial state (None without).
    """
    starts = run_starts(segment_ids).reshape(segment_ids.shape + (1,) * (decay.ndim - 2))
    if initial is not None:
        runs, token_start, first, last = _run_layout(segment_ids, initial.shape[1])
        index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
        begins = (index[None, :] == token_start).reshape(starts.shape)
        inputs = inputs + jnp.where(begins, decay * _per_token(initial.astype(inputs.dtype), runs), 0.0)
        starts = begins
    decay = jnp.where(starts, 0.0, decay)

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    _, states = jax.lax.associative_scan(combine, (decay, inputs), axis=1)
    if initial is None:
        return states, None
    at = jnp.maximum(last, 0).reshape(last.shape + (1,) * (states.ndim - 2))
    finals = jnp.take_along_axis(states, at, axis=1)
    return states, jnp.where((last >= 0).reshape(at.shape), finals, initial.astype(states.dtype))


def selective_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    segment_ids: jax.Array,
    initial: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Mamba's selective scan: `x, dt [B, T, D]` (dt after softplus), `A [D, N]`, `B, C [B, T, N]`, `D [D]`.

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t + D x_t, per run from `initial
    [B, R, D, N]` (zeros by default); an associative scan over T in float32. Returns (`y [B, T, D]`,
    the states after each of the R runs, None without `initial`).
    """
    f32 = jnp.float32
    dt, x = identity_on_padding(dt.astype(f32), x.astype(f32), segment_ids)
    decay = jnp.exp(dt[..., None] * A.astype(f32))  # [B, T, D, N]
    inputs = (dt * x)[..., None] * B.astype(f32)[:, :, None, :]  # [B, T, D, N]
    states, finals = _segmented_scan(decay, inputs, segment_ids, initial)
    y = jnp.einsum("btdn,btn->btd", states, C.astype(f32)) + x * D.astype(f32)
    return y, finals


def ssd_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    segment_ids: jax.Array,
    initial: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Mamba-2's recurrence as an associative scan (the ragged serving path), arguments as in
    `ssd_chunked`, with per-run `initial [B, R, H, P, N]`; returns (`y`, the R runs' final states)."""
    f32 = jnp.float32
    dt, x = identity_on_padding(dt.astype(f32), x.astype(f32), segment_ids)
    heads_per_group = x.shape[2] // B.shape[2]
    Bh = jnp.repeat(B.astype(f32), heads_per_group, axis=2)  # [B, T, H, N]
    Ch = jnp.repeat(C.astype(f32), heads_per_group, axis=2)
    decay = jnp.exp(dt * A.astype(f32))[..., None, None]  # [B, T, H, 1, 1]
    inputs = (dt[..., None] * x)[..., None] * Bh[:, :, :, None, :]  # [B, T, H, P, N]
    states, finals = _segmented_scan(jnp.broadcast_to(decay, inputs.shape), inputs, segment_ids, initial)
    y = jnp.einsum("bthpn,bthn->bthp", states, Ch) + x * D.astype(f32)[:, None]
    return y, finals


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
    the state, which reaches a chunk's tokens only while their run continues. The row's
    first run starts from `state [B, H, P, N]` (zeros by default). Returns (`y [B, T, H, P]`,
    the state after each row's last real token `[B, H, P, N]`).
    """
    initial = None if state is None else state[:, None]
    y, h_end, _ = _ssd_chunks(x, dt, A, B, C, D, segment_ids, chunk, initial)
    return y, h_end


def ssd_chunked_states(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                       segment_ids: jax.Array, chunk: int, initial: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`ssd_chunked` with per-run states (the ragged serving path, `ssd_scan`'s contract): run r
    starts from `initial [B, R, H, P, N]`; returns (`y`, the states after each of the R runs).

    Chunks may hold several runs: the masks keep runs apart exactly, and a run that starts
    inside a chunk reads its own initial state there."""
    y, _, finals = _ssd_chunks(x, dt, A, B, C, D, segment_ids, chunk, initial)
    return y, finals


def _ssd_chunks(x, dt, A, B, C, D, segment_ids, chunk, initial):
    """The chunked SSD: (`y`, state after the row's last token, per-run finals or None without `initial`).

    Per token, its run either continues from the chunk before (its entering state is the state
    the scan carries into the chunk) or starts inside the chunk (its entering state is its
    run's initial state); `entry` is the log decay from that entry point to the token.
    """
    f32 = jnp.float32
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    dt, x = identity_on_padding(dt.astype(f32), x.astype(f32), segment_ids)
    runs, token_start, first, last = _run_layout(segment_ids, 1 if initial is None else initial.shape[1])
    pad = (-T) % chunk
    if pad:  # padding tokens are identity steps in the last run
        x, dt, B, C = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (x, dt, B, C))
        runs, token_start = (jnp.pad(a, [(0, 0), (0, pad)], mode="edge") for a in (runs, token_start))
    Q = x.shape[1] // chunk
    heads_per_group = H // G
    Bh = jnp.repeat(B.astype(f32), heads_per_group, axis=2)  # [B, T, H, N]
    Ch = jnp.repeat(C.astype(f32), heads_per_group, axis=2)

    def chunks(a):  # [B, Q*L, ...] -> [Q, B, L, ...]
        return jnp.moveaxis(a.reshape(b, Q, chunk, *a.shape[2:]), 1, 0)

    xs, dts, Bs, Cs, rs, starts = (chunks(a) for a in (x, dt, Bh, Ch, runs, token_start))
    log_decay = dts * A.astype(f32)  # [Q, B, L, H]
    cum = jnp.cumsum(log_decay, axis=2)
    chunk_start = (jnp.arange(Q, dtype=jnp.int32) * chunk)[:, None, None]
    starts_here = starts >= chunk_start  # [Q, B, L]: the token's run starts in this chunk
    local_start = jnp.clip(starts - chunk_start, 0, chunk - 1)
    cum_before_start = jnp.take_along_axis(cum - log_decay, local_start[..., None], axis=2)
    entry = cum - jnp.where(starts_here[..., None], cum_before_start, 0.0)  # [Q, B, L, H]
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    same_run = (rs[:, :, :, None] == rs[:, :, None, :]) & causal  # [Q, B, L(i), L(j)]
    diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [Q, B, i, j, H]
    weights = jnp.where(same_run[..., None], jnp.exp(jnp.where(same_run[..., None], diff, 0.0)), 0.0)
    scores = jnp.einsum("qbihn,qbjhn->qbijh", Cs, Bs) * weights
    y = jnp.einsum("qbijh,qbjh,qbjhp->qbihp", scores, dts, xs) + xs * D.astype(f32)[:, None]
    # Each chunk's own contribution to the state after its last token (its last run only).
    last_run = rs[:, :, -1]  # [Q, B]
    to_end = jnp.exp(cum[:, :, -1:, :] - cum) * (rs == last_run[..., None])[..., None]  # [Q, B, L, H]
    own = jnp.einsum("qblh,qblh,qblhn,qblhp->qbhpn", to_end, dts, Bs, xs)
    end_entry = jnp.exp(entry[:, :, -1])[..., None, None]  # [Q, B, H, 1, 1]
    fresh_end = starts_here[:, :, -1].reshape(Q, b, 1, 1, 1)  # the chunk's last run starts in it
    if initial is not None:
        initial = initial.astype(f32)
        own = own + jnp.where(fresh_end, end_entry * _per_token(initial, jnp.moveaxis(last_run, 0, 1)).swapaxes(0, 1), 0.0)
    carry_decay = jnp.where(fresh_end, 0.0, end_entry)

    def carry_over(h, inputs):
        decay, own_q = inputs
        return decay * h + own_q, h

    h_end, entering = jax.lax.scan(carry_over, jnp.zeros((b, H, P, N), f32), (carry_decay, own))
    # Tokens continuing the carried run read the chunk's entering state.
    carried = jnp.where(starts_here[..., None], 0.0, jnp.exp(entry))[..., None]  # [Q, B, L, H, 1]
    y = y + jnp.einsum("qblhn,qbhpn->qblhp", Cs, entering) * carried
    if initial is not None:  # tokens of runs starting in the chunk read their run's initial state
        fresh = jnp.where(starts_here[..., None], jnp.exp(entry), 0.0)[..., None]
        y = y + chunks(_read_initial(initial, runs, Ch)) * fresh
    y = jnp.moveaxis(y, 0, 1).reshape(b, Q * chunk, H, P)[:, :T]
    if initial is None:
        return y, h_end, None
    return y, h_end, _run_finals(initial, last, xs, dts, Bs, rs, cum, entry, starts_here, entering)


READ_BLOCK = 16  # tokens per step of `_read_initial`'s loop


def _read_initial(initial: jax.Array, runs: jax.Array, C: jax.Array) -> jax.Array:
    """`C_t . initial[run_t]` per token `[B, T, H, P]` (zeros past the R runs given): a loop over
    blocks of tokens, so the per-token states `[T, H, P, N]` never exist at once."""
    b, T = runs.shape
    R = initial.shape[1]
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, T))

    def read(token):
        c, row, run = token
        return jnp.einsum("hn,hpn->hp", c, initial[row, jnp.minimum(run, R - 1)]) * (run < R)

    out = jax.lax.map(read, (C.reshape(b * T, *C.shape[2:]), rows.reshape(-1), runs.reshape(-1)),
                      batch_size=READ_BLOCK)
    return out.reshape(b, T, *out.shape[1:])


def _run_finals(initial, last, xs, dts, Bs, rs, cum, entry, starts_here, entering):
    """The state after each run's last token `[B, R, H, P, N]`, from that token's chunk: the run's
    tokens there, plus its entering state (carried or initial) decayed to that token."""
    Q, b, L = rs.shape
    R = initial.shape[1]
    at = jnp.maximum(last, 0)  # [B, R] token index of each run's end
    q, i = at // L, at % L
    rows = jnp.arange(b)[:, None]

    def pick(a):  # [Q, B, L, ...] -> [B, R, L, ...]: the chunk of each run's end
        return a[q, rows]

    def at_end(a):  # [Q, B, L, ...] -> [B, R, ...]: at each run's end token
        return a[q, rows, i]

    run_tokens = (pick(rs) == jnp.arange(R)[None, :, None]) & (jnp.arange(L) <= i[..., None])  # [B, R, L]
    decay = jnp.exp(jnp.where(run_tokens[..., None], at_end(cum)[:, :, None] - pick(cum), 0.0)) * run_tokens[..., None]
    own = jnp.einsum("brlh,brlh,brlhn,brlhp->brhpn", decay, pick(dts), pick(Bs), pick(xs))
    entered = jnp.where(at_end(starts_here).reshape(b, R, 1, 1, 1), initial, entering[q, rows])
    finals = own + jnp.exp(at_end(entry))[..., None, None] * entered
    return jnp.where((last >= 0).reshape(b, R, 1, 1, 1), finals, initial)


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
