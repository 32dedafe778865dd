"""Rotary position embeddings and their context-extension variants.

Frequencies follow transformers' `modeling_rope_utils` definitions so logits match
the reference: default, linear (position interpolation), dynamic NTK, YaRN,
LongRoPE (Phi-3) and llama3 smoothing, each with optional partial rotary.

Dynamic NTK and LongRoPE depend on the longest position in the batch; both are
computed inside the traced function from `positions`, so one compiled step serves
every length.

Glossary: B batch, T tokens, H heads, D head_dim, R rotary_dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from model_lib.config import RopeConfig


def _base_inv_freq(theta: float | np.ndarray, rotary_dim: int) -> np.ndarray:
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim
    return (1.0 / (theta**exponents)).astype(np.float32)


def _llama3_inv_freq(rope: RopeConfig) -> np.ndarray:
    inv_freq = _base_inv_freq(rope.theta, rope.rotary_dim)
    old_context = rope.original_max_position
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig) -> tuple[np.ndarray, float]:
    dim, base, factor = rope.rotary_dim, rope.theta, rope.factor
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position / (rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs
    ) * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def _longrope_attention_factor(rope: RopeConfig) -> float:
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(rope.factor) / math.log(rope.original_max_position))


def rope_frequencies(rope: RopeConfig, seq_lens: jnp.ndarray) -> tuple[jnp.ndarray, float | jnp.ndarray]:
    """Inverse frequencies (float32) and the cos/sin multiplier.

    `seq_lens [..., T]` is the length of each token's sequence, which dynamic NTK
    and LongRoPE depend on; looking at each sequence's own length keeps its logits
    independent of what else is in the batch. The frequencies are `[R/2]`, or
    `[..., T, R/2]` for those two kinds (LongRoPE's per-regime multiplier is `[..., T, 1]`).
    """
    kind = rope.kind
    if kind == "default":
        return jnp.asarray(_base_inv_freq(rope.theta, rope.rotary_dim)), 1.0
    if kind == "linear":
        return jnp.asarray(_base_inv_freq(rope.theta, rope.rotary_dim) / rope.factor), 1.0
    if kind == "llama3":
        return jnp.asarray(_llama3_inv_freq(rope)), 1.0
    if kind == "yarn":
        inv_freq, attention_factor = _yarn(rope)
        return jnp.asarray(inv_freq), attention_factor
    seq_len = seq_lens[..., None]
    if kind == "dynamic":
        # NTK-aware base growth once the sequence runs past the trained length.
        seq_len = jnp.maximum(seq_len, rope.max_position).astype(jnp.float32)
        if rope.dynamic_power_of_two:
            seq_len = rope.max_position * 2.0 ** jnp.ceil(jnp.log2(seq_len / rope.max_position))
        dim = rope.rotary_dim
        base = rope.theta * ((rope.factor * seq_len / rope.max_position) - (rope.factor - 1)) ** (dim / (dim - 2))
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        return 1.0 / (base**exponents), 1.0
    if kind == "longrope":
        base = _base_inv_freq(rope.theta, rope.rotary_dim)
        short = base / np.asarray(rope.short_factor, np.float32)
        long = base / np.asarray(rope.long_factor, np.float32)
        use_long = seq_len > rope.original_max_position
        attention_factor = _longrope_attention_factor(rope)
        if rope.short_mscale is not None and rope.long_mscale is not None:
            attention_factor = jnp.where(use_long, rope.long_mscale, rope.short_mscale).astype(jnp.float32)
        return jnp.where(use_long, jnp.asarray(long), jnp.asarray(short)), attention_factor
    raise ValueError(f"unsupported rope type {kind!r}")


def mrope_axes(rope: RopeConfig) -> np.ndarray:
    """M-RoPE: which position row (0 temporal, 1 height, 2 width) drives each of the `R/2` frequencies.

    Sectioned (Qwen2-VL): the first `section[0]` frequencies follow t, the next `section[1]` h, the
    rest w. Interleaved (Qwen3-VL): frequency j follows h when `j % 3 == 1 and j < 3 * section[1]`,
    w when `j % 3 == 2 and j < 3 * section[2]`, else t.
    """
    half = rope.rotary_dim // 2
    section = rope.mrope_section
    if len(section) != 3 or sum(section) != half:
        raise ValueError(f"mrope_section {list(section)} must be three sizes summing to rotary_dim / 2 ({half})")
    if not rope.mrope_interleaved:
        return np.repeat(np.arange(3), section)
    j = np.arange(half)
    axes = np.zeros(half, np.int64)
    axes[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axes[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return axes


def rotary_cos_sin(
    rope: RopeConfig, positions: jnp.ndarray, seq_lens: jnp.ndarray, dtype: jnp.dtype
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin `[..., T, R/2]` for integer positions `[..., T]` (see `rope_frequencies`).

    With `rope.mrope_section`, `positions` may be `[3, ..., T]` (one row per M-RoPE axis); plain
    `[..., T]` positions then drive all three axes (text-only input).
    """
    def compute() -> tuple[jnp.ndarray, jnp.ndarray]:
        inv_freq, attention_factor = rope_frequencies(rope, seq_lens)
        if rope.mrope_section:
            per_token = positions
            if per_token.ndim == seq_lens.ndim:
                per_token = jnp.broadcast_to(per_token[None], (3, *per_token.shape))
            per_freq = jnp.moveaxis(per_token[mrope_axes(rope)], 0, -1)  # [..., T, R/2]: each frequency's position
            angles = per_freq.astype(jnp.float32) * inv_freq
        else:
            angles = positions.astype(jnp.float32)[..., None] * inv_freq
        return (jnp.cos(angles) * attention_factor).astype(dtype), (jnp.sin(angles) * attention_factor).astype(dtype)

    cos, sin = compute()
    if positions.size == 0:
        return cos, sin
    # Fused into the rotation, XLA:CPU evaluates cos and sin again for every head of every token in every layer
    # (4% of a 1024-token SmolLM2 prefill on 2 cores). Out of a conditional it cannot fuse through, they are
    # computed once per step and read. Its other branch computes the same values, so the predicate only has to
    # be opaque; an `optimization_barrier` does not do it (XLA:CPU expands barriers before fusing), nor do two
    # identical branches (XLA drops the conditional).
    return jax.lax.platform_dependent(
        cpu=lambda: jax.lax.cond(positions.reshape(-1)[0] >= 0, lambda: (cos, sin), compute),
        default=lambda: (cos, sin))


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, interleaved: bool) -> jnp.ndarray:
    """Rotate the first R features of each head of `x [..., T, H, D]`.

    cos/sin are `[..., T, R/2]`; features past R pass through (partial rotary).
    """
    rotary_dim = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        rotated = rotated.reshape(x_rot.shape)
    else:
        x1, x2 = jnp.split(x_rot, 2, axis=-1)
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated, x_pass], axis=-1) if x_pass.shape[-1] else rotated
