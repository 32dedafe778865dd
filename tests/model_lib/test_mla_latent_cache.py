"""MLA layers serve from the latent cache (kv_lora_rank + qk_rope_head_dim values per token and layer,
one pool shared by all heads) through the absorbed projections, and match transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_lib
from model_lib.cache_spec import LatentKV, cache_specs
from model_lib.layers import PagedBatch
from model_lib.sharding import load_mesh_preset
from pallas_kernels.paged_attention import PagedMetadata, QuantizedPages
from pallas_kernels.paged_attention.kv_quant import page_values
from serving import LLM, SamplingParams
from tests.serving.helpers import prompts, token_prompts
from tests.tiny_models import assert_logits_close, hf_logits, random_ids

# Module-scoped fixtures: keep this file on one xdist worker (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("mla_latent")

PAGE_SIZE = 4
MLA_CASES = ["minicpm3-noqlora-widev-untied", "deepseek_v2-greedy-qlora", "deepseek_v3-halfrope-allmoe"]
ENGINE_CASE = "deepseek_v3-halfrope-allmoe"  # two identical MoE layers: one scanned run
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@nnx.jit
def paged_forward(model, ids, batch, caches):
    return model.forward(ids, batch, caches)


def one_sequence_step(ids: np.ndarray, start: int, num_pages: int, expanded: bool = False) -> PagedBatch:
    """The paged batch of one sequence whose tokens `start..len(ids)-1` are new (the rest are cached);
    `expanded`: it attends in the expanded form."""
    n, kv_len = len(ids) - start, len(ids)
    meta = PagedMetadata(jnp.array([0, n], jnp.int32), jnp.array([kv_len], jnp.int32),
                         jnp.arange(num_pages, dtype=jnp.int32)[::-1][None], jnp.int32(1))  # pages in reverse
    return PagedBatch(positions=jnp.arange(start, kv_len, dtype=jnp.int32), seq_lens=jnp.full(n, kv_len, jnp.int32),
                      meta=meta, expanded_from=jnp.int32(0) if expanded else None)


# (case, page dtype, bound on |logit - transformers| relative to the logit scale, prefill chunks expanded);
# int8 pages: 2.1e-3 measured on the first chunk.
# DeepSeek-V2 (MLA_CASES[1]) is held to its dense forward in the adapter test below.
LOGITS_CASES = [(MLA_CASES[0], "float32", 1e-4, False), (MLA_CASES[2], "float32", 1e-4, False),
                (MLA_CASES[2], "int8", 1e-2, False), (MLA_CASES[0], "float32", 1e-4, True),
                (MLA_CASES[2], "float32", 1e-4, True)]


@pytest.mark.parametrize("case,page_dtype,bound,expanded", LOGITS_CASES)
def test_latent_pages_prefill_chunks_and_decode_match_transformers(case, page_dtype, bound, expanded,
                                                                   tiny_checkpoint):
    """Two prefill chunks then two decode tokens over latent pages: each step's logits equal transformers' on the
    prefix so far (the second chunk and the decode steps read the latents the earlier steps wrote). `expanded`:
    the chunks attend in the expanded form (the second one to the first one's latents up-projected), the decode
    tokens absorbed."""
    folder, hf_model = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder)
    config = model.config
    ids = random_ids(1, 14, seed=8)[0]
    num_pages = -(-len(ids) // PAGE_SIZE)
    caches = model.make_kv_caches(num_pages, PAGE_SIZE, jnp.dtype(page_dtype))
    width = config.kv_lora_rank + config.qk_rope_head_dim
    assert cache_specs(config) == [LatentKV(width)] * config.num_layers
    pools = [page_values(c) for c in jax.tree.leaves(caches, is_leaf=lambda c: isinstance(c, QuantizedPages))]
    assert [(p.shape, p.dtype) for p in pools] == [((1, num_pages, PAGE_SIZE, width), page_dtype)] * config.num_layers
    for start, end in ((0, 7), (7, 12), (12, 13), (13, 14)):
        batch = one_sequence_step(ids[:end], start, num_pages, expanded and end - start > 1)
        logits, caches = paged_forward(model, jnp.asarray(ids[start:end]), batch, caches)
        assert_logits_close(logits, hf_logits(hf_model, ids[None, :end])[0, start:end], rel=bound)


@pytest.fixture(scope="module")
def engine_expected(tiny_checkpoint):
    """Prompts sharing a 16-token prefix, and transformers' greedy tokens for each."""
    import torch

    _, hf_model = tiny_checkpoint(ENGINE_CASE)
    shared = prompts((16,), seed=11)[0]
    prompt_ids = [shared + p for p in prompts((3, 7, 2), seed=12)] + prompts((22,), seed=13)
    with torch.no_grad():
        refs = [hf_model.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  pad_token_id=0)[0, len(p):].tolist() for p in prompt_ids]
    return prompt_ids, refs


def generated(llm: LLM, prompt_ids: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(token_prompts(prompt_ids), GREEDY)]


def record_expanded_from(runner) -> list[int | None]:
    """Each step's `expanded_from` (None: all rows absorbed), recorded as the runner prepares it."""
    seen, prepare = [], runner.prepare

    def spy(scheduled):
        inputs = prepare(scheduled)
        first = inputs.batch.expanded_from
        seen.append(None if first is None else int(first))
        return inputs

    runner.prepare = spy
    return seen


# mla_expanded_prefill_tokens: 0 keeps every step absorbed; 4 sends chunks of >= 4 tokens through the
# expanded form while decode rows of the same steps stay absorbed.
@pytest.mark.parametrize("expanded_tokens", [0, 4])
def test_latent_engine_prefix_caching_chunked_prefill_and_preemption(expanded_tokens, tiny_checkpoint,
                                                                      engine_expected):
    folder, _ = tiny_checkpoint(ENGINE_CASE)
    prompt_ids, refs = engine_expected
    # A 12-token step budget chunks every prompt; 12 pages of 4 tokens cannot hold all four sequences at once.
    # The scanned step (the accelerator default) carries both layers' latent pools stacked.
    llm = LLM(folder, max_model_len=32, page_size=PAGE_SIZE, max_num_batched_tokens=12, num_pages=12, scan_layers=True,
              mla_expanded_prefill_tokens=expanded_tokens)
    engine, config = llm.engine, llm.engine.model_config
    # The runner allocates kv_lora_rank + qk_rope_head_dim values per token and layer, nothing per head.
    width = config.kv_lora_rank + config.qk_rope_head_dim
    assert [p.shape for p in jax.tree.leaves(engine.runner.kv_caches)] == [(1, 2, 12, PAGE_SIZE, width)]
    assert engine.runner.kv_cache_bytes == 12 * PAGE_SIZE * width * jnp.dtype(config.dtype).itemsize * config.num_layers
    seen = record_expanded_from(engine.runner)
    first = generated(llm, prompt_ids[:1])
    assert engine.pool.prefix_hits == 0
    rest = generated(llm, prompt_ids[1:])
    assert first + rest == refs
    assert engine.pool.prefix_hits >= 2 * 16  # the later prompts read the shared prefix's latent pages
    assert engine.scheduler.num_preemptions > 0
    assert engine.pool.all_free()
    if expanded_tokens:  # expanded-only steps and steps mixing absorbed decode rows with expanded chunks
        assert 0 in seen and any(f for f in seen if f is not None) and None in seen
    else:
        assert set(seen) == {None}


def test_latent_pages_replicated_and_heads_split_under_tensor_parallelism(tiny_checkpoint, engine_expected):
    """tp over 4 heads (tensor 4 x data 2): the latent pool is whole on every device, kv_b_proj's heads are
    split, and the greedy tokens equal transformers' (so the unsharded engine's). Prefill chunks of >= 4 tokens
    run the expanded form, decode rows the absorbed one."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 simulated devices (tests/conftest.py sets XLA_FLAGS)")
    folder, _ = tiny_checkpoint(ENGINE_CASE)
    prompt_ids, refs = engine_expected
    llm = LLM(folder, max_model_len=32, page_size=PAGE_SIZE, max_num_batched_tokens=64,
              mesh=load_mesh_preset("tp", tensor=4, data=2), mla_expanded_prefill_tokens=4)
    seen = record_expanded_from(llm.engine.runner)
    for pages in jax.tree.leaves(llm.engine.runner.kv_caches):
        assert pages.sharding.is_fully_replicated and pages.shape[0] == 1
    state = llm.engine.runner.state
    kv_b = next(leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)
                if "kv_b_proj" in jax.tree_util.keystr(path))
    assert not kv_b.sharding.is_fully_replicated
    assert generated(llm, prompt_ids) == refs
    assert 0 in seen and None in seen


def test_absorbed_path_folds_a_kv_b_proj_adapter(tiny_checkpoint, forward):
    """A LoRA adapter on kv_b_proj (trained, not merged) enters the absorbed W_UK / W_UV: the paged latent
    path gives the dense (expanded) forward's logits for the adapted model."""
    from model_lib.lora import LoraConfig, apply_lora

    folder, _ = tiny_checkpoint(MLA_CASES[1])
    model = model_lib.from_pretrained(folder)
    groups = apply_lora(model, LoraConfig(r=4, target_modules=["kv_b_proj"]))
    rng = np.random.RandomState(5)
    for _, parts in groups.items():
        for _, layer in parts:
            layer.lora_b.set_value(jnp.asarray(rng.randn(*layer.lora_b.shape) * 0.2, jnp.float32))
    ids = random_ids(1, 10, seed=9)[0]
    num_pages = -(-len(ids) // PAGE_SIZE)
    caches = model.make_kv_caches(num_pages, PAGE_SIZE, jnp.float32)
    paged, _ = paged_forward(model, jnp.asarray(ids), one_sequence_step(ids, 0, num_pages), caches)
    dense = forward(model, ids[None], np.ones((1, len(ids)), np.int32))[0]
    assert_logits_close(paged, np.asarray(dense))
    base = hf_logits(tiny_checkpoint(MLA_CASES[1])[1], ids[None])[0]
    assert float(np.abs(np.asarray(paged) - base).max()) > 1e-2  # the adapter moved the logits


def test_served_adapters_refuse_kv_b_proj_by_name(tiny_checkpoint, tmp_path):
    """Serving folds kv_b_proj into the attention weights, where a per-token served adapter cannot reach: an
    adapter on it is refused at load, naming it, rather than silently dropped."""
    from model_lib.lora import LoraConfig, apply_lora, save_peft_adapter
    from serving.lora.manager import LoRAManager

    folder, _ = tiny_checkpoint(MLA_CASES[1])
    model = model_lib.from_pretrained(folder)
    config = LoraConfig(r=2, target_modules=["q_b_proj", "kv_b_proj"])
    apply_lora(model, config)
    save_peft_adapter(model, config, tmp_path / "adapter", str(folder))
    manager = LoRAManager(model_lib.from_pretrained(folder), max_loras=1, max_lora_rank=4)
    assert not any(path.endswith("kv_b_proj") for path in manager.layers)
    with pytest.raises(ValueError, match=r"kv_b_proj.*which served adapters do not support"):
        manager.load("mla", tmp_path / "adapter")
