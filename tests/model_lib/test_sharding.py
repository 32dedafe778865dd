"""Sharded loading on 8 simulated CPU devices gives the unsharded logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import model_lib
from model_lib.sharding import HeadSplitError, ShardingPlan, load_mesh_preset, make_mesh
from tests.tiny_models import (
    MOE_CASES,
    ONE_PER_ARCHITECTURE,
    SEQ_LEN,
    assert_logits_close,
    ci_rows,
    padded_batch,
)

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
)


# The tiny models have 4 query heads: tp takes 4 of them (x 2 data), fsdp_tp 2 (x 4 fsdp). The architectures
# take the two presets in turn (each preset covers every kind of layer: a second compile per architecture
# tested little more).
PRESETS = {"tp": dict(tensor=4, data=2), "fsdp_tp": {}}
SHARDED_CASES = [(case, ("tp", "fsdp_tp")[i % 2]) for i, case in enumerate(ONE_PER_ARCHITECTURE)]


@pytest.mark.parametrize("case, preset", ci_rows(SHARDED_CASES))
def test_sharded_logits_equal_unsharded(case, preset, tiny_checkpoint, forward):
    sizes = PRESETS[preset]
    folder, _ = tiny_checkpoint(case)
    ids, mask, _ = padded_batch(seed=6)
    reference = np.asarray(forward(model_lib.from_pretrained(folder), ids, mask))

    plan = load_mesh_preset(preset, **sizes)
    model = model_lib.from_pretrained(folder, mesh=plan)
    attn = model.model.layers[0].self_attn
    if attn is not None:  # state-space layers (Mamba) hold no head to split; their weights follow `embed`
        q_kernel = (attn.q_proj if attn.q_proj is not None else attn.q_b_proj).kernel[...]  # MLA: q_a_proj -> q_b_proj
        assert q_kernel.sharding.mesh.shape == plan.mesh.shape
        assert len(q_kernel.sharding.device_set) == 8
        assert q_kernel.sharding.spec != P(None, None), "the query projection should be split"
    assert_logits_close(forward(model, ids, mask), reference, rel=1e-5)


@pytest.mark.parametrize("case", ci_rows(MOE_CASES))
def test_expert_parallel_logits_equal_unsharded(case, tiny_checkpoint, forward):
    """The `ep` preset splits the stacked expert weights over the `expert` axis."""
    folder, _ = tiny_checkpoint(case)
    ids, mask, _ = padded_batch(seed=6)
    reference = np.asarray(forward(model_lib.from_pretrained(folder), ids, mask))

    model = model_lib.from_pretrained(folder, mesh="ep")
    moe = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    kernel = moe.experts.gate_proj.kernel[...]
    assert kernel.sharding.spec[0] in ("expert", ("expert",)), kernel.sharding.spec
    assert len(kernel.sharding.device_set) == 8
    assert_logits_close(forward(model, ids, mask), reference, rel=1e-5)


def test_presets_shape_the_mesh():
    tp = load_mesh_preset("tp")
    assert dict(tp.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 8, "expert": 1}
    fsdp_tp = load_mesh_preset("fsdp_tp")
    assert dict(fsdp_tp.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    assert dict(load_mesh_preset("fsdp_tp", tensor=4).mesh.shape)["fsdp"] == 2
    assert dict(load_mesh_preset("ep").mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 2, "expert": 4}


def test_partition_spec_rules():
    plan = ShardingPlan(make_mesh({"fsdp": 2, "tensor": 4}))
    assert plan.partition_spec(("embed", "q_heads"), (64, 64)) == P(("fsdp",), ("tensor",))
    assert plan.partition_spec(("vocab", "embed"), (128, 64)) == P(("tensor",), ("fsdp",))
    # A dimension the axes do not divide stays whole.
    assert plan.partition_spec(("embed", "mlp"), (64, 6)) == P(("fsdp",), None)
    assert plan.partition_spec(("norm",), (64,)) == P(None)
    # Heads split whole: an MQA k_proj (4096, 128) is one head, replicated; never split inside it.
    assert plan.partition_spec(("embed", "kv_heads"), (4096, 128), head_size=128) == P(("fsdp",), None)
    assert plan.partition_spec(("embed", "kv_heads"), (4096, 8 * 128), head_size=128) == P(("fsdp",), ("tensor",))
    with pytest.raises(HeadSplitError, match="valid sizes: 1, 2, 3, 6"):
        plan.partition_spec(("embed", "q_heads"), (64, 6 * 128), head_size=128)  # 6 heads over 4 devices
    with pytest.raises(HeadSplitError, match="valid sizes: 1, 3, 6"):
        plan.partition_spec(("kv_heads", None), (3, 16))  # 3 kv heads neither split nor replicate over 4


def test_bad_mesh_requests_are_named():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 8})
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh({"tensor": 6})
    with pytest.raises(FileNotFoundError, match="presets: .*tp"):
        load_mesh_preset("no_such_preset")


def test_random_init_model_can_be_sharded():
    from model_lib.families.llama import llama_config
    from tests.tiny_models import CASES_BY_NAME

    config = llama_config(CASES_BY_NAME["llama-gqa"].hf_config(), "LlamaForCausalLM")
    ids = np.arange(2 * SEQ_LEN, dtype=np.int32).reshape(2, SEQ_LEN) % config.vocab_size
    unsharded = np.asarray(model_lib.from_config(config, seed=3)(ids))
    sharded = model_lib.from_config(config, seed=3, mesh="fsdp_tp")
    assert len(sharded.model.embed_tokens.weight[...].sharding.device_set) == 8
    assert_logits_close(sharded(ids), unsharded, rel=1e-5)


# Realistic heads: 28 query heads of head_dim 128 (Qwen2.5-7B's q_proj) with 1..8 kv heads; tensor 8, which
# 28 heads refuse, with each kv count; kv heads split (kv >= tensor) or replicated (kv < tensor) at each
# tensor size, and 32 heads at tensor 8. The hidden size stays small.
WHOLE_HEAD_CASES = [(28, 1, 2), (28, 4, 2), (28, 2, 4), (28, 4, 4)] + [(28, kv, 8) for kv in (1, 2, 4)] + \
    [(32, 2, 8), (32, 8, 8)]
# Tensor sizes that keep 28 query heads and this many kv heads whole (kv heads split or replicated).
VALID_FOR_28 = {1: "1, 2, 4, 7, 14, 28", 2: "1, 2, 4, 14, 28", 4: "1, 2, 4, 28"}


def _head_model_config(num_heads: int, kv_heads: int):
    from model_lib.families.llama import llama_config
    from tests.tiny_models import TinyCase

    # transformers wants the hidden size a multiple of the head count; head_dim is set apart from it.
    heads = dict(num_attention_heads=num_heads, num_key_value_heads=kv_heads, head_dim=128, hidden_size=8 * num_heads)
    case = TinyCase("heads", "LlamaConfig", dict(heads, num_hidden_layers=1))
    return llama_config(case.hf_config(), "LlamaForCausalLM")


@pytest.mark.parametrize("num_heads, kv_heads, tensor", WHOLE_HEAD_CASES, ids=[f"q{q}-kv{k}-tp{t}" for q, k, t in WHOLE_HEAD_CASES])
def test_heads_split_whole_or_refused(num_heads, kv_heads, tensor, forward):
    from serving.engine.runner import ModelRunner

    config = _head_model_config(num_heads, kv_heads)
    plan = load_mesh_preset("fsdp_tp", tensor=tensor)
    if num_heads % tensor:
        with pytest.raises(HeadSplitError, match=f"valid tensor sizes: {VALID_FOR_28[kv_heads]}$"):
            model_lib.from_config(config, seed=1, mesh=plan)
        return
    ids, mask, _ = padded_batch(seed=7)
    unsharded = np.asarray(forward(model_lib.from_config(config, seed=1), ids, mask))
    model = model_lib.from_config(config, seed=1, mesh=plan)
    attn = model.model.layers[0].self_attn
    q, k, o = attn.q_proj.kernel[...], attn.k_proj.kernel[...], attn.o_proj.kernel[...]
    # Every device holds whole query heads: num_heads / tensor of them.
    assert q.sharding.shard_shape(q.shape)[1] == num_heads // tensor * 128
    assert o.sharding.shard_shape(o.shape)[0] == num_heads // tensor * 128
    kv_per_device = kv_heads // tensor if kv_heads >= tensor else kv_heads  # fewer kv heads: replicated
    assert k.sharding.shard_shape(k.shape)[1] == kv_per_device * 128
    # The KV cache follows the same rule.
    runner = ModelRunner(model, num_pages=4, page_size=4, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=16, plan=plan)
    k_cache = jax.tree.leaves(runner.kv_caches)[0]  # [K, P, B, D], stacked [K, layers, P, B, D] when scanned
    assert k_cache.sharding.shard_shape(k_cache.shape)[0] == kv_per_device
    assert_logits_close(forward(model, ids, mask), unsharded, rel=1e-5)


def test_refusal_names_the_valid_sizes_before_loading(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama-gqa")  # 4 query heads, 2 kv heads
    with pytest.raises(HeadSplitError, match=r"4 query heads and \[2\] kv heads .* valid tensor sizes: 1, 2, 4$"):
        model_lib.from_pretrained(folder, mesh="tp")  # tensor 8
