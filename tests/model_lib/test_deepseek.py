"""DeepSeek-V3 checkpoints as published: the MTP block after the stack, FP8 weights with 128 x 128
(here 32 x 32) block scales. Logit parity of the families is in test_parity.py's table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

import model_lib
from model_lib.checkpoint import CheckpointError
from tests.model_lib.test_prequantized import fp8
from tests.tiny_models import SEQ_LEN, assert_logits_close, hf_logits, random_ids

CASE = "deepseek_v3-noaux-yarn"
FP8_CONFIG = dict(quant_method="fp8", activation_scheme="dynamic", fmt="e4m3", weight_block_size=[32, 32])
UNQUANTIZED = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "mlp.gate.weight")  # as DeepSeek-V3 ships


def mtp_tensors(tensors: dict[str, np.ndarray], layers: int, rng: np.random.RandomState) -> dict[str, np.ndarray]:
    """An MTP block `model.layers.{layers}` in DeepSeek-V3's naming: a decoder layer shaped like the last
    one, `enorm`, `hnorm`, `eh_proj [E, 2E]`, and its own `embed_tokens` and `shared_head`."""
    last = f"model.layers.{layers - 1}."
    block = {f"model.layers.{layers}.{k[len(last):]}": v + rng.randn(*v.shape).astype(v.dtype) * 0.02
             for k, v in tensors.items() if k.startswith(last)}
    hidden = tensors["model.norm.weight"].shape[0]
    extra = {"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden),
             "shared_head.norm.weight": (hidden,)}
    block.update({f"model.layers.{layers}.{k}": rng.randn(*shape).astype(np.float32) * 0.1 for k, shape in extra.items()})
    block[f"model.layers.{layers}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].copy()
    block[f"model.layers.{layers}.shared_head.head.weight"] = tensors["lm_head.weight"].copy()
    return block


def write(folder, tensors: dict[str, object], config: dict) -> None:
    folder.mkdir()
    save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def published(tiny_checkpoint, tmp_path_factory):
    """(FP8 + MTP checkpoint, float checkpoint of the same dequantized weights, transformers model of the latter)."""
    import transformers

    source, hf_model = tiny_checkpoint(CASE)
    tensors = load_file(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    layers = config["num_hidden_layers"]
    rng = np.random.RandomState(0)
    tensors.update(mtp_tensors(tensors, layers, rng))
    config["num_nextn_predict_layers"] = 1

    quantized, dequantized = {}, {}
    pack = fp8("block", 32)
    for name, value in tensors.items():
        if value.ndim == 2 and not name.endswith(UNQUANTIZED):
            packed, dequantized[name] = pack(value, rng)
            quantized.update({f"{name[: -len('.weight')]}.{leaf}": v for leaf, v in packed.items()})
        else:
            quantized[name] = dequantized[name] = value
    root = tmp_path_factory.mktemp("deepseek_v3")
    write(root / "fp8", quantized, {**config, "quantization_config": FP8_CONFIG})
    write(root / "float", dequantized, config)
    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "float", dtype=torch.float32).eval()
    return root / "fp8", root / "float", reference, dequantized


def test_fp8_checkpoint_with_mtp_block_loads_and_matches(published, forward, tmp_path):
    fp8_folder, float_folder, reference, dequantized = published
    model = model_lib.from_pretrained(fp8_folder)
    assert model.config.num_mtp_layers == 1 and len(model.mtp) == 1
    ids = random_ids(2, SEQ_LEN, seed=1)
    assert_logits_close(forward(model, ids, np.ones_like(ids)), hf_logits(reference, ids))

    # The MTP block holds the checkpoint's (dequantized) tensors: kernels transposed, experts stacked.
    mtp, n = model.mtp[0], model.config.num_layers
    np.testing.assert_array_equal(np.asarray(mtp.eh_proj.kernel[...]), dequantized[f"model.layers.{n}.eh_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(mtp.mlp.experts.down_proj.kernel[...][3]),
                                  dequantized[f"model.layers.{n}.mlp.experts.3.down_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(mtp.mlp.shared_expert.up_proj.kernel[...]),
                                  dequantized[f"model.layers.{n}.mlp.shared_experts.up_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(mtp.self_attn.kv_b_proj.kernel[...]),
                                  dequantized[f"model.layers.{n}.self_attn.kv_b_proj.weight"].T)

    # Saved back under the checkpoint's names, MTP block included, as float.
    model_lib.save_pretrained(model, tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) == set(dequantized)
    for name in (f"model.layers.{n}.enorm.weight", f"model.layers.{n}.shared_head.head.weight",
                 f"model.layers.{n}.mlp.gate.e_score_correction_bias", f"model.layers.{n}.self_attn.q_a_proj.weight"):
        np.testing.assert_array_equal(saved[name], dequantized[name])


def test_mtp_block_follows_the_checkpoint(tiny_checkpoint, published, tmp_path):
    # transformers saves DeepSeek-V3 without the block whatever num_nextn_predict_layers says (1 by default).
    folder, hf_model = tiny_checkpoint(CASE)
    assert hf_model.config.num_nextn_predict_layers == 1
    assert model_lib.from_pretrained(folder).mtp is None

    # A block the config does not announce is an unexpected tensor, named.
    _, float_folder, _, dequantized = published
    config = json.loads((float_folder / "config.json").read_text())
    write(tmp_path / "unannounced", dequantized, {**config, "num_nextn_predict_layers": 0})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.2\."):
        model_lib.from_pretrained(tmp_path / "unannounced")


def test_unsupported_router_settings_are_named():
    import dataclasses

    import transformers

    from model_lib.families.deepseek import deepseek_v2_config, deepseek_v3_config
    from tests.tiny_models import CASES_BY_NAME

    def config(name: str, **changes):
        case = CASES_BY_NAME[name]
        return getattr(transformers, case.config_class)(**{**case.dims, **case.overrides, **changes})

    with pytest.raises(ValueError, match="topk_method 'noaux_tc' is not supported"):
        deepseek_v2_config(config("deepseek_v2-greedy-qlora", topk_method="noaux_tc"), "DeepseekV2ForCausalLM")
    with pytest.raises(ValueError, match="needs n_group and topk_group"):
        deepseek_v2_config(config("deepseek_v2-greedy-qlora", topk_method="group_limited_greedy"), "DeepseekV2ForCausalLM")
    with pytest.raises(ValueError, match=r"moe_num_groups \(3\) to divide num_experts \(8\)"):
        deepseek_v3_config(config("deepseek_v3-noaux-yarn", n_group=3), "DeepseekV3ForCausalLM")
    good = deepseek_v3_config(config("deepseek_v3-noaux-yarn"), "DeepseekV3ForCausalLM")
    with pytest.raises(ValueError, match="num_mtp_layers"):
        dataclasses.replace(good, num_mtp_layers=100)


def test_mtp_draft_follows_the_published_formula(published):
    """Our MTP draft's logits against DeepSeek-V3's MTP formula built by hand from transformers parts and the
    same weights: eh_proj([enorm(embed(t_{p+1})); hnorm(h_p)]) -> decoder layer -> shared_head (transformers
    does not run MTP)."""
    import jax.numpy as jnp
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    from model_lib.families.deepseek_mtp import MTPDraft
    from model_lib.layers import DenseBatch

    _, float_folder, reference, tensors = published
    n = reference.config.num_hidden_layers
    prefix = f"model.layers.{n}."
    mtp = {k[len(prefix):]: torch.as_tensor(v) for k, v in tensors.items() if k.startswith(prefix)}
    ids = random_ids(2, SEQ_LEN, seed=3)
    steps = SEQ_LEN - 1  # position p reads token p + 1

    def rms(x, weight):
        x64 = x.double()
        return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + reference.config.rms_norm_eps)).float() * weight

    with torch.no_grad():
        hidden = reference.model(torch.as_tensor(ids)).last_hidden_state  # final normed [B, T, E]
        block = DeepseekV3DecoderLayer(reference.config, layer_idx=n - 1).eval()
        state = {k: v for k, v in mtp.items() if k.split(".")[0] in dict(block.named_children()) and ".experts." not in k}
        experts = range(reference.config.n_routed_experts)
        state["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([mtp[f"mlp.experts.{e}.gate_proj.weight"], mtp[f"mlp.experts.{e}.up_proj.weight"]]) for e in experts])
        state["mlp.experts.down_proj"] = torch.stack([mtp[f"mlp.experts.{e}.down_proj.weight"] for e in experts])
        block.load_state_dict(state)
        embedded = mtp["embed_tokens.weight"][torch.as_tensor(ids[:, 1:])]
        x = torch.cat([rms(embedded, mtp["enorm.weight"]), rms(hidden[:, :-1], mtp["hnorm.weight"])], -1)
        x = x @ mtp["eh_proj.weight"].T
        positions = torch.arange(steps)[None].expand(2, -1)
        causal = torch.full((steps, steps), float("-inf")).triu(1)[None, None]
        out = block(x, attention_mask=causal, position_ids=positions,
                    position_embeddings=reference.model.rotary_emb(x, positions))
        want = rms(out, mtp["shared_head.norm.weight"]) @ mtp["shared_head.head.weight"].T

    model = model_lib.from_pretrained(float_folder)
    draft = MTPDraft(model)
    assert draft.capture_layers() == (n,)
    ones = jnp.ones((2, SEQ_LEN), jnp.int32)
    batch = DenseBatch(positions=jnp.broadcast_to(jnp.arange(SEQ_LEN), (2, SEQ_LEN)), segment_ids=ones,
                       seq_lens=jnp.full((2, SEQ_LEN), SEQ_LEN))
    _, _, captured = model.model(jnp.asarray(ids), batch, capture=(n,))
    np.testing.assert_allclose(np.asarray(captured), hidden.numpy(), atol=1e-4)
    shifted = DenseBatch(positions=batch.positions[:, :steps], segment_ids=ones[:, :steps],
                         seq_lens=jnp.full((2, steps), steps))
    out, _ = draft(jnp.asarray(ids[:, 1:]), captured[:, :-1], shifted, None, True)
    np.testing.assert_allclose(np.asarray(draft.logits(out)), want.numpy(), atol=1e-4)
