"""State-space mixers: Mamba (selective scan) and Mamba-2 (SSD), in HF's module layout.

Both sit where attention sits, behind the block's `input_layernorm`, under HF's attribute
name `mixer` (`backbone.layers.N.mixer.in_proj` ... in the checkpoints). The math lives in
`pallas_kernels/ssm/reference.py`; this file holds the weights and the data flow:

Mamba:   in_proj -> [x | z]; x -> causal conv1d -> act -> x_proj -> [dt_low | B | C];
         dt = softplus(dt_proj(dt_low)); y = scan(x, dt, A = -exp(A_log), B, C) + D x;
         out_proj(y * silu(z)).
Mamba-2: in_proj -> [z | xBC | dt]; xBC -> causal conv1d -> act -> [x | B | C];
         dt = clamp(softplus(dt + dt_bias)); y = SSD(x, dt, A = -exp(A_log), B, C) + D x;
         out_proj(gated_rms_norm(y, z)).

`mix` takes rows `[B, T, E]` with segment ids (0 = padding, packed sequences start fresh)
and, for serving, the states each row's first R runs (sequences) start from (conv tails
`[B, R, W-1, C]`, SSM states `[B, R, ...]`); it returns the states after those runs, so a
sequence continues chunk by chunk (see `pallas_kernels/ssm/reference.py` for runs).

Glossary: B rows, T tokens, E hidden, D intermediate channels, N state size, W conv width,
C conv channels, R dt rank, H Mamba-2 heads, P head dim, G groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers.activations import activation
from model_lib.layers.attention import DenseBatch, PagedBatch
from model_lib.layers.linear import Linear
from pallas_kernels import ssm
from pallas_kernels.paged_attention.reference import token_layout

# Chunk length of the ragged serving SSD: its per-sequence final states read each sequence's last
# chunk, so temporaries grow with sequences x chunk (benchmarks/ssm_scan.py: 64 beats 256 at 32 sequences).
SERVING_CHUNK = 64
SSMState = tuple[jax.Array, jax.Array]  # (conv tails [B, R, W-1, C], SSM states [B, R, D, N] or [B, R, H, P, N])


class Conv1d(nnx.Module):
    """Depthwise conv weights in HF's `nn.Conv1d` layout: `weight [C, 1, W]`, `bias [C]`."""

    def __init__(self, channels: int, width: int, *, use_bias: bool, dtype: jnp.dtype, init_std: float, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(init_std)
        self.weight = nnx.Param(init(rngs.params(), (channels, 1, width), dtype), logical_axes=(None, None, None))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype), logical_axes=(None,)) if use_bias else None

    def __call__(self, x: jax.Array, segment_ids: jax.Array, tail: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """`x [B, T, C]` -> (conv output `[B, T, C]` float32, new tails `[B, R, W-1, C]`).

        Rows of one token continuing from a tail (decode) take `conv1d_step`."""
        bias = None if self.bias is None else self.bias[...]
        weight = self.weight[...][:, 0, :]
        if tail is None or x.shape[1] != 1:
            return ssm.causal_conv1d(x, weight, bias, segment_ids, tail)
        out, new = ssm.conv1d_step(x[:, 0], weight, bias, tail[:, 0])
        return out[:, None], _keep_on_padding(segment_ids, new[:, None], tail)


def _keep_on_padding(segment_ids: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """A one-token step's states `[B, 1, ...]`: rows whose token is padding keep their old state."""
    return jnp.where((segment_ids[:, 0] != 0).reshape((-1,) + (1,) * (new.ndim - 1)), new, old.astype(new.dtype))


def _vector(shape: tuple[int, ...], value: jax.Array, dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(value.astype(dtype).reshape(shape), logical_axes=(None,) * len(shape))


class _Mixer(nnx.Module):
    """What both mixers share: the projections in and out, the conv, A_log and D."""

    def __init__(self, config: ModelConfig, in_features: int, conv_channels: int, a_shape: tuple[int, ...], *, rngs: nnx.Rngs):
        dtype, std = jnp.dtype(config.dtype), config.initializer_range
        common = dict(dtype=dtype, init_std=std, rngs=rngs)
        self.conv_kernel = config.ssm_conv_kernel
        self.activation = config.ssm_activation
        self.in_proj = Linear(config.hidden_size, in_features, axes=("embed", None), use_bias=config.ssm_bias, **common)
        self.conv1d = Conv1d(conv_channels, config.ssm_conv_kernel, use_bias=config.ssm_conv_bias, **common)
        # S4D-real initialisation (A = -[1..N]) as the reference classes; checkpoints overwrite it.
        a = jnp.broadcast_to(jnp.arange(1, a_shape[-1] + 1, dtype=jnp.float32), a_shape)
        self.A_log = _vector(a_shape, jnp.log(a), dtype)
        self.D = _vector(a_shape[:1], jnp.ones(a_shape[:1]), dtype)
        self.out_proj = Linear(config.ssm_intermediate_size, config.hidden_size, axes=(None, "embed"),
                               use_bias=config.ssm_bias, **common)

    def __call__(
        self, x: jax.Array, batch: DenseBatch | PagedBatch, cache: SSMState | None = None
    ) -> tuple[jax.Array, SSMState | None]:
        """The block's sublayer call: dense rows carry no state; a paged batch reads and writes its slots' states."""
        if isinstance(batch, DenseBatch):
            return self.mix(x, batch.segment_ids)[0], cache
        return self.serve(x, batch, cache)

    def serve(self, x: jax.Array, batch: PagedBatch, cache: SSMState) -> tuple[jax.Array, SSMState]:
        """A flat ragged step `x [T, E]`: one row whose runs are the step's sequences; a step where
        every sequence has at most one token (decode) is instead one row per sequence, which takes
        the per-token step functions.

        `cache` holds the pools `[num_slots, ...]` (`[L, num_slots, ...]` in a scanned stack, row
        `batch.layer`); sequence s reads and writes row `batch.slots[s]`. A sequence whose chunk
        starts at position 0 (new, or recomputed after preemption) starts from zeros, whatever
        its row holds. Sequences without a token this step (padding rows, which name the scratch
        row) leave their rows as they were.
        """
        if batch.slots is None:
            raise ValueError("a state-space layer serves only batches that name each sequence's slot (PagedBatch.slots)")
        meta = batch.meta
        owner, _, real = token_layout(meta, x.shape[0])  # [T] each token's sequence
        segment_ids = jnp.where(real, owner + 1, 0)[None]
        q_lens = meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]
        fresh, stepped = meta.kv_lens == q_lens, q_lens > 0  # [S]
        index = (batch.slots,) if batch.layer is None else (batch.layer, batch.slots)
        rows = tuple(pool[index] for pool in cache)

        def per_seq(flags: jax.Array, array: jax.Array) -> jax.Array:
            return flags.reshape((-1,) + (1,) * (array.ndim - 1))

        starts = tuple(jnp.where(per_seq(fresh, r), 0.0, r) for r in rows)

        def ragged() -> tuple[jax.Array, SSMState]:
            out, states = self.mix(x[None], segment_ids, tuple(r[None] for r in starts))
            return out[0], tuple(s[0] for s in states)

        def decode() -> tuple[jax.Array, SSMState]:
            at = jnp.minimum(meta.cu_q_lens[:-1], x.shape[0] - 1)  # each sequence's token
            out, states = self.mix(x[at][:, None], stepped[:, None].astype(jnp.int32), tuple(r[:, None] for r in starts))
            out = jnp.zeros((x.shape[0], out.shape[-1]), out.dtype).at[jnp.where(stepped, at, x.shape[0])].set(
                out[:, 0], mode="drop")
            return out, tuple(s[:, 0] for s in states)

        out, states = jax.lax.cond(jnp.all(q_lens <= 1), decode, ragged)
        # Sequences without a token this step (padding, warm-up) write their rows back unchanged.
        cache = tuple(
            pool.at[index].set(jnp.where(per_seq(stepped, old), state, old).astype(pool.dtype))
            for pool, old, state in zip(cache, rows, states)
        )
        return out, cache

    def convolve(self, xbc: jax.Array, segment_ids: jax.Array, tail: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Conv, activation, and zeros on padding (float32)."""
        out, tail = self.conv1d(xbc, segment_ids, tail)
        out = activation(self.activation)(out)
        return jnp.where((segment_ids != 0)[..., None], out, 0.0), tail

    def A(self) -> jax.Array:
        return -jnp.exp(self.A_log[...].astype(jnp.float32))


class MambaMixer(_Mixer):
    """Mamba's selective-scan mixer (HF `MambaMixer`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        D, N, R = config.ssm_intermediate_size, config.ssm_state_size, config.ssm_time_step_rank
        super().__init__(config, 2 * D, D, (D, N), rngs=rngs)
        dtype, std = jnp.dtype(config.dtype), config.initializer_range
        self.dt_rank, self.state_size = R, N
        self.x_proj = Linear(D, R + 2 * N, axes=(None, None), use_bias=False, dtype=dtype, init_std=std, rngs=rngs)
        self.dt_proj = Linear(R, D, axes=(None, None), use_bias=True, dtype=dtype, init_std=std, rngs=rngs)

    def mix(self, x: jax.Array, segment_ids: jax.Array, state: SSMState | None = None) -> tuple[jax.Array, SSMState]:
        """`x [B, T, E]` -> (`[B, T, E]`, states after the runs `state` starts; None in it without)."""
        tail, h = (None, None) if state is None else state
        xz = self.in_proj(x)
        xs, z = jnp.split(xz, 2, axis=-1)  # [B, T, D] each
        xs, tail = self.convolve(xs, segment_ids, tail)
        dt_low, B, C = jnp.split(self.x_proj(xs.astype(x.dtype)), [self.dt_rank, self.dt_rank + self.state_size], axis=-1)
        dt = jax.nn.softplus(self.dt_proj(dt_low).astype(jnp.float32))
        if h is not None and x.shape[1] == 1:  # one token per row (decode): the step function
            y, new = ssm.selective_state_step(xs[:, 0], dt[:, 0], self.A(), B[:, 0], C[:, 0], self.D[...], h[:, 0])
            y, h = y[:, None], _keep_on_padding(segment_ids, new[:, None], h)
        else:
            y, h = ssm.selective_scan(xs, dt, self.A(), B, C, self.D[...], segment_ids, h)
        y = y * jax.nn.silu(z.astype(jnp.float32))
        return self.out_proj(y.astype(x.dtype)), (tail, h)


class GatedRMSNorm(nnx.Module):
    """Mamba-2's `MambaRMSNormGated` (norm after the silu gate, per group of features)."""

    def __init__(self, size: int, group_size: int, eps: float, dtype: jnp.dtype):
        self.group_size, self.eps = group_size, eps
        self.weight = nnx.Param(jnp.ones((size,), dtype), logical_axes=(None,))

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        return ssm.gated_rms_norm(x, gate, self.weight[...], self.group_size, self.eps)


class Mamba2Mixer(_Mixer):
    """Mamba-2's SSD mixer (HF `Mamba2Mixer`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        D, N, H, G = config.ssm_intermediate_size, config.ssm_state_size, config.ssm_num_heads, config.ssm_num_groups
        conv_channels = D + 2 * G * N
        super().__init__(config, D + conv_channels + H, conv_channels, (H,), rngs=rngs)
        self.heads, self.head_dim, self.groups, self.state_size = H, config.ssm_head_dim, G, N
        self.chunk_size, self.dt_limit = config.ssm_chunk_size, config.ssm_dt_limit
        self.dt_bias = _vector((H,), jnp.zeros((H,)), jnp.dtype(config.dtype))
        self.norm = GatedRMSNorm(D, D // G, config.norm_eps, jnp.dtype(config.dtype))

    def mix(self, x: jax.Array, segment_ids: jax.Array, state: SSMState | None = None) -> tuple[jax.Array, SSMState]:
        """`x [B, T, E]` -> (`[B, T, E]`, states after the runs `state` starts; None in it without).

        Dense rows take the chunked SSD; rows continuing from states (serving) the chunked SSD with
        per-run states (`ssm.ssd_chunked_states`: the Pallas kernel where lowered for CUDA; the reference
        elsewhere, in chunks of at most `SERVING_CHUNK` tokens: the result does not depend on the
        length), or the step function when each row holds one token (decode).
        """
        tail, h = (None, None) if state is None else state
        b, t, _ = x.shape
        D, GN = self.heads * self.head_dim, self.groups * self.state_size
        z, xbc, dt = jnp.split(self.in_proj(x), [D, D + D + 2 * GN], axis=-1)
        xbc, tail = self.convolve(xbc, segment_ids, tail)
        xs, B, C = jnp.split(xbc, [D, D + GN], axis=-1)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        dt = jnp.clip(dt, *self.dt_limit)
        xs = xs.reshape(b, t, self.heads, self.head_dim)
        B, C = (a.reshape(b, t, self.groups, self.state_size) for a in (B, C))
        if h is None:
            y, h = ssm.ssd_chunked(xs, dt, self.A(), B, C, self.D[...], segment_ids, self.chunk_size)
        elif t == 1:  # one token per row (decode): the step function
            y, new = ssm.ssd_state_step(xs[:, 0], dt[:, 0], self.A(), B[:, 0], C[:, 0], self.D[...], h[:, 0])
            y, h = y[:, None], _keep_on_padding(segment_ids, new[:, None], h)
        else:
            chunk = min(self.chunk_size, SERVING_CHUNK, t)
            y, h = ssm.ssd_chunked_states(xs, dt, self.A(), B, C, self.D[...], segment_ids, chunk, h)
        y = self.norm(y.reshape(b, t, D), z)
        return self.out_proj(y.astype(x.dtype)), (tail, h)


def make_mixer(config: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> MambaMixer | Mamba2Mixer:
    kind = config.layer_attention_kind(layer)
    return MambaMixer(config, rngs=rngs) if kind == "mamba" else Mamba2Mixer(config, rngs=rngs)
