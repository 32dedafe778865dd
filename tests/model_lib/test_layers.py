"""Shared building blocks on hand-checked cases."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from model_lib.config import RopeConfig
from model_lib.decoder import positions_from_segments
from model_lib.layers.rotary import apply_rotary, rotary_cos_sin
from pallas_kernels.flash_attention.reference import attention, attention_mask


def test_positions_restart_per_segment_and_zero_on_padding():
    segments = jnp.array([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0], [3, 3, 3, 3, 3]])
    np.testing.assert_array_equal(
        positions_from_segments(segments), [[0, 0, 0, 1, 2], [0, 1, 0, 1, 0], [0, 1, 2, 3, 4]]
    )


def test_sliding_window_mask_counts_the_query_itself():
    positions = jnp.arange(6)[None]
    ones = jnp.ones((1, 6), jnp.int32)
    mask = np.asarray(attention_mask(positions, positions, ones, ones, sliding_window=3))[0]
    assert mask[5].tolist() == [False, False, False, True, True, True]
    assert mask[1].tolist() == [True, True, False, False, False, False]


def test_padding_queries_stay_finite():
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(1, 4, 2, 8), jnp.float32) for _ in range(3))
    segments = jnp.array([[0, 0, 1, 1]])
    out = attention(q, k, v, q_positions=positions_from_segments(segments), kv_positions=positions_from_segments(segments),
                    q_segment_ids=segments, kv_segment_ids=segments, scale=0.5)
    assert np.isfinite(np.asarray(out)).all()
    # The first real token sees only itself: its output is its own value.
    np.testing.assert_allclose(out[0, 2], v[0, 2], rtol=1e-6)


def test_rotary_preserves_norm_and_relative_angle():
    rope = RopeConfig(kind="default", theta=10000.0, rotary_dim=8)
    x = jnp.asarray(np.random.RandomState(1).randn(1, 6, 1, 8), jnp.float32)
    cos, sin = rotary_cos_sin(rope, jnp.arange(6)[None], jnp.full((1, 6), 6), jnp.float32)
    for interleaved in (False, True):
        y = apply_rotary(x, cos, sin, interleaved)
        np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # Same vector at positions p and p+d: the dot product depends only on d.
    same = jnp.broadcast_to(x[:, :1], x.shape)
    y = apply_rotary(same, cos, sin, False)[0, :, 0]
    np.testing.assert_allclose(y[0] @ y[2], y[3] @ y[5], rtol=1e-5)


def test_partial_rotary_passes_the_tail_through():
    rope = RopeConfig(kind="default", theta=10000.0, rotary_dim=4)
    x = jnp.asarray(np.random.RandomState(2).randn(1, 3, 2, 8), jnp.float32)
    cos, sin = rotary_cos_sin(rope, jnp.arange(3)[None], jnp.full((1, 3), 3), jnp.float32)
    np.testing.assert_array_equal(apply_rotary(x, cos, sin, False)[..., 4:], x[..., 4:])
