"""Scheduling under pressure gives the same tokens: preemption, prefix caching, chunked prefill."""

from __future__ import annotations

import pytest

from model_lib.sharding import load_mesh_preset
from serving import LLM, SamplingParams
from tests.serving.helpers import prompts, token_prompts

# Module-scoped fixtures: keep this file on one xdist worker (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("engine")

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
CASE = "llama-gqa"


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    _, hf_model = tiny_checkpoint(CASE)
    shared = prompts((20,), seed=1)[0]
    # Prompts with a long common prefix (prefix caching) and some unrelated ones.
    prompt_ids = [shared + p for p in prompts((2, 5, 9), seed=2)] + prompts((3, 26), seed=3)
    import torch

    with torch.no_grad():
        refs = [
            hf_model.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p in prompt_ids
        ]
    return prompt_ids, refs


@pytest.mark.parametrize(
    "name,engine_args",
    [
        ("tiny pool: preemption", dict(num_pages=10, page_size=4, max_num_batched_tokens=64)),
        ("prefix caching off", dict(enable_prefix_caching=False, page_size=4, max_num_batched_tokens=64)),
        ("small budget: chunked prefill", dict(max_num_batched_tokens=16, page_size=4)),
        # The CPU backend's own smallest token bucket (1; tests/conftest.py pads to 8 elsewhere).
        ("one sequence at a time", dict(max_num_seqs=1, page_size=8, max_num_batched_tokens=32, min_token_bucket=None)),
    ],
)
def test_same_tokens_under_scheduling_pressure(name, engine_args, tiny_checkpoint, expected):
    folder, _ = tiny_checkpoint(CASE)
    prompt_ids, refs = expected
    llm = LLM(folder, max_model_len=40, **engine_args)
    outputs = llm.generate(token_prompts(prompt_ids), GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == refs, name
    engine = llm.engine
    assert engine.pool.all_free(), "every page is back in the pool"
    if "preemption" in name:
        assert engine.scheduler.num_preemptions > 0
    if "chunked" in name:
        assert max(len(p) for p in prompt_ids) > 16  # the long prompts needed several steps


def test_cpu_tight_buckets_fit_the_batch_and_give_the_same_tokens(tiny_checkpoint, expected, monkeypatch):
    """The CPU backend's default step shapes (tests/conftest.py turns them off elsewhere): sequences and page tables
    pad to their own powers of two from one, not to the token bucket and eight pages, and greedy tokens still equal
    transformers'."""
    folder, _ = tiny_checkpoint(CASE)
    prompt_ids, refs = expected
    sizes = dict(max_model_len=40, page_size=4, max_num_batched_tokens=64, min_token_bucket=None)
    monkeypatch.setenv("JAXLLM_TIGHT_BUCKETS", "0")
    assert LLM(folder, **sizes).engine.runner._padded(40, 3, 2) == (64, 64, 8)
    monkeypatch.setenv("JAXLLM_TIGHT_BUCKETS", "1")
    llm = LLM(folder, **sizes)
    assert llm.engine.runner._padded(40, 3, 2) == (64, 4, 2)
    outputs = llm.generate(token_prompts(prompt_ids), GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == refs
    monkeypatch.setenv("JAXLLM_TIGHT_BUCKETS", "maybe")
    with pytest.raises(ValueError, match="JAXLLM_TIGHT_BUCKETS='maybe'"):
        LLM(folder, **sizes)


def test_min_token_bucket_defaults_to_the_backend_and_is_bounded(monkeypatch):
    import jax

    from serving.engine.runner import check_min_token_bucket, env_min_token_bucket

    assert check_min_token_bucket(None) == (1 if jax.default_backend() == "cpu" else 8)
    assert check_min_token_bucket(16) == 16
    for bad in (0, -8, True, 8.0, (1 << 16) + 1):
        with pytest.raises(ValueError, match="min_token_bucket must be an integer"):
            check_min_token_bucket(bad)
    monkeypatch.setenv("JAXLLM_MIN_TOKEN_BUCKET", "eight")
    with pytest.raises(ValueError, match="JAXLLM_MIN_TOKEN_BUCKET='eight'"):
        env_min_token_bucket()
    monkeypatch.setenv("JAXLLM_MIN_TOKEN_BUCKET", "")
    assert env_min_token_bucket() is None
    from serving.openai.cli import parse_args

    assert parse_args(["model"]).min_token_bucket is None  # the engine's default then
    assert parse_args(["model", "--min-token-bucket", "4"]).min_token_bucket == 4


def test_prefix_cache_reuses_pages_across_requests(tiny_checkpoint, expected):
    folder, _ = tiny_checkpoint(CASE)
    prompt_ids, refs = expected
    llm = LLM(folder, max_model_len=40, page_size=4, max_num_batched_tokens=64)
    first = llm.generate(token_prompts(prompt_ids[:1]), GREEDY)
    assert llm.engine.pool.hit_rate() == 0.0
    rest = llm.generate(token_prompts(prompt_ids[1:3]), GREEDY)
    assert [o.outputs[0].token_ids for o in first + rest] == refs[:3]
    # The 20-token shared prefix is 5 full pages: both later prompts found them.
    assert llm.engine.pool.prefix_hits >= 2 * 20
    assert llm.engine.pool.all_free()


def test_abort_frees_pages(tiny_checkpoint, expected):
    folder, _ = tiny_checkpoint(CASE)
    prompt_ids, _ = expected
    llm = LLM(folder, max_model_len=40, page_size=4, max_num_batched_tokens=64)
    engine = llm.engine
    for i, p in enumerate(prompt_ids):
        engine.add_request(str(i), p, GREEDY)
    engine.step()
    engine.step()
    assert not engine.pool.all_free()
    for i in range(len(prompt_ids)):
        engine.abort_request(str(i))
    assert engine.pool.all_free() and not engine.has_unfinished_requests()
    assert not engine.scheduler.has_work()


def test_bad_requests_are_refused_with_a_reason(tiny_checkpoint):
    folder, _ = tiny_checkpoint(CASE)
    llm = LLM(folder, max_model_len=40, page_size=4)
    with pytest.raises(ValueError, match="prompt is 40 tokens; max_model_len is 40"):
        llm.generate({"prompt_token_ids": [5] * 40}, GREEDY)
    with pytest.raises(ValueError, match=r"prompt token ids must be integers in \[0, 128\)"):
        llm.generate({"prompt_token_ids": [5, 500]}, GREEDY)
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.generate({"prompt_token_ids": []}, GREEDY)
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        LLM(folder, max_model_len=40, page_size=4, num_pages=3)
    # The engine still serves after refusing.
    assert llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY)[0].outputs[0].finish_reason == "length"
    assert llm.engine.pool.all_free()


def test_tensor_parallel_engine_gives_the_same_tokens(tiny_checkpoint, expected):
    """Parameters and KV pages sharded over 8 simulated devices (tp preset, tensor 4): same greedy tokens."""
    import jax

    if jax.device_count() < 8:
        pytest.skip("needs 8 simulated devices (tests/conftest.py sets XLA_FLAGS)")
    folder, _ = tiny_checkpoint("gemma3-local-global")
    prompt_ids, _ = expected
    single = LLM(folder, max_model_len=40, page_size=4, max_num_batched_tokens=64)
    # 4 query heads split over tensor 4 (x 2 data); the single kv head is replicated.
    sharded = LLM(folder, max_model_len=40, page_size=4, max_num_batched_tokens=64, mesh=load_mesh_preset("tp", tensor=4, data=2))
    state = sharded.engine.runner.state  # the serving view: scanned runs hold stacked layers
    q_proj = next(leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state) if "q_proj" in jax.tree_util.keystr(path))
    assert len(q_proj.sharding.device_set) == 8
    ours = [o.outputs[0].token_ids for o in sharded.generate(token_prompts(prompt_ids), GREEDY)]
    assert ours == [o.outputs[0].token_ids for o in single.generate(token_prompts(prompt_ids), GREEDY)]


@pytest.mark.parametrize("case", ["deepseek_v3-noaux-yarn", "llama4-chunked-nope-moe"])
def test_expert_parallel_engine_gives_transformers_tokens(tiny_checkpoint, case):
    """MoE models served over the ep preset (experts over `expert` 4, heads over `tensor` 2; DeepSeek-V3's latent
    MLA pages, Llama 4's chunked attention): transformers' greedy tokens for a mixed batch."""
    import jax

    from tests.serving.helpers import hf_greedy

    if jax.device_count() < 8:
        pytest.skip("needs 8 simulated devices (tests/conftest.py sets XLA_FLAGS)")
    folder, reference = tiny_checkpoint(case)
    prompt_ids = prompts((5, 11, 3), seed=4)
    llm = LLM(folder, max_model_len=32, page_size=4, max_num_batched_tokens=16, mesh="ep")
    experts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(llm.engine.runner.state)
               if "['experts']" in jax.tree_util.keystr(path) and leaf.ndim >= 3]
    assert experts and all(leaf.sharding.spec[-3] == "expert" for leaf in experts)  # [(L,) X, in, out]
    ours = [o.outputs[0].token_ids for o in llm.generate(token_prompts(prompt_ids), GREEDY)]
    assert ours == [hf_greedy(reference, p, GREEDY.max_tokens) for p in prompt_ids]
