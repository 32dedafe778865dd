"""The shared MoE layer: grouped matmul, routing and the router load-balancing loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_lib
from model_lib.layers.moe import capture_router_logits, collect_router_logits, grouped_matmul, router_aux_loss
from tests.tiny_models import SEQ_LEN, padded_batch


def test_grouped_matmul_matches_a_per_expert_loop_with_empty_groups():
    rng = np.random.RandomState(0)
    sizes = np.array([3, 0, 5, 0, 2], np.int32)
    lhs = rng.randn(int(sizes.sum()), 6).astype(np.float32)
    rhs = rng.randn(len(sizes), 6, 4).astype(np.float32)
    ends = np.cumsum(sizes)
    expected = np.concatenate([lhs[e - s : e] @ rhs[g] for g, (s, e) in enumerate(zip(sizes, ends))])
    np.testing.assert_allclose(grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["mixtral-moe", "qwen2_moe-shared"])
def test_router_aux_loss_matches_transformers(case, tiny_checkpoint):
    import torch

    folder, hf_model = tiny_checkpoint(case)
    ids, mask, _ = padded_batch(seed=9)
    with torch.no_grad():
        out = hf_model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_router_logits=True)
    model = model_lib.from_pretrained(folder)
    assert model.config.router_aux_loss_coef == hf_model.config.router_aux_loss_coef

    collect_router_logits(model)
    logits, router_logits = capture_router_logits(lambda m, ids, mask: m(ids, mask))(model, ids, mask)
    assert len(router_logits) == sum(model.config.moe_layers)
    np.testing.assert_allclose(float(router_aux_loss(model.config, router_logits, mask)), float(out.aux_loss), rtol=1e-5)

    # Inside a jitted step (as the trainer runs it), with gradients into the router.
    @nnx.jit
    def loss(model, ids, mask):
        def f(model):
            _, router_logits = capture_router_logits(lambda m: m(ids, mask))(model)
            return router_aux_loss(model.config, router_logits, mask)

        return nnx.value_and_grad(f)(model)

    value, grads = loss(model, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(float(value), float(out.aux_loss), rtol=1e-5)
    router_grad = grads["model"]["layers"][0]["mlp"]["gate"]["kernel"][...]
    assert float(jnp.abs(router_grad).max()) > 0
    assert np.isfinite(np.asarray(router_grad)).all()

    collect_router_logits(model, False)
    assert capture_router_logits(lambda m: m(ids, mask))(model)[1] == []


def test_sparsemixer_matches_transformers():
    import torch
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from model_lib.families.mixtral import phimoe_config
    from model_lib.layers.moe import route
    from tests.tiny_models import CASES_BY_NAME

    config = phimoe_config(CASES_BY_NAME["phimoe-sparsemixer-longrope"].hf_config(), "PhimoeForCausalLM")
    config = config.replace(router_jitter=0.2)
    scores = np.random.RandomState(0).randn(64, config.num_experts).astype(np.float32)
    ref_w, ref_ids = sparsemixer(torch.as_tensor(scores), jitter_eps=0.2, training=False, top_k=2)
    ids, weights = route(config, jnp.asarray(scores), None)
    np.testing.assert_array_equal(np.asarray(ids), ref_ids.numpy())
    np.testing.assert_allclose(np.asarray(weights), ref_w.numpy(), rtol=1e-6)
    assert (ref_w.numpy() < 0.999).any()  # the band holds more than one expert somewhere


def test_unsupported_moe_options_are_named():
    import transformers

    from model_lib.families.dbrx import dbrx_config
    from model_lib.families.mixtral import phimoe_config
    from tests.tiny_models import CASES_BY_NAME

    case = CASES_BY_NAME["dbrx-clip-moe"]
    overrides = {**case.overrides, "ffn_config": {**case.overrides["ffn_config"], "moe_normalize_expert_weights": 2.0}}
    with pytest.raises(ValueError, match="moe_normalize_expert_weights"):
        dbrx_config(transformers.DbrxConfig(**case.dims, **overrides), "DbrxForCausalLM")
    case = CASES_BY_NAME["phimoe-sparsemixer-longrope"]
    with pytest.raises(ValueError, match="num_experts_per_tok=3"):
        phimoe_config(transformers.PhimoeConfig(**{**case.dims, **case.overrides, "num_experts_per_tok": 3}), "PhimoeForCausalLM")
