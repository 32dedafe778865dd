"""Batches of grid-sized images (Qwen-VL, GLM-4.1V): padded patch rows and tower layouts, M-RoPE positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_lib.vision.glm4v_vit import GlmVisionConfig, GlmVisionTower
from model_lib.vision.mrope import ImageSpan, mrope_positions
from model_lib.vision.qwen_vit import QwenVisionConfig, QwenVisionTower, pad_layout, vision_layout
from training.data import Example, epoch_batches, make_batch, run_image_extent
from training.images import ExampleImage

SMALL = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, patch_size=4,
             spatial_merge_size=2)
TOWERS = {  # windows of 2x2 merge units and one full block; a resampled position table and DeepStack; GLM-4.1V's
    "qwen2_5": (QwenVisionTower, QwenVisionConfig(**SMALL, norm="rms", gated_mlp=True, window_size=16,
                                                  fullatt_block_indexes=(1,))),
    "qwen3": (QwenVisionTower, QwenVisionConfig(**SMALL, num_position_embeddings=9, deepstack_indexes=(0, 1))),
    "glm4v": (GlmVisionTower, GlmVisionConfig(**SMALL, norm="rms", position_grid=4, merger_intermediate_size=48)),
}


@pytest.mark.parametrize("tower", TOWERS)
def test_padding_leaves_the_image_rows_unchanged(tower):
    """A 4x12-patch image padded to 64 rows: its 12 feature rows are the unpadded tower's."""
    tower_class, config = TOWERS[tower]
    model = tower_class(config, jnp.float32, rngs=nnx.Rngs(0))
    layout = vision_layout(config, (1, 4, 12))
    patches = jax.random.normal(jax.random.key(1), (48, config.patch_features))
    padded = jnp.concatenate([patches, jnp.zeros((16, patches.shape[1]))])
    whole = nnx.jit(lambda m, p, l: m.features(p, l))
    ours = whole(model, padded, jax.tree.map(jnp.asarray, pad_layout(layout, 64, 16)))
    assert ours.shape[0] == 16
    np.testing.assert_allclose(ours[:12], whole(model, patches, jax.tree.map(jnp.asarray, layout)), rtol=1e-5,
                               atol=1e-5)


def _image(offset: int, grid: tuple[int, int, int]) -> ExampleImage:
    t, h, w = grid
    config = TOWERS["qwen2_5"][1]
    pixels = np.random.default_rng(offset).normal(size=(t * h * w, config.patch_features)).astype(np.float32)
    return ExampleImage(offset, t * h * w // 4, pixels, vision_layout=vision_layout(config, grid),
                        merged_grid=(t, h // 2, w // 2))


def test_batch_carries_padded_layouts_and_each_rows_positions():
    """Rows with two images, none, and one cut by truncation; an empty padding row: every slot padded to the most
    patches, each row's positions transformers' layout for its own images."""
    two = Example(list(range(40)), [1] * 40, [_image(3, (1, 4, 12)), _image(20, (1, 8, 8))])
    text = Example(list(range(10)), [1] * 10)
    cut = Example(list(range(12)), [1] * 12, [_image(4, (1, 8, 8))])  # truncated: its 16-token run cut at 12 tokens
    batch = make_batch([[two], [text], [cut]], 48, 4, image_slots=2)
    assert batch.pixel_values.shape == (4, 2, 64, TOWERS["qwen2_5"][1].patch_features)
    assert batch.vision_layout.order.shape == (4, 2, 64) and batch.vision_layout.restore.shape == (4, 2, 16)
    assert ((batch.vision_layout.frames >= 0).sum(-1) == [[48, 64], [0, 0], [64, 0], [0, 0]]).all()
    spans = [ImageSpan(3, (1, 2, 6)), ImageSpan(20, (1, 4, 4))]
    np.testing.assert_array_equal(batch.rope_positions[0, :, :40], mrope_positions(40, spans).prompt)
    np.testing.assert_array_equal(batch.rope_positions[1, :, :10], np.tile(np.arange(10), (3, 1)))
    np.testing.assert_array_equal(batch.rope_positions[2, :, :12],
                                  mrope_positions(20, [ImageSpan(4, (1, 4, 4))]).prompt[:, :12])
    # Image rows: slot (row, s) takes feature rows from (row * 2 + s) * 16.
    assert list(batch.image_index[0, 3:15]) == list(range(12)) and batch.image_index[0, 20] == 16
    assert list(batch.image_index[2, 4:12]) == list(range(64, 72))


def test_every_batch_of_a_run_pads_to_its_most_patches():
    """Batches of one image each (48 and 64 patch rows) share one shape: micro-batches stack, the step compiles once."""
    examples = [Example(list(range(20)), [1] * 20, [_image(3, (1, 4, 12))]),
                Example(list(range(30)), [1] * 30, [_image(2, (1, 8, 8))])]
    batches = epoch_batches(examples, rows_per_batch=1, max_seq_length=32, packing=False, seed=0, epoch=0,
                            images_per_row=1, image_extent=run_image_extent(examples))
    assert {b.pixel_values.shape[:3] for b in batches} == {(1, 1, 64)}
    assert {b.vision_layout.restore.shape for b in batches} == {(1, 1, 16)}
