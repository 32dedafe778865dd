"""Qwen3-Next's Gated DeltaNet (HF `Qwen3NextGatedDeltaNet`), a linear-attention token mixer.

It sits where attention sits, behind `input_layernorm`; checkpoints name it `linear_attn`, held
here as the layer's `mixer` (the weight map renames it). The math lives in
`pallas_kernels/gated_delta/` (the reference, and the Pallas kernels that dense rows and serving steps
reach when lowered for CUDA); this file holds the weights and the data flow:

    in_proj_qkvz -> per q/k head group g: [q_g | k_g | v_g | z_g]; in_proj_ba -> [b_g | a_g]
    [q | k | v] -> causal conv1d (no bias) -> act; q, k l2-normalised (q also by K^-0.5)
    beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias)
    o = gated delta rule(q, k, v, g, beta); out_proj(rms_norm_gated(o, z) per value head)

Serving and the conv plumbing are the state-space mixers' (`model_lib/layers/ssm.py`): the state
is (conv tail `[W-1, 2 G K + H V]`, delta-rule state `[H, K, V]`), one row per engine slot.

Glossary: B rows, T tokens, E hidden, G q/k heads, H value heads, K key head dim, V value head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers.linear import Linear
from model_lib.layers.ssm import Conv1d, SSMState, _Mixer, _vector
from pallas_kernels import gated_delta


class GatedNorm(nnx.Module):
    """`Qwen3NextRMSNormGated`: a plain-weight RMSNorm over one value head, then the silu gate."""

    def __init__(self, size: int, eps: float, dtype: jnp.dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((size,), dtype), logical_axes=(None,))

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        return gated_delta.rms_norm_gated(x, gate, self.weight[...], self.eps)


class GatedDeltaNet(_Mixer):
    """The mixer's weights under HF's names. Reuses the state-space mixers' `__call__` / `serve`
    (slots, fresh sequences, padding rows), `convolve` and `A` = -exp(A_log); it has no `D`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype, std = jnp.dtype(config.dtype), config.initializer_range
        common = dict(dtype=dtype, init_std=std, rngs=rngs)
        G, H = config.ssm_num_groups, config.ssm_num_heads
        K, V = config.ssm_state_size, config.ssm_head_dim
        self.key_heads, self.value_heads, self.key_dim, self.value_dim = G, H, K, V
        self.conv_kernel, self.activation = config.ssm_conv_kernel, config.ssm_activation
        self.chunk_size = config.ssm_chunk_size
        E = config.hidden_size
        self.in_proj_qkvz = Linear(E, 2 * G * K + 2 * H * V, axes=("embed", None), use_bias=False, **common)
        self.in_proj_ba = Linear(E, 2 * H, axes=("embed", None), use_bias=False, **common)
        self.conv1d = Conv1d(2 * G * K + H * V, config.ssm_conv_kernel, use_bias=False, **common)
        self.dt_bias = _vector((H,), jnp.ones((H,)), dtype)
        self.A_log = _vector((H,), jnp.log(jnp.arange(1, H + 1, dtype=jnp.float32)), dtype)  # checkpoints overwrite it
        self.norm = GatedNorm(V, config.norm_eps, dtype)
        self.out_proj = Linear(H * V, E, axes=(None, "embed"), use_bias=False, **common)

    def mix(self, x: jax.Array, segment_ids: jax.Array, state: SSMState | None = None) -> tuple[jax.Array, SSMState]:
        """`x [B, T, E]` -> (`[B, T, E]`, states after the runs `state` starts; None in it without)."""
        tail, h = (None, None) if state is None else state
        b, t, _ = x.shape
        G, H, K, V = self.key_heads, self.value_heads, self.key_dim, self.value_dim
        per_group = H // G
        qkvz = self.in_proj_qkvz(x).reshape(b, t, G, 2 * K + 2 * per_group * V)
        q, k, v, z = jnp.split(qkvz, [K, 2 * K, 2 * K + per_group * V], axis=-1)
        beta, a = jnp.split(self.in_proj_ba(x).reshape(b, t, G, 2 * per_group), 2, axis=-1)
        qkv = jnp.concatenate([q.reshape(b, t, G * K), k.reshape(b, t, G * K), v.reshape(b, t, H * V)], axis=-1)
        qkv, tail = self.convolve(qkv, segment_ids, tail)
        q, k, v = jnp.split(qkv.astype(x.dtype), [G * K, 2 * G * K], axis=-1)
        q = gated_delta.l2_normalize(q.reshape(b, t, G, K)) * K**-0.5
        k = gated_delta.l2_normalize(k.reshape(b, t, G, K))
        beta = jax.nn.sigmoid(beta.reshape(b, t, H))
        dt = a.reshape(b, t, H).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        g = self.A()[None, None] * jax.nn.softplus(dt)  # log decay, <= 0
        o, h = gated_delta.gated_delta(q, k, v.reshape(b, t, H, V), g, beta, segment_ids, self.chunk_size, h)
        y = self.norm(o.astype(x.dtype), z.reshape(b, t, H, V))
        return self.out_proj(y.reshape(b, t, H * V)), (tail, h)
