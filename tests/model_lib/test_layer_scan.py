"""The serving view: repeated layers scanned, the model's own parameter tree untouched, caches in its layout.

Generation parity through the view is the serving suites' job (every runner test goes through it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_lib
from model_lib.layer_scan import LayerScan, plan_segments, scanned_view
from model_lib.layers import PagedBatch
from pallas_kernels.paged_attention import PagedMetadata

# Layer structures as letters -> (start, period, repeats) segments.
PLANS = {
    "AAAA": [(0, 1, 4)],
    "A": [(0, 1, 1)],
    "ABABAB": [(0, 2, 3)],  # Gemma 2's local/global alternation
    "ABABC": [(0, 2, 2), (4, 1, 1)],
    "ABACC": [(0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 2)],  # DeciLM-like
    "AAAAABAAAAAB": [(0, 1, 5), (5, 1, 1), (6, 1, 5), (11, 1, 1)],  # Gemma 3's 5 local + 1 global
}


@pytest.mark.parametrize("letters", sorted(PLANS))
def test_plan_segments(letters):
    assert plan_segments(list(letters)) == PLANS[letters]


def llama(num_layers: int):
    from model_lib.families.llama import llama_config
    from tests.tiny_models import CASES_BY_NAME

    hf_config = CASES_BY_NAME["llama-gqa"].hf_config()
    hf_config.num_hidden_layers = num_layers
    return model_lib.from_config(llama_config(hf_config, "LlamaForCausalLM"), seed=4)


def prefill_step(vocab: int, num_tokens: int = 5):
    """One sequence's first `num_tokens` tokens as a paged step over pages 2 and 0 (page size 4)."""
    meta = PagedMetadata(jnp.array([0, num_tokens], jnp.int32), jnp.array([num_tokens], jnp.int32),
                         jnp.array([[2, 0]], jnp.int32), jnp.int32(1))
    positions = jnp.arange(num_tokens, dtype=jnp.int32)
    batch = PagedBatch(positions=positions, seq_lens=jnp.full((num_tokens,), num_tokens, jnp.int32), meta=meta)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, vocab, num_tokens), jnp.int32)
    return ids, batch


def test_view_scans_keeps_the_model_tree_and_matches_the_unrolled_step():
    """Three layers become one scanned run with the same logits and KV pages as the layer loop."""
    model = llama(3)
    shapes = jax.tree.map(jnp.shape, nnx.state(model))
    view = scanned_view(model)
    assert [(type(e), e.period, e.repeats) for e in view.model.layers] == [(LayerScan, 1, 3)]
    assert jax.tree.map(jnp.shape, nnx.state(model)) == shapes  # the model's own tree is untouched
    assert view.model.embed_tokens.weight[...] is model.model.embed_tokens.weight[...]  # shared, not copied

    per_layer, stacked = model.make_kv_caches(3, 4, jnp.float32), view.make_kv_caches(3, 4, jnp.float32)
    assert len(per_layer) == 3 and [a.shape for a in jax.tree.leaves(stacked)] == [(2, 3, 3, 4, 16)] * 2
    ids, batch = prefill_step(model.config.vocab_size)
    want, want_caches = jax.jit(lambda c: model.forward(ids, batch, c))(per_layer)
    got, got_caches = jax.jit(lambda c: view.forward(ids, batch, c))(stacked)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    (got_k, got_v), = got_caches[0]
    np.testing.assert_allclose(got_k, jnp.stack([k for k, _ in want_caches], axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_v, jnp.stack([v for _, v in want_caches], axis=1), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(got_k[:, :, 2])).max() > 0  # the prompt's keys landed in page 2 of every layer
    assert np.abs(np.asarray(got_k[:, :, 1])).max() == 0  # and nowhere else


def test_step_program_does_not_grow_with_depth():
    """The traced step of a 2- and an 8-layer model holds the same number of matmuls (one scanned body)."""
    dots = {}
    for depth in (2, 8):
        view = scanned_view(llama(depth))
        ids, batch = prefill_step(view.config.vocab_size)
        jaxpr = jax.make_jaxpr(lambda c: view.forward(ids, batch, c))(view.make_kv_caches(3, 4, jnp.float32))
        dots[depth] = str(jaxpr).count("dot_general")
    assert dots[2] == dots[8] > 0, dots


def test_alternating_layers_scan_as_blocks_and_lone_layers_stay_unrolled():
    """Sliding/full alternation (Gemma 2) scans as blocks of two; a model whose layers all differ comes back as is."""
    from model_lib.config import FULL_ATTENTION, SLIDING_ATTENTION

    model = llama(4)
    local_global = model.config.replace(sliding_window=3, layer_types=(SLIDING_ATTENTION, FULL_ATTENTION) * 2)
    view = scanned_view(model_lib.from_config(local_global, seed=1))
    assert [(type(e), e.period, e.repeats) for e in view.model.layers] == [(LayerScan, 2, 2)]
    ids, batch = prefill_step(local_global.vocab_size)
    caches = view.make_kv_caches(3, 4, jnp.float32)
    assert [a.shape for a in jax.tree.leaves(caches)] == [(2, 2, 3, 4, 16)] * 4  # [K, repeats, P, B, D]
    logits, _ = jax.jit(lambda c: view.forward(ids, batch, c))(caches)
    unrolled = model_lib.from_config(local_global, seed=1)
    want, _ = jax.jit(lambda c: unrolled.forward(ids, batch, c))(unrolled.make_kv_caches(3, 4, jnp.float32))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)

    distinct = model_lib.from_config(local_global.replace(num_layers=2, layer_types=(SLIDING_ATTENTION, FULL_ATTENTION)))
    assert scanned_view(distinct) is distinct
