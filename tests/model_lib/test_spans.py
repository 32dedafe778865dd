"""Bidirectional spans in the dense forward: `visible_until` against transformers with the same mask."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_lib
from model_lib.spans import visible_until_from_span_ids, visible_until_from_spans
from tests.tiny_models import assert_logits_close, hf_logits, random_ids

CASE = "llama-gqa"


def test_visible_until_from_span_ids_and_spans_by_hand():
    span_ids = np.array([[0, 1, 1, 1, 0, 2, 2, 3, 0], [0, 0, 5, 5, 5, 5, 0, 0, 0]])
    positions = np.broadcast_to(np.arange(9), span_ids.shape)
    want = np.array([[0, 3, 3, 3, 4, 6, 6, 7, 8], [0, 1, 5, 5, 5, 5, 6, 7, 8]])
    np.testing.assert_array_equal(visible_until_from_span_ids(span_ids, positions), want)
    np.testing.assert_array_equal(visible_until_from_spans([(1, 4), (5, 7), (7, 8)], np.arange(9)), want[0])
    # A chunk of a sequence: positions 3..7 of spans (2, 6).
    np.testing.assert_array_equal(visible_until_from_spans([(2, 6)], np.arange(3, 8)), [5, 5, 5, 6, 7])
    # Left padding: positions restart at the first real token, visible_until follows the positions.
    padded = visible_until_from_span_ids(np.array([[0, 0, 1, 1, 0]]), np.array([[0, 0, 0, 1, 2]]))
    np.testing.assert_array_equal(padded, [[0, 0, 1, 1, 2]])


def spans_mask(visible_until: np.ndarray, attention_mask: np.ndarray):
    """transformers' additive 4D mask `[B, 1, T, T]` for the same spans: query i sees the real keys whose
    position is at most its `visible_until` (a padding query sees itself, so that no row is empty)."""
    import torch

    positions = np.cumsum(attention_mask, axis=1) - 1
    query_last = np.where(attention_mask > 0, visible_until, -1)
    visible = (positions[:, None, :] <= query_last[:, :, None]) & (attention_mask[:, None, :] > 0)
    visible |= np.eye(visible.shape[-1], dtype=bool)[None] & (attention_mask[:, :, None] == 0)
    return torch.as_tensor(np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None])


@nnx.jit
def _forward(model, ids, mask, visible_until):
    return model(ids, mask, visible_until=visible_until)


def test_dense_forward_with_spans_matches_transformers(tiny_checkpoint):
    """Two rows (one left-padded) with spans; the spans change the logits, and ours follow transformers."""
    folder, hf_model = tiny_checkpoint(CASE)
    model = model_lib.from_pretrained(folder)
    ids = random_ids(2, 12, seed=3)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    span_ids = np.zeros_like(ids)
    span_ids[0, 2:7] = 1  # crosses the middle of row 0
    span_ids[0, 9:12] = 2  # ends the row
    span_ids[1, 3:6] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    visible_until = np.asarray(visible_until_from_span_ids(span_ids, positions))
    ours = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(visible_until)))
    ref = hf_logits(hf_model, ids, attention_mask=spans_mask(visible_until, mask))
    real = mask.astype(bool)
    assert_logits_close(ours[real], ref[real])
    causal = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)))
    assert np.abs(causal - ours)[real].max() > 1e-2, "the spans must change the logits"
    assert_logits_close(causal[real], hf_logits(hf_model, ids, attention_mask=spans_mask(positions, mask))[real])


def test_models_whose_layers_cannot_attend_spans_refuse_them():
    from model_lib.config import ModelConfig
    from pallas_kernels.flash_attention.reference import attention

    base = dict(architecture="X", family="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                num_heads=1, num_kv_heads=1, head_dim=8, max_position_embeddings=8, layer_types=("full_attention",))
    assert ModelConfig(**base).spans_unsupported_reason() is None
    mamba = ModelConfig(**base, layer_attention=("mamba",), ssm_state_size=4, ssm_intermediate_size=8,
                        ssm_time_step_rank=2)
    assert "recurrent layers (mamba)" in mamba.spans_unsupported_reason(paged=False)
    mla = ModelConfig(**base, attention_kind="mla")
    assert mla.spans_unsupported_reason(paged=False) is None  # the dense forward takes them
    assert "MLA" in mla.spans_unsupported_reason()
    x, pos = jnp.ones((1, 2, 1, 8)), jnp.arange(2)[None]
    with pytest.raises(ValueError, match="causal attention only"):
        attention(x, x, x, q_positions=pos, kv_positions=pos, q_segment_ids=pos + 1, kv_segment_ids=pos + 1,
                  scale=1.0, causal=False, visible_until=pos)
