"""Mixture-of-experts feed-forward block: router, sorted dispatch, grouped matmul, combine.

Capacity-free (no token is dropped) and static-shaped: every token picks
`num_experts_per_tok` (k) experts, the `M = tokens * k` (token, expert) pairs are
sorted by expert, each expert's contiguous rows go through its own weights in
one grouped matmul (`grouped_matmul`, the semantics of `jax.lax.ragged_dot`), and
the weighted outputs return to their tokens through the inverse permutation.

Router kinds (`ModelConfig.router_kind`):
- "softmax": softmax over experts, top-k, renormalised when `norm_topk_prob`
  (Mixtral, Qwen-MoE, GraniteMoe, gpt-oss: top-k of the logits then a softmax
  over those k is the renormalised form); optional router bias (gpt-oss). With
  `moe_num_groups` > 1 the choice stays within the `moe_topk_group` groups whose
  best expert scores highest (DeepSeek-V2's `group_limited_greedy`).
- "sparsemixer": PhiMoE's inference-time sparsemixer (top-2, each weight a
  softmax over the experts within a relative `router_jitter` band of the pick).
- "sigmoid": Glm4-MoE / DeepSeek-V3: sigmoid scores; choice by score +
  `e_score_correction_bias` within the best `moe_topk_group` of `moe_num_groups`
  groups; weights are the plain scores, optionally renormalised.
- "topk_sigmoid": Llama 4: top-k of the logits, each weight the sigmoid of its logit.
All kinds then scale by `routed_scaling_factor`. With `moe_scale_input` (Llama 4) the
weight multiplies each (token, expert) pair's input and the expert outputs are summed
unweighted. An optional shared expert (a
plain MLP, Qwen2-MoE's behind a sigmoid gate) is added to the routed output.

The router's load-balancing loss (transformers' `load_balancing_loss_func`) is
available to the trainer without changing the forward's outputs:
`collect_router_logits(model)` makes every MoE block sow its router logits as an
`nnx.Intermediate`, `capture_router_logits(step_fn)` returns them next to the step's
result, and `router_aux_loss(config, logits, mask)` computes the loss.

Glossary: T tokens, E hidden, X experts, k experts per token, M = T * k, I expert width.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib import parallel
from model_lib.config import ModelConfig
from model_lib.layers.activations import activation
from model_lib.layers.linear import Linear, LoRAParam
from model_lib.layers.mlp import MLP
from model_lib.quantization.stacked import StackedWeight
from pallas_kernels.moe import grouped_matmul


class ExpertLinear(nnx.Module):
    """One projection per expert, stacked: `kernel [X, in, out]`, optional `bias [X, out]`.

    A quantized stack (`model_lib.quantization.StackedWeight`: int8, int4 or GGUF blocks per
    expert) replaces the kernel in the `quantized` slot, as in `Linear`. A LoRA adapter
    (`model_lib/lora.py`) holds one low-rank pair per expert, `lora_a [X, in, r]` and
    `lora_b [X, r, out]`, applied as two more grouped matmuls over the same sorted rows.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, axes: tuple[str, str, str],
                 use_bias: bool, dtype: jnp.dtype, init_std: float, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(init_std)
        self.kernel = nnx.Param(init(rngs.params(), (num_experts, in_features, out_features), dtype), logical_axes=axes)
        self.bias = (
            nnx.Param(jnp.zeros((num_experts, out_features), dtype), logical_axes=(axes[0], axes[2])) if use_bias else None
        )
        self.quantized: StackedWeight | None = nnx.data(None)
        self.lora_a: LoRAParam | None = nnx.data(None)
        self.lora_b: LoRAParam | None = nnx.data(None)
        self.lora_scale = 0.0

    @property
    def num_experts(self) -> int:
        return (self.kernel if self.quantized is None else self.quantized).shape[0]

    def __call__(
        self, x: jax.Array, group_sizes: jax.Array, expert_ids: jax.Array, with_bias: bool | jax.Array = True
    ) -> jax.Array:
        """`x [M, in]` sorted by expert (`expert_ids [M]`, counts `group_sizes [X]`) -> `[M, out]`.

        `with_bias` False (or a traced False) leaves the bias out: one partial-sum shard adds it.
        """
        if self.quantized is not None:
            y = self.quantized.grouped_matmul(x, group_sizes)
        else:  # the Pallas kernel on GPU where the shapes allow, jax.lax.ragged_dot elsewhere
            y = grouped_matmul(x, self.kernel[...].astype(x.dtype), group_sizes)
        if self.lora_a is not None:  # [M, in] -> [M, r] -> [M, out], each row through its expert's pair
            h = grouped_matmul(x, self.lora_a[...].astype(x.dtype), group_sizes)
            delta = grouped_matmul(h, self.lora_b[...].astype(x.dtype), group_sizes)
            y = y + delta * jnp.asarray(self.lora_scale, x.dtype)
        if self.bias is not None and with_bias is not False:
            bias = jnp.take(self.bias[...].astype(x.dtype), expert_ids, axis=0)
            y = y + (bias if with_bias is True else jnp.where(with_bias, bias, jnp.zeros_like(bias)))
        return y


class Router(nnx.Module):
    """`gate`: float32 expert logits `x @ kernel [E, X]` (+ bias), plus Glm4-MoE's `e_score_correction_bias [X]`.

    Not a `Linear`: LoRA's `all-linear` leaves the router alone, as PEFT does for
    transformers' router modules.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        init = jax.nn.initializers.normal(config.initializer_range)
        self.kernel = nnx.Param(init(rngs.params(), (config.hidden_size, config.num_experts), dtype), logical_axes=("embed", None))
        self.bias = nnx.Param(jnp.zeros((config.num_experts,), dtype), logical_axes=(None,)) if config.router_bias else None
        # transformers keeps this buffer in float32 whatever the model dtype.
        self.e_score_correction_bias = (
            nnx.Param(jnp.zeros((config.num_experts,), jnp.float32), logical_axes=(None,))
            if config.router_kind == "sigmoid"
            else nnx.data(None)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = jnp.dot(x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        if self.bias is not None:
            logits = logits + self.bias[...].astype(jnp.float32)
        return logits


def _sparsemixer_pick(scores: jax.Array, choice: jax.Array, jitter: float) -> tuple[jax.Array, jax.Array]:
    """One sparsemixer step: the argmax of `choice` and its softmax weight over the experts near it."""
    index = jnp.argmax(choice, axis=-1)[:, None]
    top = jnp.take_along_axis(choice, index, axis=-1)
    factor = jnp.maximum(jnp.abs(scores), top)
    masked = jnp.where((top - scores) / factor > 2 * jitter, -jnp.inf, choice)
    weight = jnp.take_along_axis(jax.nn.softmax(masked, axis=-1), index, axis=-1)
    return index, weight


def _within_best_groups(
    config: ModelConfig, scores: jax.Array, group_score: Callable[[jax.Array], jax.Array], outside: float
) -> jax.Array:
    """`scores [T, X]` with every expert outside the best `moe_topk_group` of `moe_num_groups` groups set to `outside`.

    `group_score` maps one token's grouped scores `[T, G, X / G]` to `[T, G]`.
    """
    grouped = scores.reshape(scores.shape[0], config.moe_num_groups, -1)  # [T, G, X/G]
    _, best = jax.lax.top_k(group_score(grouped), config.moe_topk_group)
    keep = jnp.zeros(grouped.shape[:2], bool).at[jnp.arange(best.shape[0])[:, None], best].set(True)
    return jnp.where(keep[:, :, None], grouped, outside).reshape(scores.shape)


def route(config: ModelConfig, logits: jax.Array, correction_bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """float32 router logits `[T, X]` -> (expert ids `[T, k]`, float32 weights `[T, k]`)."""
    k = config.num_experts_per_tok
    if config.router_kind == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        if config.moe_num_groups > 1:  # a group scores by its best expert; the others' scores become 0
            scores = _within_best_groups(config, scores, lambda g: jnp.max(g, axis=-1), 0.0)
        weights, ids = jax.lax.top_k(scores, k)
        if config.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    elif config.router_kind == "topk_sigmoid":
        top, ids = jax.lax.top_k(logits, k)
        weights = jax.nn.sigmoid(top)
    elif config.router_kind == "sparsemixer":
        first, w1 = _sparsemixer_pick(logits, logits, config.router_jitter)
        rest = jnp.put_along_axis(logits, first, -jnp.inf, axis=-1, inplace=False)
        second, w2 = _sparsemixer_pick(logits, rest, config.router_jitter)
        ids, weights = jnp.concatenate([first, second], -1), jnp.concatenate([w1, w2], -1)
    else:  # sigmoid, grouped
        scores = jax.nn.sigmoid(logits)
        choice = scores + correction_bias.astype(jnp.float32)
        if config.moe_num_groups > 1:  # a group scores by the sum of its best two
            choice = _within_best_groups(config, choice, lambda g: jnp.sum(jax.lax.top_k(g, 2)[0], axis=-1), -jnp.inf)
        _, ids = jax.lax.top_k(choice, k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        if config.norm_topk_prob:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return ids, weights * config.routed_scaling_factor


class Experts(nnx.Module):
    """The stacked gated experts: `down(act(gate(x)) * up(x))` per expert."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.act = activation(config.activation)
        self.swiglu_limit = config.expert_swiglu_limit
        self.swiglu_alpha = config.expert_swiglu_alpha
        n, hidden, inner = config.num_experts, config.hidden_size, config.moe_intermediate_size
        common = dict(use_bias=config.expert_bias, dtype=jnp.dtype(config.dtype), init_std=config.initializer_range, rngs=rngs)
        self.gate_proj = ExpertLinear(n, hidden, inner, axes=("expert", "embed", "mlp"), **common)
        self.up_proj = ExpertLinear(n, hidden, inner, axes=("expert", "embed", "mlp"), **common)
        self.down_proj = ExpertLinear(n, inner, hidden, axes=("expert", "mlp", "embed"), **common)

    @property
    def num_experts(self) -> int:
        """Experts held here (a shard's own under `shard_map`)."""
        return self.gate_proj.num_experts

    def __call__(
        self, x: jax.Array, group_sizes: jax.Array, expert_ids: jax.Array, lead_shard: bool | jax.Array = True
    ) -> jax.Array:
        """`lead_shard`: whether this shard adds the output bias (False on all but one width shard)."""
        gate = self.gate_proj(x, group_sizes, expert_ids)
        up = self.up_proj(x, group_sizes, expert_ids)
        if self.swiglu_limit is None:
            h = self.act(gate) * up
        else:
            limit = self.swiglu_limit
            gate = jnp.minimum(gate, limit)
            up = jnp.clip(up, -limit, limit)
            h = (up + 1) * gate * jax.nn.sigmoid(gate * self.swiglu_alpha)
        return self.down_proj(h, group_sizes, expert_ids, with_bias=lead_shard)


def apply_experts(
    experts: Experts, tokens: jax.Array, rows: jax.Array, keys: jax.Array, lead_shard: bool | jax.Array = True
) -> jax.Array:
    """Pair i is token `rows[i]` for local expert `keys[i]` (`>= experts.num_experts`: not here) -> `[R, E]`.

    Dispatch: the pairs are sorted by expert, each expert's contiguous rows go through
    one grouped matmul, and the outputs return to pair order (zeros for pairs not here).
    """
    num = experts.num_experts
    order = jnp.argsort(keys, stable=True)
    sorted_keys = keys[order]
    group_sizes = jnp.bincount(keys, length=num).astype(jnp.int32)
    y = experts(jnp.take(tokens, rows[order], axis=0), group_sizes, jnp.minimum(sorted_keys, num - 1), lead_shard)
    y = jnp.where((sorted_keys < num)[:, None], y, jnp.zeros((), y.dtype))
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return y[inverse]


def combine(y: jax.Array, weights: jax.Array) -> jax.Array:
    """Pair outputs `[T * k, E]` (token-major) weighted by `weights [T, k]` and summed per token: float32 `[T, E]`."""
    y = y.astype(jnp.float32) * weights.reshape(-1)[:, None]
    return jnp.sum(y.reshape(weights.shape[0], weights.shape[1], -1), axis=1)


class MoE(nnx.Module):
    """The MoE block that stands in the decoder layer's `mlp` slot."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.gate = Router(config, rngs=rngs)
        self.experts = Experts(config, rngs=rngs)
        self.shared_expert = (
            MLP(config, intermediate_size=config.shared_expert_size, rngs=rngs) if config.shared_expert_size else nnx.data(None)
        )
        self.shared_expert_gate = (
            Linear(config.hidden_size, 1, axes=("embed", None), use_bias=False, dtype=jnp.dtype(config.dtype),
                   init_std=config.initializer_range, rngs=rngs)
            if config.shared_expert_gate
            else nnx.data(None)
        )
        self.sow_router_logits = False

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, hidden = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, hidden)  # [T, E]
        logits = self.gate(tokens)  # [T, X] float32
        if self.sow_router_logits:
            self.sow(nnx.Intermediate, "router_logits", logits)
        correction = None if self.gate.e_score_correction_bias is None else self.gate.e_score_correction_bias[...]
        ids, weights = route(self.config, logits, correction)  # [T, k]
        # Under a mesh (`parallel.kernel_plan`) each expert shard runs its own experts.
        if self.config.moe_scale_input:
            # Each (token, expert) pair is its own row, scaled before its expert; unit combine weights.
            k = ids.shape[-1]
            pairs = (tokens[:, None, :] * weights[..., None].astype(tokens.dtype)).reshape(-1, hidden)  # [T*k, E]
            unit = jnp.ones((pairs.shape[0], 1), jnp.float32)
            out = parallel.routed_experts(self.experts, pairs, ids.reshape(-1, 1), unit, apply_experts, combine)
            out = jnp.sum(out.reshape(-1, k, hidden), axis=1).astype(x.dtype)
        else:
            out = parallel.routed_experts(self.experts, tokens, ids, weights, apply_experts, combine).astype(x.dtype)

        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = jax.nn.sigmoid(self.shared_expert_gate(tokens)) * shared
            out = out + shared
        return out.reshape(*lead, hidden)


def expert_layers(model: nnx.Module) -> dict[str, ExpertLinear]:
    """Our path ('model.layers.0.mlp.experts.gate_proj') -> ExpertLinear, for every expert projection."""
    return {".".join(map(str, path)): node for path, node in nnx.iter_graph(model) if isinstance(node, ExpertLinear)}


def moe_blocks(model: nnx.Module) -> list[MoE]:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, MoE)]


def collect_router_logits(model: nnx.Module, enabled: bool = True) -> None:
    """Make every MoE block sow its float32 router logits `[T, X]` (call outside jit, before tracing)."""
    for block in moe_blocks(model):
        block.sow_router_logits = enabled


def capture_router_logits(fn: Callable[..., Any]) -> Callable[..., tuple[Any, list[jax.Array]]]:
    """Wrap `fn(model, ...)` to return `(its result, [router logits [T, X] per MoE layer call, in order])`.

    Works inside `nnx.jit` / `nnx.grad`; the model must have had `collect_router_logits(model)`.
    """
    captured = nnx.capture(fn, nnx.Intermediate)

    def wrapped(model: nnx.Module, *args: Any, **kwargs: Any) -> tuple[Any, list[jax.Array]]:
        result, state = captured(model, *args, **kwargs)
        logits = []
        for path, value in sorted(nnx.to_flat_state(state), key=lambda item: _layer_order(item[0])):
            if path[-1] == "router_logits":
                logits.extend(value.get_value() if isinstance(value, nnx.Variable) else value)
        return result, logits

    return wrapped


def _layer_order(path: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)


def load_balancing_loss(
    router_logits: list[jax.Array], num_experts: int, top_k: int, attention_mask: jax.Array | None = None
) -> jax.Array:
    """transformers' `load_balancing_loss_func`: X * sum_x (tokens routed to x) * (mean router prob of x).

    Both factors are averaged over every layer's (non-padding) tokens; the token
    count sums the k choices. `attention_mask [B, T]` flattens to the `[B * T]` rows.
    """
    counts = jnp.zeros((num_experts,), jnp.float32)
    probs = jnp.zeros((num_experts,), jnp.float32)
    rows = jnp.zeros((), jnp.float32)
    for logits in router_logits:
        p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        _, chosen = jax.lax.top_k(p, top_k)
        mask = (
            jnp.ones((p.shape[0],), jnp.float32)
            if attention_mask is None
            else jnp.asarray(attention_mask, jnp.float32).reshape(-1)
        )
        counts = counts + jnp.sum(jax.nn.one_hot(chosen, num_experts) * mask[:, None, None], axis=(0, 1))
        probs = probs + jnp.sum(p * mask[:, None], axis=0)
        rows = rows + jnp.sum(mask)
    return jnp.sum((counts / rows) * (probs / rows)) * num_experts


def router_aux_loss(config: ModelConfig, router_logits: list[jax.Array], attention_mask: jax.Array | None = None) -> jax.Array:
    """The unweighted load-balancing loss of captured router logits (0 when there are none).

    The trainer adds `config.router_aux_loss_coef * router_aux_loss(...)` to its loss.
    """
    if not router_logits:
        return jnp.zeros((), jnp.float32)
    return load_balancing_loss(router_logits, config.num_experts, config.num_experts_per_tok, attention_mask)
