"""LoRA on MoE expert stacks: PEFT's `target_parameters` layout in and out, same logits as transformers + PEFT."""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import model_lib
from model_lib.layers.linear import LoRAParam
from model_lib.layers.moe import expert_layers
from model_lib.lora import LoraConfig, apply_lora, load_peft_adapter, merge_lora, read_peft_adapter, save_peft_adapter
from tests.tiny_models import SEQ_LEN, assert_logits_close, hf_logits, random_ids

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Attention only: PEFT on transformers 5 reads MLP names (`gate_proj`, `all-linear`) of these model types as
# transformers 4's per-expert modules and retargets them to the fused experts.
MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def _randomize_adapters(model, seed: int) -> None:
    """Nonzero A and B everywhere (fresh adapters have B = 0, which would hide layout mistakes)."""
    rng = np.random.RandomState(seed)
    for _, variable in nnx.iter_graph(model):  # each variable once, shared ones too
        if isinstance(variable, LoRAParam):
            variable.set_value(jnp.asarray(rng.randn(*variable.shape) * 0.2, variable.dtype))


@pytest.mark.parametrize("case,targets,parameters", [
    ("deepseek_v3-noaux-yarn", MLA, EXPERT_PARAMS),
    ("qwen3_moe-sparse-step", ["q_proj"], ["gate_up_proj"]),  # a suffix, and one parameter alone (no nesting)
    ("mixtral-moe", ["o_proj"], EXPERT_PARAMS),
    ("glm4_moe-grouped-sigmoid", [], ["experts.down_proj"]),
    # Fused [X, in, out] parameters: Llama 4's (PEFT's lora_A on the output side) and gpt-oss's (gate/up interleaved).
    ("llama4-chunked-nope-moe", ["q_proj"], ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]),
    ("gpt_oss-sinks-sliding", ["o_proj"], EXPERT_PARAMS),
])
def test_expert_adapter_matches_transformers_and_peft(case, targets, parameters, tiny_checkpoint, tmp_path):
    import peft

    folder, hf_model = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, target_parameters=parameters)
    apply_lora(model, config, seed=0)
    stacks = {p: s for p, s in expert_layers(model).items() if s.lora_a is not None}
    moe_layers = sum(model.config.moe_layers)
    assert len(stacks) == moe_layers * sum(2 if p.endswith("gate_up_proj") else 1 for p in parameters)
    assert all(s.lora_a.shape[0] == model.config.num_experts for s in stacks.values())
    _randomize_adapters(model, seed=1)
    save_peft_adapter(model, config, tmp_path / "adapter", str(folder))

    ids = random_ids(2, SEQ_LEN, seed=3)
    ours = np.asarray(model(jnp.asarray(ids)), np.float32)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert_logits_close(ours, hf_logits(reference, ids))
    assert not np.allclose(ours, np.asarray(model_lib.from_pretrained(folder)(jnp.asarray(ids))), atol=1e-3)

    reloaded = model_lib.from_pretrained(folder)
    assert load_peft_adapter(reloaded, tmp_path / "adapter").target_parameters == sorted(parameters)
    np.testing.assert_allclose(np.asarray(reloaded(jnp.asarray(ids))), ours, rtol=1e-5, atol=1e-5)
    merge_lora(reloaded)
    assert all(s.lora_a is None for s in expert_layers(reloaded).values())
    np.testing.assert_allclose(np.asarray(reloaded(jnp.asarray(ids))), ours, rtol=1e-4, atol=1e-4)


def test_peft_trained_expert_adapter_loads_here(tiny_checkpoint, tmp_path):
    """The other direction: an adapter made by PEFT on the transformers model (both wrappers nested)."""
    import peft

    folder, hf_model = tiny_checkpoint("deepseek_v3-noaux-yarn")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=EXPERT_PARAMS, init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(hf_model), config).eval()
    reference.save_pretrained(tmp_path / "adapter")
    ids = random_ids(2, SEQ_LEN, seed=4)
    model = model_lib.from_pretrained(folder)
    load_peft_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        assert_logits_close(np.asarray(model(jnp.asarray(ids)), np.float32), hf_logits(reference, ids))


def test_expert_targets_are_refused_by_name(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("deepseek_v3-noaux-yarn")
    model = model_lib.from_pretrained(folder)
    with pytest.raises(ValueError, match="match no expert parameter.*gate_up_proj"):
        apply_lora(model, LoraConfig(lora_dropout=0.0, target_modules=[], target_parameters=["experts.w1"]))
    with pytest.raises(ValueError, match="lora_dropout 0"):
        LoraConfig(lora_dropout=0.1, target_parameters=EXPERT_PARAMS)
    dbrx = model_lib.from_pretrained(tiny_checkpoint("dbrx-clip-moe")[0])
    with pytest.raises(ValueError, match="experts of DbrxForCausalLM is not supported"):
        apply_lora(dbrx, LoraConfig(lora_dropout=0.0, target_modules=[], target_parameters=EXPERT_PARAMS))
    llama4 = model_lib.from_pretrained(tiny_checkpoint("llama4-chunked-nope-moe")[0])
    with pytest.raises(ValueError, match="match no expert parameter.*feed_forward.experts.gate_up_proj"):
        apply_lora(llama4, LoraConfig(lora_dropout=0.0, target_modules=[], target_parameters=EXPERT_PARAMS))
    dense = model_lib.from_pretrained(tiny_checkpoint("llama-gqa")[0])
    with pytest.raises(ValueError, match="no MoE expert stacks"):
        apply_lora(dense, LoraConfig(lora_dropout=0.0, target_modules=[], target_parameters=EXPERT_PARAMS))


def test_served_adapters_refuse_expert_targets_by_name(tiny_checkpoint, tmp_path):
    from serving.lora.manager import LoRAManager

    folder, _ = tiny_checkpoint("deepseek_v3-noaux-yarn")
    model = model_lib.from_pretrained(folder)
    config = LoraConfig(r=2, lora_dropout=0.0, target_modules=["q_b_proj"], target_parameters=["mlp.experts.down_proj"])
    apply_lora(model, config)
    save_peft_adapter(model, config, tmp_path / "adapter", str(folder))
    _, weights = read_peft_adapter(model_lib.from_pretrained(folder), tmp_path / "adapter")
    assert any(p.endswith("mlp.experts.down_proj") for p in weights)
    served = model_lib.from_pretrained(folder)
    manager = LoRAManager(served, max_loras=1, max_lora_rank=4)
    with pytest.raises(ValueError, match=r"mlp\.experts\.down_proj.*which served adapters do not support"):
        manager.load("experts", tmp_path / "adapter")
