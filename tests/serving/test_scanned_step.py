"""The serving step scans repeated layers and updates their stacked KV pools in place (no per-layer copies)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from serving.engine.runner import ModelRunner
from tests.hlo_checks import large_copies
from tests.model_lib.test_layer_scan import llama

LAYERS, KV_HEADS, PAGES, PAGE_SIZE, HEAD_DIM = 4, 2, 512, 4, 16  # a layer's pool outsizes any weight


def test_scanned_step_copies_no_kv_pool():
    """Prefill (tiled attention) and decode (reference) steps: one while loop over the 4 layers, the
    stacked pools donated and aliased, and nothing of a layer's pool size copied or sliced anywhere."""
    runner = ModelRunner(llama(LAYERS), num_pages=PAGES, page_size=PAGE_SIZE, max_num_seqs=4,
                         max_num_batched_tokens=16, max_model_len=32, scan_layers=True)
    pools = jax.tree.leaves(runner.kv_caches)
    assert [p.shape for p in pools] == [(KV_HEADS, LAYERS, PAGES, PAGE_SIZE, HEAD_DIM)] * 2
    layer_pool = KV_HEADS * PAGES * PAGE_SIZE * HEAD_DIM
    for shape in [(16, 4, 8), (4, 4, 8)]:
        hlo = runner._step.lower(*runner.step_args(runner.empty_inputs(shape))).compile().as_text()
        assert " while(" in hlo and "input_output_alias" in hlo
        assert large_copies(hlo, layer_pool) == [], shape


def test_the_copy_check_sees_pools_scanned_as_inputs_and_outputs():
    """The control: the layout the runner avoids (pools as the scan's xs/ys) slices a pool per layer."""
    def step(pools, x):
        def body(x, pool):
            pool = pool.at[:, 3, 1].set(x)
            return x + pool[:, 5, 0].sum(), pool

        return jax.lax.scan(body, x, pools)

    pools = jnp.zeros((LAYERS, KV_HEADS, PAGES, PAGE_SIZE, HEAD_DIM))
    hlo = jax.jit(step, donate_argnums=0).lower(pools, jnp.zeros(HEAD_DIM)).compile().as_text()
    assert large_copies(hlo, KV_HEADS * PAGES * PAGE_SIZE * HEAD_DIM)


def test_scanned_engine_matches_transformers(tiny_checkpoint):
    """The scanned engine (the accelerator default; the CPU default unrolls) on Gemma 3's local/global
    stack (scanned runs beside a lone layer): greedy tokens equal transformers', batched."""
    from serving import LLM, SamplingParams
    from tests.serving.helpers import MAX_TOKENS, hf_greedy, prompts, token_prompts

    folder, hf_model = tiny_checkpoint("gemma3-local-global")
    llm = LLM(folder, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64, page_size=4, scan_layers=True)
    assert llm.engine.runner.scan_layers
    prompt_ids = prompts()
    outputs = llm.generate(token_prompts(prompt_ids), SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf_model, p) for p in prompt_ids]
