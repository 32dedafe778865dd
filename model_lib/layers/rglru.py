"""RecurrentGemma's recurrent block (Griffin's temporal mixer), in transformers' module layout.

It sits where attention sits, behind the block's `input_layernorm`, under our name `mixer`
(transformers' `temporal_block`; its children keep HF names):

    y = act(linear_y(x));  u = conv_1d(linear_x(x));  u = rg_lru(u);  out = linear_out(u * y)

`conv_1d` is depthwise over `lru_width` channels with a tail of W-1 inputs; `rg_lru` gates its
input and its decay with block-diagonal projections (`ssm_num_heads` blocks) and runs the
recurrence of `pallas_kernels/rglru/reference.py`, restarting at position 0. Dense rows carry no
state; a flat serving step reads and writes each sequence's (conv tail `[W-1, D]`, state `[D]`).

Glossary: B rows, T tokens, E hidden, D lru_width, H gate blocks, I block width (D / H).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers.activations import activation
from model_lib.layers.attention import DenseBatch, PagedBatch
from model_lib.layers.linear import Linear
from model_lib.layers.slot_states import read_states, write_states
from model_lib.layers.ssm import Conv1d
from pallas_kernels import rglru
from pallas_kernels.paged_attention.reference import token_layout

RGLRUState = tuple[jax.Array, jax.Array]  # (conv tails [B, R, W-1, D], LRU states [B, R, D])


class RGLRU(nnx.Module):
    """HF `RecurrentGemmaRglru`: input and recurrence gates `[H, I, I]` (+ bias `[H, I]`), `recurrent_param [D]`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        D, H = config.ssm_intermediate_size, config.ssm_num_heads
        dtype, init = jnp.dtype(config.dtype), jax.nn.initializers.normal(config.initializer_range)

        def param(shape: tuple[int, ...]) -> nnx.Param:
            return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=(None,) * len(shape))

        self.heads = H
        self.recurrent_param = param((D,))
        self.input_gate_weight, self.input_gate_bias = param((H, D // H, D // H)), param((H, D // H))
        self.recurrent_gate_weight, self.recurrent_gate_bias = param((H, D // H, D // H)), param((H, D // H))

    def gate(self, x: jax.Array, weight: nnx.Param, bias: nnx.Param) -> jax.Array:
        """sigmoid of the block-diagonal projection of `x [B, T, D]`, float32."""
        blocks = x.reshape(*x.shape[:-1], self.heads, -1)  # [B, T, H, I]
        logits = jnp.einsum("bthi,hij->bthj", blocks, weight[...].astype(x.dtype)) + bias[...].astype(x.dtype)
        return jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(x.shape)

    def __call__(
        self, x: jax.Array, reset: jax.Array, segment_ids: jax.Array, initial: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """`x [B, T, D]`, `reset [B, T]` (position 0) -> (`[B, T, D]` float32, states after the runs `initial` starts)."""
        input_gate = self.gate(x, self.input_gate_weight, self.input_gate_bias)
        recurrent_gate = self.gate(x, self.recurrent_gate_weight, self.recurrent_gate_bias)
        return rglru.rg_lru(x, input_gate, recurrent_gate, self.recurrent_param[...], reset, segment_ids, initial)


class RecurrentBlock(nnx.Module):
    """HF `RecurrentGemmaRecurrentBlock`: linear_x / linear_y (gelu gate), conv_1d, rg_lru, linear_out."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        E, D = config.hidden_size, config.ssm_intermediate_size
        common = dict(use_bias=True, dtype=jnp.dtype(config.dtype), init_std=config.initializer_range, rngs=rngs)
        self.act = activation(config.activation)
        self.linear_y = Linear(E, D, axes=("embed", None), **common)
        self.linear_x = Linear(E, D, axes=("embed", None), **common)
        self.linear_out = Linear(D, E, axes=(None, "embed"), **common)
        self.conv_1d = Conv1d(D, config.ssm_conv_kernel, **common)
        self.rg_lru = RGLRU(config, rngs=rngs)

    def __call__(
        self, x: jax.Array, batch: DenseBatch | PagedBatch, cache: RGLRUState | None = None
    ) -> tuple[jax.Array, RGLRUState | None]:
        """The block's sublayer call: dense rows carry no state; a paged batch reads and writes its slots' states."""
        if isinstance(batch, DenseBatch):
            return self.mix(x, batch.positions, batch.segment_ids)[0], cache
        owner, positions, real = token_layout(batch.meta, x.shape[0])
        segment_ids = jnp.where(real, owner + 1, 0)[None]
        rows = read_states(cache, batch)
        out, states = self.mix(x[None], positions[None], segment_ids, tuple(row[None] for row in rows))
        return out[0], write_states(cache, batch, tuple(state[0] for state in states))

    def mix(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, state: RGLRUState | None = None
    ) -> tuple[jax.Array, RGLRUState]:
        """`x [B, T, E]` -> (`[B, T, E]`, states after the runs `state` starts; None in it without)."""
        tail, h = (None, None) if state is None else state
        y = self.act(self.linear_y(x))
        u, tail = self.conv_1d(self.linear_x(x), segment_ids, tail)
        reset = (positions == 0) & (segment_ids != 0)
        u, h = self.rg_lru(u.astype(x.dtype), reset, segment_ids, h)
        return self.linear_out(u.astype(x.dtype) * y), (tail, h)
