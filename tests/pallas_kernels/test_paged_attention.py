"""Ragged paged attention: reference against dense attention, kernel against reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from functools import partial

from pallas_kernels.flash_attention.reference import attention
from pallas_kernels.paged_attention import PagedMetadata
from pallas_kernels.paged_attention import ragged_paged_attention as paged_op

OPTIONS = ("scale", "sliding_window", "softcap", "chunk_size", "implementation")
dense_attention = jax.jit(attention, static_argnames=OPTIONS[:4])


@partial(jax.jit, static_argnames=OPTIONS)
def ragged_paged_attention(q, k, v, k_cache, v_cache, meta, *, scale, sliding_window=None, softcap=None, sinks=None,
                           alibi_slopes=None, chunk_size=None, implementation=None):
    return paged_op(q, k, v, k_cache, v_cache, meta, scale=scale, sliding_window=sliding_window, softcap=softcap,
                    sinks=sinks, alibi_slopes=alibi_slopes, chunk_size=chunk_size, implementation=implementation)

PAGE_SIZE = 4
HEAD_DIM = 16


def make_case(seqs, num_heads, num_kv_heads, *, seed=0, num_pages=64, pad_tokens=3, pad_seqs=2, page_size=PAGE_SIZE,
              head_dim=HEAD_DIM):
    """Random ragged batch. `seqs` lists (q_len, kv_len); pages are handed out shuffled."""
    PAGE_SIZE, HEAD_DIM = page_size, head_dim  # noqa: N806 (the module defaults, overridden)
    rng = np.random.RandomState(seed)
    max_pages = max(-(-kv // PAGE_SIZE) for _, kv in seqs) + 1
    free = list(rng.permutation(num_pages))
    page_tables = np.zeros((len(seqs) + pad_seqs, max_pages), np.int32)
    k_cache = rng.randn(num_kv_heads, num_pages, PAGE_SIZE, HEAD_DIM).astype(np.float32)
    v_cache = rng.randn(num_kv_heads, num_pages, PAGE_SIZE, HEAD_DIM).astype(np.float32)
    full_k, full_v, qs, ks, vs = [], [], [], [], []
    for s, (q_len, kv_len) in enumerate(seqs):
        pages = [free.pop() for _ in range(-(-kv_len // PAGE_SIZE))]
        page_tables[s, : len(pages)] = pages
        key = rng.randn(kv_len, num_kv_heads, HEAD_DIM).astype(np.float32)
        value = rng.randn(kv_len, num_kv_heads, HEAD_DIM).astype(np.float32)
        for pos in range(kv_len - q_len):  # the cached past already sits in its pages
            k_cache[:, pages[pos // PAGE_SIZE], pos % PAGE_SIZE] = key[pos]
            v_cache[:, pages[pos // PAGE_SIZE], pos % PAGE_SIZE] = value[pos]
        full_k.append(key)
        full_v.append(value)
        qs.append(rng.randn(q_len, num_heads, HEAD_DIM).astype(np.float32))
        ks.append(key[kv_len - q_len :])
        vs.append(value[kv_len - q_len :])
    q_lens = [q for q, _ in seqs]
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cu = np.concatenate([cu, [cu[-1]] * pad_seqs]).astype(np.int32)
    kv_lens = np.array([kv for _, kv in seqs] + [0] * pad_seqs, np.int32)

    def flat(parts, heads):
        return np.concatenate(parts + [rng.randn(pad_tokens, heads, HEAD_DIM).astype(np.float32)])

    arrays = dict(q=flat(qs, num_heads), k=flat(ks, num_kv_heads), v=flat(vs, num_kv_heads), k_cache=k_cache, v_cache=v_cache)
    inputs = {name: jnp.asarray(value) for name, value in arrays.items()}
    inputs["meta"] = PagedMetadata(jnp.asarray(cu), jnp.asarray(kv_lens), jnp.asarray(page_tables), jnp.int32(len(seqs)))
    return inputs, (qs, full_k, full_v)


def alibi(num_heads):
    """Geometric per-head slopes like BLOOM's, steep enough to matter on these short sequences."""
    return jnp.asarray(2.0 ** -np.arange(num_heads), jnp.float32)


def flag_options(flags: dict, heads: int) -> dict:
    """The attention op's options a kernel-table row's `flags` name (window, soft-cap, chunks, sinks, ALiBi)."""
    options = dict(scale=0.3, sliding_window=flags.get("sliding_window"), softcap=flags.get("softcap"),
                   chunk_size=flags.get("chunk_size"))
    if flags.get("sinks"):
        options["sinks"] = jnp.asarray(np.random.RandomState(4).randn(heads), jnp.float32)
    if flags.get("alibi"):
        options["alibi_slopes"] = alibi(heads)
    return options


def dense_expected(seqs, parts, *, scale, sliding_window=None, softcap=None, alibi_slopes=None, chunk_size=None,
                   visible_until=None):
    """Each sequence's new tokens through dense attention; `visible_until`: per sequence, its new tokens'
    last visible positions (bidirectional spans)."""
    qs, full_k, full_v = parts
    outs = []
    for s, ((q_len, kv_len), q, key, value) in enumerate(zip(seqs, qs, full_k, full_v)):
        q_pos = jnp.arange(kv_len - q_len, kv_len)[None]
        out = dense_attention(
            jnp.asarray(q)[None], jnp.asarray(key)[None], jnp.asarray(value)[None],
            q_positions=q_pos, kv_positions=jnp.arange(kv_len)[None],
            q_segment_ids=jnp.ones_like(q_pos), kv_segment_ids=jnp.ones((1, kv_len), jnp.int32),
            scale=scale, sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes,
            chunk_size=chunk_size, visible_until=None if visible_until is None else jnp.asarray(visible_until[s])[None],
        )
        outs.append(np.asarray(out[0]))
    return np.concatenate(outs)


MIXED = [(1, 9), (7, 7), (1, 1), (5, 13), (3, 4), (1, 16)]
SHAPES = {
    "decode": [(1, 5), (1, 12), (1, 1), (1, 17)],
    "prefill": [(6, 6), (1, 1), (11, 11), (4, 4)],
    "mixed": MIXED,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_reference_matches_dense_attention(shape, groups):
    seqs = SHAPES[shape]
    inputs, parts = make_case(seqs, num_heads=2 * groups, num_kv_heads=2, seed=groups)
    out, k_cache, v_cache = ragged_paged_attention(**inputs, scale=0.3, implementation="reference")
    total = sum(q for q, _ in seqs)
    np.testing.assert_allclose(out[:total], dense_expected(seqs, parts, scale=0.3), atol=2e-5)
    assert not np.asarray(out[total:]).any(), "padding tokens must come out as zeros"
    # The new keys landed in their pages.
    s, (q_len, kv_len) = 0, seqs[0]
    page = inputs["meta"].page_tables[s, (kv_len - 1) // PAGE_SIZE]
    np.testing.assert_array_equal(k_cache[:, page, (kv_len - 1) % PAGE_SIZE], parts[1][s][kv_len - 1])


def test_reference_window_and_softcap():
    inputs, parts = make_case(MIXED, num_heads=4, num_kv_heads=1, seed=5)
    out, _, _ = ragged_paged_attention(**inputs, scale=0.4, sliding_window=3, softcap=2.0, implementation="reference")
    total = sum(q for q, _ in MIXED)
    expected = dense_expected(MIXED, parts, scale=0.4, sliding_window=3, softcap=2.0)
    np.testing.assert_allclose(out[:total], expected, atol=2e-5)


# Chunked local attention (Llama 4): sequences of up to 17 positions cross chunks of 3 (not page-aligned),
# 4 (one page) and 8 (two pages); decode tokens sit at a chunk's first position (kv_len 1, 5, 9, 17).
CHUNKED_SHAPES = {**SHAPES, "long-chunk": [(37, 45), (1, 9), (1, 3)]}


@pytest.mark.parametrize("shape,groups,chunk", [("mixed", 4, 3), ("mixed", 1, 4), ("decode", 4, 4), ("prefill", 8, 3),
                                                ("long-chunk", 4, 8)])
def test_chunked_attention_reference_tiled_and_kernel_agree(shape, groups, chunk):
    seqs = CHUNKED_SHAPES[shape]
    inputs, parts = make_case(seqs, num_heads=2 * groups, num_kv_heads=2, seed=30 + chunk)
    options = dict(scale=0.3, chunk_size=chunk, softcap=2.0 if shape == "mixed" else None)
    expected, _, _ = ragged_paged_attention(**inputs, **options, implementation="reference")
    total = sum(q for q, _ in seqs)
    np.testing.assert_allclose(expected[:total], dense_expected(seqs, parts, **options), atol=2e-5)
    plain, _, _ = ragged_paged_attention(**inputs, scale=0.3, softcap=options["softcap"], implementation="reference")
    assert np.abs(np.asarray(expected - plain)).max() > 0.1, "the chunk mask must change the output"
    for implementation in ("tiled", "interpret"):
        out, _, _ = ragged_paged_attention(**inputs, **options, implementation=implementation)
        np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5, err_msg=implementation)


def weights_readout_case(seqs, seed):
    """One head with q = 0 and one-hot values (value i marks position i), so the output rows are the
    attention weights over positions; also the positions of the step's new tokens."""
    inputs, _ = make_case(seqs, num_heads=1, num_kv_heads=1, seed=seed)
    pages = np.asarray(inputs["meta"].page_tables)
    v_cache, v = np.zeros(inputs["v_cache"].shape, np.float32), np.zeros(inputs["v"].shape, np.float32)
    new_positions = np.concatenate([np.arange(kv - q, kv) for q, kv in seqs])
    v[np.arange(len(new_positions)), 0, new_positions] = 1
    for s, (_, kv_len) in enumerate(seqs):
        for p in range(kv_len):
            v_cache[0, pages[s, p // PAGE_SIZE], p % PAGE_SIZE, p] = 1
    inputs.update(q=jnp.zeros_like(inputs["q"]), v=jnp.asarray(v), v_cache=jnp.asarray(v_cache))
    return inputs, new_positions


def test_chunked_attention_by_hand():
    """q = 0 and one-hot values read the weights out: a token at position i attends uniformly to the
    positions of its own chunk up to i (dense row and paged reference)."""
    chunk, seqs = 4, [(6, 11), (3, 3)]
    inputs, new_positions = weights_readout_case(seqs, seed=8)
    want = np.zeros((len(new_positions), HEAD_DIM))
    for row, i in enumerate(new_positions):
        start = i // chunk * chunk
        want[row, start : i + 1] = 1.0 / (i + 1 - start)
    out, _, _ = ragged_paged_attention(**inputs, scale=1.0, chunk_size=chunk, implementation="reference")
    np.testing.assert_allclose(out[: len(want), 0], want, atol=1e-6)


@pytest.mark.parametrize("shape,groups,window,softcap", [("decode", 4, None, None), ("prefill", 1, 5, None),
                                                        ("mixed", 4, 3, 2.0)])
def test_reference_alibi_matches_dense_attention(shape, groups, window, softcap):
    seqs = SHAPES[shape]
    inputs, parts = make_case(seqs, num_heads=2 * groups, num_kv_heads=2, seed=20 + groups)
    options = dict(scale=0.3, sliding_window=window, softcap=softcap, alibi_slopes=alibi(2 * groups))
    out, _, _ = ragged_paged_attention(**inputs, **options, implementation="reference")
    total = sum(q for q, _ in seqs)
    np.testing.assert_allclose(out[:total], dense_expected(seqs, parts, **options), atol=2e-5)
    plain, _, _ = ragged_paged_attention(**inputs, scale=0.3, sliding_window=window, softcap=softcap,
                                         implementation="reference")
    assert np.abs(np.asarray(out - plain)).max() > 0.1, "ALiBi must change the output"


@pytest.mark.parametrize("window", [None, 3])
def test_alibi_by_hand(window):
    """q = 0 makes every logit 0 and v = one-hot(key index) reads the weights out: token at position i
    must get softmax(s * (j - i)) over its visible keys j (dense packed row, paged reference, kernel)."""
    slope, seqs = 0.7, [(4, 9), (5, 5), (1, 7)]

    def expected(i):
        j = np.arange(0 if window is None else max(0, i - window + 1), i + 1)
        w = np.zeros(HEAD_DIM)
        w[j] = np.exp(slope * (j - i))
        return w / w.sum()

    # Dense: all sequences packed into one row, positions restarting per segment.
    positions = np.concatenate([np.arange(kv) for _, kv in seqs])
    segments = np.concatenate([np.full(kv, s + 1) for s, (_, kv) in enumerate(seqs)])
    n = len(positions)
    pos, seg = jnp.asarray(positions)[None], jnp.asarray(segments)[None]
    dense = dense_attention(
        jnp.zeros((1, n, 1, HEAD_DIM)), jnp.ones((1, n, 1, HEAD_DIM)), jax.nn.one_hot(pos, HEAD_DIM)[:, :, None],
        q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
        scale=1.0, sliding_window=window, alibi_slopes=jnp.array([slope]),
    )
    np.testing.assert_allclose(dense[0, :, 0], np.stack([expected(i) for i in positions]), atol=1e-6)

    # Paged: the new tokens are the last q_len positions of each sequence.
    inputs, new_positions = weights_readout_case(seqs, seed=7)
    want = np.stack([expected(i) for i in new_positions])
    for implementation in ("reference", "interpret"):
        out, _, _ = ragged_paged_attention(**inputs, scale=1.0, sliding_window=window,
                                           alibi_slopes=jnp.array([slope]), implementation=implementation)
        np.testing.assert_allclose(out[: len(want), 0], want, atol=1e-6, err_msg=implementation)


def test_reference_sinks_take_probability_mass():
    """A sink is an extra logit with a zero value: with sink -inf nothing changes, with a huge sink output -> 0."""
    inputs, parts = make_case([(3, 6)], num_heads=2, num_kv_heads=1, seed=6)
    plain, _, _ = ragged_paged_attention(**inputs, scale=0.5, implementation="reference")
    none, _, _ = ragged_paged_attention(**inputs, scale=0.5, sinks=jnp.full((2,), -1e30), implementation="reference")
    np.testing.assert_allclose(none, plain, atol=1e-6)
    big, _, _ = ragged_paged_attention(**inputs, scale=0.5, sinks=jnp.full((2,), 60.0), implementation="reference")
    assert np.abs(np.asarray(big)).max() < 1e-6
    # sink = log(sum of exp logits) halves every output (checked against a hand computation for one token).
    q, key, value = parts[0][0][0], parts[1][0], parts[2][0]
    logits = (key[:4, 0] @ q[0]) * 0.5  # first new token at position 3 sees 4 keys
    sink = np.log(np.exp(logits).sum())
    half, _, _ = ragged_paged_attention(**inputs, scale=0.5, sinks=jnp.array([sink, 0.0]), implementation="reference")
    np.testing.assert_allclose(half[0, 0], 0.5 * plain[0, 0], rtol=1e-5)


# (shape, groups, window, softcap, sinks, with_alibi): the option mixes both the kernel and the tiled path
# are checked against the reference on.
OPTION_CASES = [
    ("decode", 1, None, None, False, False),
    ("decode", 4, None, None, True, False),
    ("prefill", 8, None, None, False, False),
    ("prefill", 4, 5, None, False, False),
    ("mixed", 1, None, 3.0, False, False),
    ("mixed", 4, 3, None, True, False),
    ("mixed", 8, None, None, False, False),
    ("decode", 1, None, None, False, True),
    ("decode", 4, 6, None, False, True),
    ("prefill", 1, 5, None, False, True),
    ("prefill", 4, None, None, True, True),
    ("mixed", 1, 3, 3.0, False, True),
    ("mixed", 4, None, None, False, True),
]


def case_options(groups, window, softcap, sinks, with_alibi, scale=0.25):
    options = dict(scale=scale, sliding_window=window, softcap=softcap)
    if sinks:
        options["sinks"] = jnp.asarray(np.random.RandomState(3).randn(2 * groups), jnp.float32)
    if with_alibi:
        options["alibi_slopes"] = alibi(2 * groups)
    return options


@pytest.mark.parametrize("shape,groups,window,softcap,sinks,with_alibi", OPTION_CASES)
def test_kernel_matches_reference_in_interpret_mode(shape, groups, window, softcap, sinks, with_alibi):
    seqs = SHAPES[shape]
    inputs, _ = make_case(seqs, num_heads=2 * groups, num_kv_heads=2, seed=11 + groups)
    options = case_options(groups, window, softcap, sinks, with_alibi)
    expected, k_ref, _ = ragged_paged_attention(**inputs, **options, implementation="reference")
    out, k_cache, _ = ragged_paged_attention(**inputs, **options, implementation="interpret")
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(k_cache, k_ref)


@pytest.mark.parametrize("implementation", ["reference", "tiled", "interpret"])
def test_layer_of_a_stacked_pool_is_read_and_written_in_place(implementation):
    """Layer 1 of a stacked `[K, L, P, B, D]` pool (a traced index, as in a scanned stack) gives the
    one-layer call's output and pages; the other layers' pages are left as they were."""
    inputs, _ = make_case(MIXED, num_heads=8, num_kv_heads=2, seed=5, num_pages=16)
    options = dict(scale=0.3, sliding_window=6, softcap=None)
    expected, k_want, v_want = ragged_paged_attention(**inputs, **options, implementation="reference")
    rng = np.random.RandomState(6)
    others = [jnp.asarray(rng.randn(*inputs["k_cache"].shape).astype(np.float32)) for _ in range(4)]
    k_pool = jnp.stack([others[0], inputs["k_cache"], others[1]], axis=1)  # [K, 3, P, B, D]
    v_pool = jnp.stack([others[2], inputs["v_cache"], others[3]], axis=1)
    step = jax.jit(partial(paged_op, **options, implementation=implementation))
    out, k_pool, v_pool = step(inputs["q"], inputs["k"], inputs["v"], k_pool, v_pool, inputs["meta"],
                               layer=jnp.int32(1))
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(k_pool[:, 1], k_want)
    np.testing.assert_array_equal(v_pool[:, 1], v_want)
    for layer, (k_other, v_other) in zip((0, 2), ((others[0], others[2]), (others[1], others[3]))):
        np.testing.assert_array_equal(k_pool[:, layer], k_other)
        np.testing.assert_array_equal(v_pool[:, layer], v_other)


# Beyond SHAPES (tiles of 2 and 4 rows; decode steps make one-row tiles, which run the reference
# itself): one long prefill chunk beside decodes (8-row tiles, a partial
# last tile) and two chunks continuing cached sequences, no padding rows or sequences (8-row tiles).
TILED_SHAPES = {**SHAPES, "long-chunk": [(37, 45), (1, 9), (1, 3)], "continued-chunks": [(9, 30), (8, 8)]}


@pytest.mark.parametrize("shape,groups,window,softcap,sinks,with_alibi",
                         [case for case in OPTION_CASES if case[0] != "decode"] + [("long-chunk", 4, 7, 2.0, True, True), ("long-chunk", 1, None, None, False, False),
                                         ("continued-chunks", 8, None, None, False, True)])
def test_tiled_path_matches_reference(shape, groups, window, softcap, sinks, with_alibi):
    """The CPU path (per-sequence query tiles) against the reference, padding rows and sequences included."""
    from pallas_kernels.paged_attention.tiled import tile_size

    seqs = TILED_SHAPES[shape]
    pad_tokens = 0 if shape == "continued-chunks" else 3
    inputs, _ = make_case(seqs, num_heads=2 * groups, num_kv_heads=2, seed=17 + groups, pad_tokens=pad_tokens,
                          pad_seqs=0 if shape == "continued-chunks" else 2)
    options = case_options(groups, window, softcap, sinks, with_alibi)
    expected, k_ref, v_ref = ragged_paged_attention(**inputs, **options, implementation="reference")
    out, k_cache, v_cache = ragged_paged_attention(**inputs, **options, implementation="tiled")
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(k_cache, k_ref)
    assert tile_size(inputs["q"].shape[0], inputs["meta"].kv_lens.shape[0]) == {
        "mixed": 2, "prefill": 4, "long-chunk": 8, "continued-chunks": 8}[shape]
    assert tile_size(7, 6) == 1  # SHAPES["decode"] with its padding: 7 tokens, 6 sequence slots


# Shapes the first kernel left to the reference: GQA groups 7, 5, 3; head_dim padded inside the
# kernel (24 -> 32, 40 -> 64); page sizes 8 and 16; split KV (flash-decoding) forced; KV steps
# shorter than a page. name -> (seqs, heads, kv heads, page size, head_dim, kernel settings, options).
NEW_SHAPES = {
    "groups7-decode": (SHAPES["decode"], 14, 2, 4, 16, {}, {}),
    "groups5-prefill-d24": (SHAPES["prefill"], 10, 2, 8, 24, {}, {}),
    "groups3-mixed-d40-sinks-window": (MIXED, 6, 2, 8, 40, {}, dict(sinks=True, sliding_window=3)),
    "splits4-decode-alibi": (SHAPES["decode"], 8, 2, 4, 16, dict(num_splits=4, block_k=8), dict(alibi=True)),
    "splits2-decode-d24-sinks": (SHAPES["decode"], 14, 2, 8, 24, dict(num_splits=2, block_k=8), dict(sinks=True)),
    "subpage-steps-mixed": (MIXED, 4, 2, 16, 16, dict(block_k=8, rows=16), dict(softcap=2.0)),
    "subpage-steps-d24-prefill": (SHAPES["prefill"], 6, 2, 16, 24, dict(block_k=8), dict(sliding_window=5)),
}


@pytest.mark.parametrize("name", sorted(NEW_SHAPES))
def test_kernel_any_groups_head_dims_pages_and_splits(name):
    from pallas_kernels.paged_attention import reference, triton_kernel

    seqs, heads, kv_heads, page_size, head_dim, settings, flags = NEW_SHAPES[name]
    inputs, _ = make_case(seqs, heads, kv_heads, seed=len(name), page_size=page_size, head_dim=head_dim)
    options = flag_options(flags, heads)
    _, k_cache, v_cache = ragged_paged_attention(**inputs, scale=0.3, implementation="reference")
    q, meta = inputs["q"], inputs["meta"]
    expected = reference.paged_attention(q, k_cache, v_cache, meta, **options)
    got = triton_kernel.paged_attention(q, k_cache, v_cache, meta, **options, **settings, interpret=True)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_no_fallback_for_serving_shapes(caplog):
    """The dispatch takes the kernel for every shape the issue lists; an odd page size falls back, logged once."""
    from pallas_kernels.paged_attention import triton_kernel
    from pallas_kernels.paged_attention.ops import choose_implementation

    for groups in (1, 2, 3, 4, 5, 7, 8, 16):
        for head_dim in (64, 80, 96, 112, 128, 192, 256):
            for page_size in (8, 16, 32, 64, 128):
                assert triton_kernel.supported(groups * 2, 2, head_dim, page_size), (groups, head_dim, page_size)
    q, cache = jnp.zeros((4, 8, 64)), jnp.zeros((2, 4, 12, 64))
    assert choose_implementation(q, cache) == "tiled"
    meta = PagedMetadata(jnp.arange(5, dtype=jnp.int32), jnp.ones(4, jnp.int32), jnp.zeros((4, 1), jnp.int32),
                         jnp.int32(4))
    with caplog.at_level("WARNING", logger="pallas_kernels"):
        for _ in range(2):
            paged_op(q, q[:, :2], q[:, :2], cache, cache, meta, scale=1.0)
    warnings = [r for r in caplog.records if "page_size=12" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_kernel_matches_reference_on_gpu(shape, groups):
    seqs = SHAPES[shape]
    inputs, _ = make_case(seqs, num_heads=2 * groups, num_kv_heads=2, seed=groups)
    expected, _, _ = ragged_paged_attention(**inputs, scale=0.25, sliding_window=4, implementation="reference")
    out, _, _ = ragged_paged_attention(**inputs, scale=0.25, sliding_window=4, implementation="kernel")
    np.testing.assert_allclose(out, expected, atol=2e-3, rtol=2e-3)  # TF32-class dot precision


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(("page_size", "groups"), [(64, 1), (64, 7), (128, 4)])
def test_mosaic_decode_matches_reference_on_gpu(page_size, groups):
    """The Mosaic GPU decode kernel (decode-only batches; 2 padded sequences with no token) in bf16.
    Mosaic GPU's interpreter cannot run it on the CPU (see mosaic_decode.py)."""
    seqs = [(1, 1), (1, 200), (1, page_size), (1, 700)]
    inputs, _ = make_case(seqs, num_heads=2 * groups, num_kv_heads=2, seed=groups, pad_tokens=2, page_size=page_size,
                          head_dim=128)
    inputs = {k: v.astype(jnp.bfloat16) if k != "meta" else v for k, v in inputs.items()}
    expected, _, _ = ragged_paged_attention(**inputs, scale=0.08, implementation="reference")
    out, _, _ = ragged_paged_attention(**inputs, scale=0.08, implementation="mosaic")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=3e-2, rtol=3e-2)


def test_mosaic_decode_refuses_what_it_does_not_cover():
    from pallas_kernels.paged_attention import mosaic_decode

    reason = mosaic_decode.unsupported_reason
    assert reason(8, 8, 32, 8, 128, 64, jnp.bfloat16) is None
    assert "decode-only" in reason(9, 8, 32, 8, 128, 64, jnp.bfloat16)
    assert "page size 16" in reason(8, 8, 32, 8, 128, 16, jnp.bfloat16)
    assert "head_dim 96" in reason(8, 8, 32, 8, 96, 64, jnp.bfloat16)
    assert "float32" in reason(8, 8, 32, 8, 128, 64, jnp.float32)
    assert "shared memory" in reason(8, 8, 32, 8, 256, 128, jnp.bfloat16)
    inputs, _ = make_case([(1, 5)], num_heads=4, num_kv_heads=2, pad_tokens=0, pad_seqs=0)
    with pytest.raises(ValueError, match="does not cover"):  # page size 4, head_dim 16
        ragged_paged_attention(**inputs, scale=0.1, implementation="mosaic")


# -- quantized KV pages (int8 / float8 values, one float32 scale per token slot and kv head) ----------------------

# kv_cache_dtype name -> bound on |x - dequantize(quantize(x))| relative to each vector's absmax: half a step of
# 127 levels for int8; half an ulp at the top binade for float8 (3 mantissa bits in e4m3, 2 in e5m2).
ROUND_TRIP_BOUND = {"int8": 0.5 / 127, "fp8_e4m3": 2.0**-4, "fp8_e5m2": 2.0**-3}


def quantized_pages(cache, name):
    from pallas_kernels.paged_attention.kv_quant import KV_CACHE_DTYPES, QuantizedPages, quantize_kv

    return QuantizedPages(*quantize_kv(cache, KV_CACHE_DTYPES[name]))


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_BOUND))
def test_quantize_kv_round_trip(name):
    from pallas_kernels.paged_attention.kv_quant import dequantize_pages

    x = jnp.asarray(np.random.RandomState(0).randn(5, 3, 16) * np.array([1e-3, 1.0, 300.0])[:, None], jnp.float32)
    x = x.at[0, 0].set(0.0)  # a zero vector: zero scale, zeros back
    pages = quantized_pages(x, name)
    assert pages.scales.dtype == jnp.float32 and pages.scales.shape == (5, 3)
    back = dequantize_pages(pages, jnp.float32)
    absmax = np.abs(np.asarray(x)).max(-1, keepdims=True)
    assert np.all(np.abs(np.asarray(back - x)) <= ROUND_TRIP_BOUND[name] * absmax * 1.0001)
    assert not np.asarray(back[0, 0]).any() and float(pages.scales[0, 0]) == 0.0
    # The largest entry of each vector lands on the format's largest value (no overflow, full range used).
    from pallas_kernels.paged_attention.kv_quant import QMAX

    np.testing.assert_allclose(np.abs(np.asarray(pages.values, np.float32)).max(-1)[1:], QMAX[pages.values.dtype])


def test_kv_cache_dtype_names():
    from pallas_kernels.paged_attention.kv_quant import bytes_per_token, is_quantized, resolve_kv_cache_dtype

    assert resolve_kv_cache_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    assert resolve_kv_cache_dtype("fp8", jnp.bfloat16) == resolve_kv_cache_dtype("fp8_e4m3", jnp.float32)
    assert [is_quantized(resolve_kv_cache_dtype(n, jnp.float32)) for n in ("float16", "int8", "fp8_e5m2")] == [
        False, True, True]
    assert (bytes_per_token(64, jnp.bfloat16), bytes_per_token(64, jnp.int8)) == (128, 68)
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'int4'; supported: auto, .*fp8_e5m2, int8"):
        resolve_kv_cache_dtype("int4", jnp.float32)


# (dtype, shape, groups, head_dim, kernel settings, options): the kernel (interpret) and the tiled path against the
# reference on the same quantized pages; settings cover whole-page steps, sub-page steps, split KV and a padded
# head_dim (masked gather loads).
QUANT_CASES = [
    ("int8", "decode", 2, 24, dict(num_splits=2, block_k=8), dict(alibi=True, sinks=True)),
    ("fp8_e4m3", "long-chunk", 4, 24, dict(block_k=8, rows=16), dict(softcap=2.0, sliding_window=5)),
    ("fp8_e5m2", "mixed", 8, 16, {}, {}),
]
# Against the float cache: max |out - out_float| (outputs are averages of N(0, 1) values).
QUANT_TOLERANCE = {"int8": 0.03, "fp8_e4m3": 0.15, "fp8_e5m2": 0.3}


@pytest.mark.parametrize("name,shape,groups,head_dim,settings,flags", QUANT_CASES)
def test_quantized_pages_kernel_and_tiled_match_reference(name, shape, groups, head_dim, settings, flags):
    from pallas_kernels.paged_attention import reference, triton_kernel
    from pallas_kernels.paged_attention.kv_quant import dequantize_pages, quantize_kv

    seqs = TILED_SHAPES[shape]
    inputs, _ = make_case(seqs, num_heads=2 * groups, num_kv_heads=2, seed=31 + groups, page_size=8, head_dim=head_dim)
    options = case_options(groups, flags.get("sliding_window"), flags.get("softcap"), flags.get("sinks", False),
                           flags.get("alibi", False))
    float_out, _, _ = ragged_paged_attention(**inputs, **options, implementation="reference")
    quant = dict(inputs, k_cache=quantized_pages(inputs["k_cache"], name),
                 v_cache=quantized_pages(inputs["v_cache"], name))
    expected, k_cache, v_cache = ragged_paged_attention(**quant, **options, implementation="reference")

    # The step's new keys were quantized into their slots.
    s, (q_len, kv_len) = 0, seqs[0]
    page, slot = quant["meta"].page_tables[s, (kv_len - 1) // 8], (kv_len - 1) % 8
    values, scales = quantize_kv(inputs["k"][q_len - 1], k_cache.values.dtype)
    np.testing.assert_array_equal(np.asarray(k_cache.values[:, page, slot], np.float32), np.asarray(values, np.float32))
    np.testing.assert_array_equal(k_cache.scales[:, page, slot], scales)

    q, meta = inputs["q"], inputs["meta"]
    got = triton_kernel.paged_attention(q, k_cache, v_cache, meta, **options, **settings, interpret=True)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    tiled, _, _ = ragged_paged_attention(**quant, **options, implementation="tiled")
    np.testing.assert_allclose(tiled, expected, atol=2e-5, rtol=1e-5)
    # The reference on quantized pages is the reference on their dequantized floats.
    plain = reference.paged_attention(q, dequantize_pages(k_cache, jnp.float32), dequantize_pages(v_cache, jnp.float32),
                                      meta, **options)
    np.testing.assert_allclose(plain, expected, atol=1e-6)
    error = float(np.abs(np.asarray(expected - float_out)).max())
    assert 0 < error < QUANT_TOLERANCE[name], error


def test_mosaic_decode_refuses_quantized_pages():
    inputs, _ = make_case([(1, 5)], num_heads=4, num_kv_heads=2, pad_tokens=0, pad_seqs=0)
    inputs.update(k_cache=quantized_pages(inputs["k_cache"], "int8"), v_cache=quantized_pages(inputs["v_cache"], "int8"))
    with pytest.raises(ValueError, match="quantized KV pages \\(int8\\)"):
        ragged_paged_attention(**inputs, scale=0.1, implementation="mosaic")


@pytest.mark.parametrize("shape,groups", [("decode", 4), ("long-chunk", 1), ("mixed", 8)])
def test_tiled_path_in_blocks_matches_reference(shape, groups, monkeypatch):
    """A budget of three tiles' temporaries: the tiles (decode tokens included) run in blocks, one after another,
    up to the last block holding a real tile."""
    from pallas_kernels.paged_attention import tiled

    inputs, _ = make_case(TILED_SHAPES[shape], num_heads=2 * groups, num_kv_heads=2, seed=23, pad_tokens=3, pad_seqs=2)
    q, cache, meta = inputs["q"], inputs["k_cache"], inputs["meta"]
    rows = tiled.tile_size(q.shape[0], meta.kv_lens.shape[0])
    per_tile = tiled.tile_bytes(rows, q.shape[1], 2, q.shape[2], meta.page_tables.shape[1] * cache.shape[2], q.dtype)
    monkeypatch.setattr(tiled, "GATHER_BYTES", 3 * per_tile)
    assert tiled.tiles_per_block(8, per_tile) == 2  # blocks of two tiles (every shape here has more)
    options = case_options(groups, 5, None, True, False)
    expected, _, _ = ragged_paged_attention(**inputs, **options, implementation="reference")
    out, _, _ = ragged_paged_attention(**inputs, **options, implementation="tiled")
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)


def test_tiled_path_runs_only_the_blocks_that_hold_real_tiles():
    """Four sequences that fill whole tiles need 4 of the bound's 8 tiles: the tiles run in blocks of
    ceil(T / Q) = 4 within the default budget, the loop stops after the first, and the output is the reference's."""
    from pallas_kernels.paged_attention import tiled

    inputs, _ = make_case([(8, 20), (8, 8), (8, 30), (8, 12)], num_heads=4, num_kv_heads=2, seed=29, pad_tokens=0,
                          pad_seqs=0)
    q, cache, meta = inputs["q"], inputs["k_cache"], inputs["meta"]
    rows = tiled.tile_size(q.shape[0], meta.kv_lens.shape[0])
    per_tile = tiled.tile_bytes(rows, q.shape[1], 2, q.shape[2], meta.page_tables.shape[1] * cache.shape[2], q.dtype)
    num_tiles = tiled.tile_layout(meta, q.shape[0], rows)[0].shape[0]
    assert (rows, num_tiles, tiled.tiles_per_block(num_tiles, per_tile, q.shape[0] // rows)) == (8, 8, 4)
    options = case_options(2, None, None, False, False)
    expected, _, _ = ragged_paged_attention(**inputs, **options, implementation="reference")
    out, _, _ = ragged_paged_attention(**inputs, **options, implementation="tiled")
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", ["decode", "mixed"])
def test_relative_position_bias_matches_dense_attention(shape):
    """T5's causal relative buckets (`position_bias`): the paged reference equals the dense one, and the
    public op (no implementation named) falls back to the reference for them."""
    from pallas_kernels.position_bias import RelativePositionBias

    seqs = SHAPES[shape]
    inputs, (qs, full_k, full_v) = make_case(seqs, num_heads=8, num_kv_heads=2, seed=31)
    bias = RelativePositionBias(jnp.asarray(np.random.RandomState(5).randn(8, 8), jnp.float32), False, 12)
    out, _, _ = paged_op(**inputs, scale=1.0, position_bias=bias)
    want = []
    for (q_len, kv_len), q, key, value in zip(seqs, qs, full_k, full_v):
        q_pos = jnp.arange(kv_len - q_len, kv_len)[None]
        want.append(np.asarray(dense_attention(
            jnp.asarray(q)[None], jnp.asarray(key)[None], jnp.asarray(value)[None], q_positions=q_pos,
            kv_positions=jnp.arange(kv_len)[None], q_segment_ids=jnp.ones_like(q_pos),
            kv_segment_ids=jnp.ones((1, kv_len), jnp.int32), scale=1.0, position_bias=bias)[0]))
    total = sum(q for q, _ in seqs)
    np.testing.assert_allclose(out[:total], np.concatenate(want), atol=2e-5)
    plain, _, _ = paged_op(**inputs, scale=1.0)
    assert np.abs(np.asarray(out - plain)).max() > 0.1, "the bias must change the output"
