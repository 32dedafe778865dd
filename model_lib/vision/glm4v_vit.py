"""The GLM-4.1V vision transformer (HF `Glm4vVisionModel`, `model.visual.*`) as Flax NNX modules.

It takes the Qwen-VL tower's inputs (patch rows in merge-block order, one `VisionLayout` per image,
`model_lib/vision/qwen_vit.py`) and shares its blocks (RMSNorm, SwiGLU MLP without biases, 2D
rotary, attention within each frame), and differs around them:
- the patch Conv3d has a bias and is followed by `post_conv_layernorm`;
- learned absolute positions: a `G x G` table (`G = image_size / patch_size`) resampled to each
  image's `h x w` patch grid by bicubic `grid_sample` (`align_corners=False`, border padding,
  PyTorch's cubic coefficient -0.75), added after the patch embedding;
- after the blocks, `post_layernorm`, then each `m x m` merge block goes through the `downsample`
  Conv2d (stride m) to the text width, and the merger: `proj`, LayerNorm, GELU, then a SwiGLU.

Glossary: N patches, U merge units (N / m^2), E vision width, F text width, G position-table side.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.layers import Embed, LayerNorm
from model_lib.layers.activations import activation
from model_lib.layers.norms import RMSNorm
from model_lib.vision.clip import _linear
from model_lib.vision.qwen_vit import PatchEmbed, QwenVisionConfig, VisionBlock, VisionLayout, rotary_2d

CUBIC_A = -0.75  # PyTorch's cubic convolution coefficient (grid_sample and interpolate)


@dataclass(frozen=True)
class GlmVisionConfig(QwenVisionConfig):
    """GLM-4.1V's tower. `intermediate_size` is the blocks' MLP width (HF `out_hidden_size`), `out_hidden_size`
    the downsample's and merger's width, `merger_intermediate_size` the merger's SwiGLU width (HF
    `intermediate_size`); `position_grid` the side of the learned position table."""

    position_grid: int = 24
    merger_intermediate_size: int = 13696

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size:
            raise ValueError("GLM-4.1V's vision tower has no window attention")
        if not 0 < self.position_grid <= 1024:
            raise ValueError(f"the position table side (image_size / patch_size) must be in [1, 1024], "
                             f"got {self.position_grid}")


def _cubic_weights(t: jax.Array) -> jax.Array:
    """`t [N]` in [0, 1) -> the weights `[N, 4]` of the taps at -1, 0, 1, 2 (PyTorch's cubic convolution)."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def resample_positions(table: jax.Array, rows: jax.Array, cols: jax.Array, height: jax.Array,
                       width: jax.Array) -> jax.Array:
    """transformers' `F.grid_sample(table, grid, mode="bicubic", align_corners=False, padding_mode="border")` at
    the centres of an `height x width` patch grid: `table [G*G, E]`, patch `rows`/`cols [N]` -> `[N, E]` float32.

    Sample point of patch (r, c): normalised `2 (c + 0.5) / width - 1`, unnormalised `((x + 1) G - 1) / 2`
    into the table; the 4x4 taps around it are clamped to the table (border padding), interpolated along
    the columns first, then the rows, as PyTorch does."""
    side = int(round(table.shape[0] ** 0.5))
    grid = table.astype(jnp.float32).reshape(side, side, -1)  # [G, G, E]

    def taps(coord, size):
        normalised = ((coord.astype(jnp.float32) + 0.5) / size.astype(jnp.float32)) * 2 - 1
        source = ((normalised + 1) * side - 1) / 2
        start = jnp.floor(source)
        index = jnp.clip(start.astype(jnp.int32)[:, None] + jnp.arange(-1, 3), 0, side - 1)  # [N, 4]
        return index, _cubic_weights(source - start)

    y, wy = taps(rows, height)
    x, wx = taps(cols, width)
    values = grid[y[:, :, None], x[:, None, :]]  # [N, 4, 4, E]
    along_x = jnp.einsum("nyxe,nx->nye", values, wx)
    return jnp.einsum("nye,ny->ne", along_x, wy)


class VisionEmbeddings(nnx.Module):
    """HF `embeddings.position_embedding [G*G, E]`, resampled per image grid."""

    def __init__(self, config: GlmVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.position_embedding = Embed(config.position_grid**2, config.hidden_size, axes=(None, None), dtype=dtype,
                                        init_std=0.02, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """`x [N, E]` plus the table sampled at `positions [N, 2]` (row, column). The layout covers one image,
        so its grid is the largest row and column + 1."""
        rows, cols = positions[:, 0], positions[:, 1]
        table = self.position_embedding.weight[...]
        sampled = resample_positions(table, rows, cols, rows.max() + 1, cols.max() + 1)
        return x + sampled.astype(table.dtype)


class Downsample(nnx.Module):
    """HF `downsample`: a Conv2d `weight [F, E, m, m]` with bias, stride m, over each merge block."""

    def __init__(self, config: GlmVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        m = config.spatial_merge_size
        shape = (config.out_hidden_size, config.hidden_size, m, m)
        self.weight = nnx.Param(jax.nn.initializers.normal(0.02)(rngs.params(), shape, dtype))
        self.bias = nnx.Param(jnp.zeros((config.out_hidden_size,), dtype))
        self.merge = m

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[N, E]` in merge-block order -> `[U, F]`."""
        blocks = x.reshape(-1, self.merge, self.merge, x.shape[-1])  # [U, m, m, E]
        return jnp.einsum("uije,feij->uf", blocks, self.weight[...]) + self.bias[...]


class PatchMerger(nnx.Module):
    """HF `merger`: `proj`, `post_projection_norm` (LayerNorm), GELU, then `down_proj(act(gate_proj) * up_proj)`."""

    def __init__(self, config: GlmVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        f, i = config.out_hidden_size, config.merger_intermediate_size
        self.proj = _linear(f, f, dtype, rngs, bias=False)
        self.post_projection_norm = LayerNorm((f,), eps=1e-5, use_bias=True, weight_offset=0.0, dtype=dtype)
        self.gate_proj = _linear(f, i, dtype, rngs, bias=False)
        self.up_proj = _linear(f, i, dtype, rngs, bias=False)
        self.down_proj = _linear(i, f, dtype, rngs, bias=False)
        self.act = activation(config.activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.gelu(self.post_projection_norm(self.proj(x)), approximate=False)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GlmVisionTower(nnx.Module):
    """`features(patches, layout)`: `[N, C*Tp*P*P]` -> `[U, F]`, one row per image placeholder token."""

    def __init__(self, config: GlmVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.config = config
        norm = dict(eps=config.norm_eps, weight_offset=0.0, dtype=dtype)
        self.patch_embed = PatchEmbed.create(config, dtype, rngs, bias=True)
        self.post_conv_layernorm = RMSNorm((config.hidden_size,), **norm)
        self.embeddings = VisionEmbeddings(config, dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(config, dtype, rngs=rngs) for _ in range(config.depth)])
        self.post_layernorm = RMSNorm((config.hidden_size,), **norm)
        self.downsample = Downsample(config, dtype, rngs=rngs)
        self.merger = PatchMerger(config, dtype, rngs=rngs)

    def features(self, patches: jax.Array, layout: VisionLayout) -> jax.Array:
        x = self.post_conv_layernorm(self.patch_embed(patches[layout.order]))  # [N, E]
        x = self.embeddings(x, layout.positions)
        cos, sin = rotary_2d(self.config, layout.positions)
        for block in self.blocks:
            x = block(x, cos, sin, layout.frames)
        return self.merger(self.downsample(self.post_layernorm(x)))
