"""Bidirectional spans (`PagedMetadata.visible_until`) in ragged paged attention: reference against dense
attention, the tiled path and the Triton kernel (interpret mode) against the reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from model_lib.spans import visible_until_from_spans
from pallas_kernels.paged_attention import attend_pages
from tests.pallas_kernels.test_paged_attention import dense_expected, flag_options, make_case, ragged_paged_attention

# name -> [(q_len, kv_len, spans)]: spans are positions of the sequence's new tokens (pages of 4 tokens unless
# a case says otherwise). Decode tokens and plain chunks sit beside chunks with spans crossing page
# boundaries, a span ending at the sequence's last token, and (long-chunk) spans crossing q-blocks.
SPAN_SHAPES = {
    "mixed": [(1, 9, ()), (7, 7, ((2, 6),)), (1, 1, ()), (5, 13, ((8, 13),)), (3, 4, ()),
              (9, 20, ((11, 14), (15, 20)))],
    "prefill": [(6, 6, ((0, 6),)), (11, 11, ((1, 3), (3, 10))), (4, 4, ())],
    "long-chunk": [(37, 45, ((9, 17), (20, 30), (33, 45))), (1, 9, ()), (1, 3, ())],
}


def span_case(name, groups, *, seed=0, page_size=4, head_dim=16):
    """`make_case` inputs whose metadata carries `visible_until`, the dense model's parts, and per sequence
    its new tokens' `visible_until` (for the dense reference)."""
    rows = SPAN_SHAPES[name]
    seqs = [(q, kv) for q, kv, _ in rows]
    inputs, parts = make_case(seqs, num_heads=2 * groups, num_kv_heads=2, seed=seed, page_size=page_size,
                              head_dim=head_dim)
    per_seq = [visible_until_from_spans(spans, np.arange(kv - q, kv)) for q, kv, spans in rows]
    pad = inputs["q"].shape[0] - sum(q for q, _ in seqs)
    flat = np.concatenate(per_seq + [np.zeros(pad, np.int32)])
    inputs["meta"] = inputs["meta"].replace(visible_until=jnp.asarray(flat))
    return inputs, parts, seqs, per_seq


@pytest.mark.parametrize("name,groups", [("mixed", 1), ("mixed", 4), ("prefill", 8), ("long-chunk", 2)])
def test_reference_with_spans_matches_dense_attention(name, groups):
    inputs, parts, seqs, per_seq = span_case(name, groups, seed=groups)
    out, _, _ = ragged_paged_attention(**inputs, scale=0.3, implementation="reference")
    total = sum(q for q, _ in seqs)
    np.testing.assert_allclose(out[:total], dense_expected(seqs, parts, scale=0.3, visible_until=per_seq), atol=2e-5)
    assert not np.asarray(out[total:]).any(), "padding tokens must come out as zeros"
    causal = dense_expected(seqs, parts, scale=0.3)
    in_span = np.concatenate([v > np.arange(kv - q, kv) for v, (q, kv) in zip(per_seq, seqs)])
    change = np.abs(np.asarray(out[:total]) - causal).max(axis=(1, 2))  # per token
    assert change[in_span].min() > 1e-2, "every span token must see ahead"
    np.testing.assert_allclose(np.asarray(out[:total])[~in_span], causal[~in_span], atol=2e-5)


# (shape, groups, page size, options, kernel settings): windows, soft-caps, sinks, ALiBi and chunks measure
# from the query's own position; forced q-blocks of 16 rows and key steps of 8 make spans cross q-blocks and
# key tiles past a block's causal limit; sub-page key steps; split KV.
# Two rows run in CI (interpret mode costs about 10 s a row on 2 shared cores); the others are slow.
SLOW = pytest.mark.slow
KERNEL_CASES = [
    ("long-chunk", 1, 4, dict(sliding_window=12), dict(rows=16, block_k=8)),
    ("mixed", 2, 4, dict(sinks=True, softcap=2.0), dict(num_splits=2, block_k=8)),
    pytest.param("mixed", 4, 4, dict(sliding_window=3, sinks=True, alibi=True), {}, marks=SLOW),
    pytest.param("mixed", 1, 4, dict(softcap=2.0, chunk_size=8), {}, marks=SLOW),
    pytest.param("prefill", 8, 8, {}, {}, marks=SLOW),
    pytest.param("long-chunk", 4, 16, dict(alibi=True), dict(rows=16, block_k=8), marks=SLOW),
]


@pytest.mark.parametrize("name,groups,page_size,flags,settings", KERNEL_CASES)
def test_tiled_and_kernel_with_spans_match_reference(name, groups, page_size, flags, settings):
    from pallas_kernels.paged_attention import reference, tiled, triton_kernel

    inputs, _, _, _ = span_case(name, groups, seed=7 + groups, page_size=page_size)
    heads = 2 * groups
    options = flag_options(flags, heads)
    _, k_cache, v_cache = ragged_paged_attention(**inputs, scale=0.3, implementation="reference")
    q, meta = inputs["q"], inputs["meta"]
    expected = reference.paged_attention(q, k_cache, v_cache, meta, **options)
    causal = reference.paged_attention(q, k_cache, v_cache, meta.replace(visible_until=None), **options)
    assert np.abs(np.asarray(expected - causal)).max() > 0.1, "the spans must change the output"
    got = tiled.paged_attention(q, k_cache, v_cache, meta, **options)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5, err_msg="tiled")
    got = triton_kernel.paged_attention(q, k_cache, v_cache, meta, **options, **settings, interpret=True)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5, err_msg="kernel")


def test_paths_without_spans_refuse_them():
    inputs, _, _, _ = span_case("mixed", 1)
    q, cache, meta = inputs["q"], inputs["k_cache"], inputs["meta"]
    with pytest.raises(ValueError, match="bidirectional spans .* Mosaic decode"):
        attend_pages(q, cache, cache, meta, scale=0.3, implementation="mosaic")
    with pytest.raises(ValueError, match="bidirectional spans .* latent pages"):
        attend_pages(q, cache[:1], None, meta, scale=0.3, value_dim=8)
