"""Remote-code layouts ("convert" and "own" rows): what the tiny parity table does not cover.

The table in tests/tiny_models.py already checks every remote layout's logits and
greedy generations against the native class it re-packs. Here: saving writes the
remote layout back; Qwen past `seq_length` (dynamic NTK, logn attention);
Baichuan-13B's ALiBi against a hand-written reference of its layer math; which
config layout selects which Baichuan variant; the options refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

import model_lib
from model_lib.registry import get_family
from serving import LLM, SamplingParams
from tests.tiny_models import CASES, VOCAB, TinyCase, assert_logits_close, build_checkpoint, hf_logits, random_ids

REMOTE_CASES = [c.name for c in CASES if c.layout is not None]


@pytest.mark.parametrize("case", REMOTE_CASES)
def test_save_writes_the_remote_layout_back(case, tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder)
    model_lib.save_pretrained(model, tmp_path)

    family = get_family(model.config.architecture)
    original = {k: v for k, v in load_file(folder / "model.safetensors").items() if not family.weight_map.is_ignored(k)}
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(saved[name], tensor, err_msg=name)

    written = json.loads((folder / "config.json").read_text())
    back = json.loads((tmp_path / "config.json").read_text())
    if family.remote_code:  # the remote field names, unchanged
        assert {k: v for k, v in back.items() if k != "dtype"} == {k: v for k, v in written.items() if k != "torch_dtype"}
    else:
        assert back["architectures"] == written["architectures"]
    assert model_lib.load_config(tmp_path)[0] == model.config


# --- Qwen past seq_length -------------------------------------------------------------------

QWEN_SEQ_LENGTH = 6
# Qwen2 with transformers' dynamic NTK (factor 2) equals Qwen's NTK alpha at lengths
# seq_length * 2^k; Qwen's query scaling is a per-position scalar, so hooking q_proj adds it.
QWEN_LONG = TinyCase(
    "qwen-long",
    "Qwen2Config",
    dict(num_key_value_heads=4, max_position_embeddings=QWEN_SEQ_LENGTH, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    layout="qwen",
    architecture="QWenLMHeadModel",
)


def _logn_hooks(hf_model, seq_length: int, max_length: int = 64) -> None:
    """Qwen's `logn_list` (log_seq_length(i) for the i-th token past seq_length) on every query."""
    import torch

    scale = [math.log(i, seq_length) if i > seq_length else 1.0 for i in range(1, max_length + 1)]
    factor = torch.tensor(scale, dtype=torch.float32)[None, :, None]
    for layer in hf_model.model.layers:
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, out: out * factor[:, : out.shape[1]])


@pytest.mark.parametrize("logn", [False, True])
def test_qwen_dynamic_ntk_and_logn_past_seq_length(logn, tmp_path, forward):
    import torch

    hf_model = build_checkpoint(dataclasses.replace(QWEN_LONG, layout_options=dict(use_logn_attn=logn)), tmp_path)
    model = model_lib.from_pretrained(tmp_path)
    assert model.config.rope.dynamic_power_of_two and model.config.logn_attention_length == (QWEN_SEQ_LENGTH if logn else None)

    ids = random_ids(1, 4 * QWEN_SEQ_LENGTH, seed=11)
    if logn:
        _logn_hooks(hf_model, QWEN_SEQ_LENGTH)
    for length in (2 * QWEN_SEQ_LENGTH, 4 * QWEN_SEQ_LENGTH, 9):
        with torch.no_grad():
            if length == 9:
                # Qwen rounds 9 up to 12 (alpha 3); transformers keeps the frequencies of the
                # longer sequence it saw last while the length stays past max_position_embeddings.
                hf_logits(hf_model, ids[:, :12])
                ref = hf_model(torch.as_tensor(ids[:, :9])).logits.numpy()
            else:
                ref = hf_logits(hf_model, ids[:, :length])
        ours = forward(model, ids[:, :length], np.ones((1, length), np.int32))
        assert_logits_close(ours, ref)


# --- Baichuan-13B: ALiBi, own reference ----------------------------------------------------

BAICHUAN_13B_DIMS = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6)


def _upstream_slopes(n: int) -> list[float]:
    """Baichuan-13B's `_get_interleave`, written out."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return _upstream_slopes(closest) + _upstream_slopes(2 * closest)[0::2][: n - closest]


def test_alibi_slopes_by_hand():
    from model_lib.layers.alibi import alibi_slopes

    assert alibi_slopes(4) == (0.25, 0.0625, 0.015625, 0.00390625)
    assert alibi_slopes(6) == (0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125)
    for n in (4, 6, 8, 40):
        np.testing.assert_allclose(alibi_slopes(n), _upstream_slopes(n), rtol=1e-12)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def baichuan_13b_reference(t: dict[str, np.ndarray], config: dict, ids: list[int]) -> np.ndarray:
    """Baichuan-13B forward over one unpadded sequence, from the remote tensors: logits [T, V].

    RMSNorm; W_pack -> q, k, v; scores q.k / sqrt(D) + slope_h * j (key index j, the
    upstream absolute form) with a causal mask; o_proj; SwiGLU MLP; Baichuan2's
    NormHead (rows normalised) when the config has z_loss_weight.
    """
    x = t["model.embed_tokens.weight"][ids].astype(np.float64)
    n, heads, eps = len(ids), config["num_attention_heads"], config["rms_norm_eps"]
    d = config["hidden_size"] // heads
    slopes = np.array(_upstream_slopes(heads))[:, None, None]
    bias = slopes * np.arange(n)[None, None, :] + np.triu(np.full((n, n), -np.inf), 1)[None]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, t[p + "input_layernorm.weight"], eps)
        q, k, v = np.split(h @ t[p + "self_attn.W_pack.weight"].T, 3, axis=-1)
        q, k, v = (a.reshape(n, heads, d).transpose(1, 0, 2) for a in (q, k, v))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = (probs @ v).transpose(1, 0, 2).reshape(n, heads * d)
        x = x + out @ t[p + "self_attn.o_proj.weight"].T
        h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
    x = _rms(x, t["model.norm.weight"], eps)
    head = t["lm_head.weight"].astype(np.float64)
    if "z_loss_weight" in config:
        head = head / np.linalg.norm(head, axis=1, keepdims=True)
    return x @ head.T


@pytest.fixture(scope="module")
def baichuan_13b(tmp_path_factory):
    """A Baichuan2-13B-layout checkpoint (ALiBi, NormHead, 6 heads) and its tensors and config."""
    folder = tmp_path_factory.mktemp("baichuan2-13b")
    layout = dict(layout="baichuan", layout_options=dict(alibi=True), architecture="BaichuanForCausalLM")
    build_checkpoint(TinyCase("baichuan2-13b", "LlamaConfig", dims=BAICHUAN_13B_DIMS, **layout), folder)
    config = json.loads((folder / "config.json").read_text())
    assert "max_position_embeddings" not in config and "z_loss_weight" in config
    return folder, load_file(folder / "model.safetensors"), config


def test_baichuan_13b_alibi_matches_reference(baichuan_13b, forward):
    folder, tensors, config = baichuan_13b
    model = model_lib.from_pretrained(folder)
    assert model.config.position_embedding == "alibi" and model.config.rope is None and model.config.lm_head_unit_norm

    ids = random_ids(2, 12, seed=12)
    ours = np.asarray(forward(model, ids, np.ones_like(ids)))
    for row in range(2):
        assert_logits_close(ours[row], baichuan_13b_reference(tensors, config, ids[row].tolist()))
    # Left padding: the real tokens see the positions of the unpadded sequence.
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    ours = np.asarray(forward(model, np.where(mask, ids, 0), mask))
    assert_logits_close(ours[0, 4:], baichuan_13b_reference(tensors, config, ids[0, 4:].tolist()))


def test_baichuan_13b_greedy_generation_matches_reference(baichuan_13b):
    folder, tensors, config = baichuan_13b
    prompts = [random_ids(1, n, seed=13 + n)[0].tolist() for n in (3, 10)]
    expected = []
    for prompt in prompts:
        tokens = list(prompt)
        for _ in range(6):
            tokens.append(int(np.argmax(baichuan_13b_reference(tensors, config, tokens)[-1])))
        expected.append(tokens[len(prompt) :])
    # eos ids of the tiny config are ignored so that all six tokens are compared.
    llm = LLM(folder, max_model_len=32, max_num_seqs=4, max_num_batched_tokens=32, page_size=4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in outputs] == expected


# --- which variant a config is; refused options ----------------------------------------------


def _config_with(tiny_checkpoint, tmp_path, case, **changes):
    folder, _ = tiny_checkpoint(case)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    return model_lib.load_config(tmp_path)[0]


def test_baichuan_variant_follows_the_config_layout(tiny_checkpoint, tmp_path):
    seven_b = _config_with(tiny_checkpoint, tmp_path, "baichuan-7b")
    assert seven_b.rope is not None and seven_b.position_embedding == "rope" and not seven_b.lm_head_unit_norm
    baichuan2_7b = _config_with(tiny_checkpoint, tmp_path, "baichuan2-7b-normhead")
    assert baichuan2_7b.rope is not None and baichuan2_7b.lm_head_unit_norm
    thirteen_b = _config_with(tiny_checkpoint, tmp_path, "baichuan-7b", max_position_embeddings=None, model_max_length=16)
    assert thirteen_b.rope is None and thirteen_b.alibi_slopes == (0.25, 0.0625, 0.015625, 0.00390625)
    assert thirteen_b.max_position_embeddings == 16 and not thirteen_b.lm_head_unit_norm
    assert _config_with(tiny_checkpoint, tmp_path, "baichuan-7b", vocab_size=125696).lm_head_unit_norm


@pytest.mark.parametrize(
    "case, changes, option",
    [
        ("chatglm-mqa", dict(position_encoding_2d=True), "position_encoding_2d"),
        ("chatglm-mqa", dict(rmsnorm=False), "rmsnorm"),
        ("chatglm-mqa", dict(apply_residual_connection_post_layernorm=True), "apply_residual_connection_post_layernorm"),
        ("chatglm-mqa", dict(pre_seq_len=8), "pre_seq_len"),
        ("chatglm-mqa", dict(quantization_bit=4), "quantization_bit"),
        ("qwen-mha", dict(use_cache_quantization=True), "use_cache_quantization"),
        ("qwen-mha", dict(kv_channels=8), "kv_channels"),
        ("internlm-bias-dynamic", dict(rotary={"type": "yarn", "base": 10000}), "rotary type"),
    ],
)
def test_unsupported_remote_options_are_named(case, changes, option, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=option):
        _config_with(tiny_checkpoint, tmp_path, case, **changes)
