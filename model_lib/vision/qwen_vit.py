"""The Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision transformers (HF `visual.*`) as Flax NNX modules.

An image arrives as the image processor made it: `[N, C * Tp * P * P]` flattened patches in
merge-block order (every `m x m` block of neighbouring patches consecutive) and its grid
`(t, h, w)` in patches. The patch embedding is the stride-equal Conv3d as one matmul; each
block attends bidirectionally within a frame (Qwen2-VL) or, in Qwen2.5-VL, within windows of
`window_size` pixels except in `fullatt_block_indexes`; queries and keys rotate by 2D RoPE
(half the head on the patch row, half on its column); the `PatchMerger` concatenates each
`m x m` block (`m^2 E` wide) and projects it to the text width.

Qwen3-VL adds a learned `[S*S, E]` position table (`pos_embed`), bilinearly resampled (corners
aligned) to each image's `h x w` grid and added to the patch embeddings, and DeepStack: after
each block of `deepstack_indexes` a merger of its own (LayerNorm over the `m^2 E` merged row)
makes one more feature set, which the language model adds to its hidden states at the image
tokens after its first layers. The tower's output row then holds every set side by side:
`[U, (1 + K) F]`, the main merger's first.

Window attention reorders the merge blocks window by window (transformers' `window_index`);
`VisionLayout` holds that order and the per-row attention segments, computed on the host from
the grid, so a compiled tower depends only on the number of patches.

Glossary: N patches, U merge units (N / m^2), E vision width, F text width, H heads, D head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.layers import Embed, LayerNorm
from model_lib.layers.activations import activation
from model_lib.layers.norms import RMSNorm
from model_lib.layers.rotary import apply_rotary
from model_lib.vision.clip import PatchConv, _linear  # a replicated linear with bias

MAX_VISION_LAYERS = 256  # bounds on sizes read from a config
MAX_PATCH_SIZE = 1024


@dataclass(frozen=True)
class QwenVisionConfig:
    """A Qwen-VL ViT. `norm` "layer" (Qwen2-VL) or "rms" (Qwen2.5-VL, also the merger's `ln_q`);
    `gated_mlp`: SwiGLU `gate_proj/up_proj/down_proj` (2.5) instead of `fc1/fc2`; `window_size`
    in pixels (0: every block attends over the whole frame). The bias flags and `norm_eps` are the
    blocks' (GLM-4.1V's tower, `model_lib/vision/glm4v_vit.py`, sets them otherwise)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    activation: str = "quick_gelu"
    norm: str = "layer"
    gated_mlp: bool = False
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    patch_bias: bool = False  # the patch Conv3d has a bias (Qwen3-VL)
    num_position_embeddings: int = 0  # a learned square position table, resampled per image (Qwen3-VL); 0: none
    deepstack_indexes: tuple[int, ...] = ()  # blocks whose output feeds a DeepStack merger (Qwen3-VL)
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.depth <= MAX_VISION_LAYERS:
            raise ValueError(f"vision depth must be in [1, {MAX_VISION_LAYERS}], got {self.depth}")
        if not 0 < self.patch_size <= MAX_PATCH_SIZE or not 0 < self.temporal_patch_size <= MAX_PATCH_SIZE:
            raise ValueError(f"patch sizes must be in [1, {MAX_PATCH_SIZE}]")
        if not 0 < self.spatial_merge_size <= 16:
            raise ValueError(f"spatial_merge_size must be in [1, 16], got {self.spatial_merge_size}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision width {self.hidden_size} must split into {self.num_heads} heads "
                             "whose width is a multiple of 4 (2D rotary)")
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"unknown vision norm {self.norm!r}")
        if self.window_size and self.window_size % (self.spatial_merge_size * self.patch_size):
            raise ValueError(f"window_size {self.window_size} is not a multiple of "
                             f"spatial_merge_size x patch_size ({self.spatial_merge_size * self.patch_size})")
        if any(not 0 <= i < self.depth for i in self.fullatt_block_indexes):
            raise ValueError(f"fullatt_block_indexes {list(self.fullatt_block_indexes)} out of range "
                             f"for {self.depth} blocks")
        side = self.position_grid_side
        if self.num_position_embeddings < 0 or side * side != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {self.num_position_embeddings} is not a square number")
        if any(not 0 <= i < self.depth for i in self.deepstack_indexes) or \
                len(set(self.deepstack_indexes)) != len(self.deepstack_indexes):
            raise ValueError(f"deepstack_visual_indexes {list(self.deepstack_indexes)} must be distinct blocks "
                             f"of the {self.depth}")

    @property
    def position_grid_side(self) -> int:
        """Side of the learned position table (0 without one)."""
        return int(round(max(self.num_position_embeddings, 0) ** 0.5))

    @property
    def feature_sets(self) -> int:
        """Feature sets per output row: the main merger's and one per DeepStack merger."""
        return 1 + len(self.deepstack_indexes)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_features(self) -> int:
        """Width of one flattened patch row: `C * Tp * P * P`."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@jax.tree_util.register_dataclass
@dataclass
class VisionLayout:
    """Host arrays of one image for the tower, in the windowed row order (identity without windows)."""

    order: np.ndarray  # [N] patch rows in processing order
    positions: np.ndarray  # [N, 2] (row, column) of each processed patch
    frames: np.ndarray  # [N] attention segment of full-attention blocks (the frame)
    windows: np.ndarray  # [N] attention segment of windowed blocks
    restore: np.ndarray  # [U] merged row -> processed unit (undoes the window order)
    position_taps: np.ndarray  # [N, 4] rows of the learned position table to mix ([N, 0] without one)
    position_weights: np.ndarray  # [N, 4] their bilinear weights


def _block_positions(t: int, h: int, w: int, m: int) -> np.ndarray:
    """(row, column) of each patch in merge-block order: `[t * h * w, 2]`."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // m, m, w // m, m)
    rows, cols = (a.reshape(shape).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols))
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1))


def _window_units(t: int, h: int, w: int, units_per_window: int) -> tuple[np.ndarray, np.ndarray]:
    """(merge units in window order, each one's window id) for a grid of `t x h x w` units."""
    n = units_per_window
    index = np.arange(t * h * w).reshape(t, h, w)
    pad_h, pad_w = -h % n, -w % n
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
    nh, nw = (h + pad_h) // n, (w + pad_w) // n
    windows = padded.reshape(t, nh, n, nw, n).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, n * n)
    window_ids = np.broadcast_to(np.arange(windows.shape[0])[:, None], windows.shape)
    keep = windows >= 0
    return windows[keep], window_ids[keep]


def _bilinear_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps into a `side`-long table and their weights for positions `index` of an axis of `size`,
    resampled with aligned corners (torch's `interpolate(bilinear, align_corners=True)`, edges clamped)."""
    source = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(source)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    weights = np.clip(1 - np.abs(source[:, None] - floor[:, None] - np.arange(2)), 0, None)
    return taps, weights.astype(np.float32)


def position_taps(positions: np.ndarray, h: int, w: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(`[N, 4]` table rows, `[N, 4]` weights) resampling a `side x side` position table to an `h x w` grid
    at the patches' `positions [N, 2]` (row, column)."""
    if not side:
        return np.zeros((len(positions), 0), np.int32), np.zeros((len(positions), 0), np.float32)
    rows, row_weights = _bilinear_taps(positions[:, 0], h, side)
    cols, col_weights = _bilinear_taps(positions[:, 1], w, side)
    taps = (rows[:, :, None] * side + cols[:, None, :]).reshape(-1, 4)
    return taps.astype(np.int32), (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)


def vision_layout(config: QwenVisionConfig, grid: tuple[int, int, int]) -> VisionLayout:
    """The processing order and attention segments of an image of `grid` (t, h, w) patches."""
    t, h, w = grid
    m = config.spatial_merge_size
    if min(grid) <= 0 or h % m or w % m:
        raise ValueError(f"image grid {list(grid)} must be positive with h and w multiples of {m}")
    unit = m * m
    units = t * (h // m) * (w // m)
    if config.window_size:
        order_units, window_of_unit = _window_units(t, h // m, w // m, config.window_size // m // config.patch_size)
    else:
        order_units, window_of_unit = np.arange(units), np.arange(units) // ((h // m) * (w // m))
    order = (order_units[:, None] * unit + np.arange(unit)).reshape(-1)
    frames = order // (h * w)
    positions = _block_positions(t, h, w, m)[order]
    taps, weights = position_taps(positions, h, w, config.position_grid_side)
    return VisionLayout(
        order=order.astype(np.int32),
        positions=positions.astype(np.int32),
        frames=frames.astype(np.int32),
        windows=np.repeat(window_of_unit, unit).astype(np.int32),
        restore=np.argsort(order_units).astype(np.int32),
        position_taps=taps,
        position_weights=weights,
    )


def pad_layout(layout: VisionLayout, patches: int, units: int) -> VisionLayout:
    """`layout` of an image padded to `patches` rows (`units` merge units) for batched training: the padding
    rows read the patch rows past the image's (zeros), attend only among themselves (segment -1, so the
    image's rows come out unchanged) and come out as the last units. Their positions are 0, so GLM-4.1V's
    grid (the largest row and column + 1) stays the image's; their position-table weights are 0."""
    n, u = len(layout.order), len(layout.restore)
    if patches < n or units < u or patches * u != units * n:
        raise ValueError(f"cannot pad an image of {n} patches ({u} units) to {patches} ({units})")

    def pad(x: np.ndarray, size: int, value: Any) -> np.ndarray:
        filler = value if isinstance(value, np.ndarray) else np.full((size - len(x), *x.shape[1:]), value, x.dtype)
        return np.concatenate([x, filler.astype(x.dtype)])

    return VisionLayout(
        order=pad(layout.order, patches, np.arange(n, patches)),
        positions=pad(layout.positions, patches, 0),
        frames=pad(layout.frames, patches, -1),
        windows=pad(layout.windows, patches, -1),
        restore=pad(layout.restore, units, np.arange(u, units)),
        position_taps=pad(layout.position_taps, patches, 0),
        position_weights=pad(layout.position_weights, patches, 0),
    )


def _norm(config: QwenVisionConfig, dtype: jnp.dtype, width: int | None = None) -> nnx.Module:
    width = width or config.hidden_size
    if config.norm == "rms":
        return RMSNorm((width,), eps=config.norm_eps, weight_offset=0.0, dtype=dtype)
    return LayerNorm((width,), eps=config.norm_eps, use_bias=True, weight_offset=0.0, dtype=dtype)


def rotary_2d(config: QwenVisionConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[N, D/2]` of the axial rotary: the first half of the frequencies follow the row."""
    quarter = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    angles = (positions.astype(jnp.float32)[..., None] * inv_freq).reshape(positions.shape[0], -1)  # [N, D/2]
    return jnp.cos(angles), jnp.sin(angles)


class VisionAttention(nnx.Module):
    def __init__(self, config: QwenVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        self.qkv = _linear(config.hidden_size, 3 * config.hidden_size, dtype, rngs, bias=config.qkv_bias)
        self.proj = _linear(config.hidden_size, config.hidden_size, dtype, rngs, bias=config.proj_bias)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array) -> jax.Array:
        n, e = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, 3, self.num_heads, -1), 1, 0)  # each [N, H, D]
        q, k = (apply_rotary(t.astype(jnp.float32), cos, sin, interleaved=False) for t in (q, k))
        scores = jnp.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
        scores = jnp.where(segments[:, None] == segments[None, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("hqk,khd->qhd", probs, v.astype(jnp.float32)).astype(x.dtype)
        return self.proj(out.reshape(n, e))


class VisionMlp(nnx.Module):
    """`fc2(act(fc1(x)))`, or SwiGLU-style `down_proj(act(gate_proj(x)) * up_proj(x))` when gated."""

    def __init__(self, config: QwenVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        e, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.act = activation(config.activation)
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_proj, self.up_proj, self.down_proj = (
                _linear(e, i, dtype, rngs, bias=bias), _linear(e, i, dtype, rngs, bias=bias),
                _linear(i, e, dtype, rngs, bias=bias))
        else:
            self.fc1, self.fc2 = _linear(e, i, dtype, rngs, bias=bias), _linear(i, e, dtype, rngs, bias=bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, config: QwenVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.norm1 = _norm(config, dtype)
        self.attn = VisionAttention(config, dtype, rngs=rngs)
        self.norm2 = _norm(config, dtype)
        self.mlp = VisionMlp(config, dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """`ln_q`, then each merge block's `m^2` rows side by side through `fc1`, GELU, `fc2` (HF `mlp.0`, `mlp.2`;
    Qwen3-VL `norm`, `linear_fc1`, `linear_fc2`). `postshuffle`: the norm runs on the merged `m^2 E` rows
    (Qwen3-VL's DeepStack mergers)."""

    def __init__(self, config: QwenVisionConfig, dtype: jnp.dtype, *, postshuffle: bool = False, rngs: nnx.Rngs):
        wide = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = _norm(config, dtype, wide if postshuffle else None)
        self.fc1 = _linear(wide, wide, dtype, rngs)
        self.fc2 = _linear(wide, config.out_hidden_size, dtype, rngs)
        self.wide = wide
        self.postshuffle = postshuffle

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.postshuffle:
            x = x.reshape(-1, self.wide)
        x = self.ln_q(x).reshape(-1, self.wide)  # [U, m^2 E]
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class QwenVisionTower(nnx.Module):
    """`features(patches, layout)`: `[N, C*Tp*P*P]` -> `[U, (1 + K) F]`, one row per image placeholder token
    (K DeepStack sets after the main one; K = 0 before Qwen3-VL)."""

    def __init__(self, config: QwenVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.config = config
        self.patch_embed = PatchEmbed.create(config, dtype, rngs, bias=config.patch_bias)
        self.pos_embed = (Embed(config.num_position_embeddings, config.hidden_size, axes=(None, None), dtype=dtype,
                                init_std=0.02, rngs=rngs) if config.num_position_embeddings else None)
        self.blocks = nnx.List([VisionBlock(config, dtype, rngs=rngs) for _ in range(config.depth)])
        self.merger = PatchMerger(config, dtype, rngs=rngs)
        deepstack = [PatchMerger(config, dtype, postshuffle=True, rngs=rngs) for _ in config.deepstack_indexes]
        self.deepstack_merger_list = nnx.List(deepstack) if deepstack else None

    def features(self, patches: jax.Array, layout: VisionLayout) -> jax.Array:
        x = self.patch_embed(patches[layout.order])  # [N, E]
        if self.pos_embed is not None:
            table = self.pos_embed.weight[...]
            x = x + jnp.einsum("nk,nke->ne", layout.position_weights, table[layout.position_taps]).astype(x.dtype)
        cos, sin = rotary_2d(self.config, layout.positions)
        full = set(self.config.fullatt_block_indexes) if self.config.window_size else set(range(self.config.depth))
        sets = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout.frames if i in full else layout.windows)
            if i in self.config.deepstack_indexes:
                sets.append(self.deepstack_merger_list[self.config.deepstack_indexes.index(i)](x))
        return jnp.concatenate([self.merger(x), *sets], axis=-1)[layout.restore]


class PatchEmbed(nnx.Module):
    """Holds the Conv3d (`proj.weight [E, C, Tp, P, P]`, optional `proj.bias`) under HF's names; a
    stride-equal convolution of flattened patch rows is one matmul."""

    def __init__(self, proj: PatchConv):
        self.proj = proj

    def __call__(self, rows: jax.Array) -> jax.Array:
        """`[N, C*Tp*P*P]` -> `[N, E]`."""
        weight = self.proj.weight[...]
        x = rows.astype(weight.dtype) @ weight.reshape(weight.shape[0], -1).T
        return x if self.proj.bias is None else x + self.proj.bias[...]

    @classmethod
    def create(cls, config: QwenVisionConfig, dtype: jnp.dtype, rngs: nnx.Rngs, *, bias: bool = False) -> "PatchEmbed":
        init = jax.nn.initializers.normal(0.02)
        shape = (config.hidden_size, config.in_channels, config.temporal_patch_size, config.patch_size,
                 config.patch_size)
        weight = nnx.Param(init(rngs.params(), shape, dtype))
        return cls(PatchConv(weight, nnx.Param(jnp.zeros((config.hidden_size,), dtype)) if bias else None))
