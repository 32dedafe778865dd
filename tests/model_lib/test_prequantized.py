"""Pre-quantized checkpoints (AWQ, GPTQ, compressed-tensors, FP8) against their published layouts.

Each case quantizes the tiny Llama's linear weights (all but lm_head) in numpy, writes them in
the format's layout with a packer written here from the layout's description (independent of
the loader's unpacking), and adds the `quantization_config` the producing tool writes. The
reference is transformers holding the weights those packed values stand for (dequantized here by
the published formula): transformers itself needs GPU-only packages (AutoAWQ, GPTQModel) or the
`compressed-tensors` package, not installed, to read these formats. Our model must keep the int4
and int8 formats quantized on the device and match the reference logits. The block-scaled FP8
format (`quant_method: fp8`) transformers reads on a CPU itself (dequantized to bfloat16): our
dequantized weights must equal its weights where the tiles divide the weight (for a partial last
tile transformers' CPU fallback derives another row split, `out / tiles`, than DeepSeek-V3's
`row // block`, which we follow).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

import model_lib
from model_lib.lora import linear_layers
from model_lib.quantization import Int4Weight, Int8Weight
from serving import LLM, SamplingParams
from tests.serving.helpers import hf_greedy, prompts
from tests.tiny_models import assert_logits_close, hf_logits, padded_batch

pytestmark = pytest.mark.xdist_group("prequantized")

CASE = "llama-gqa"  # hidden 64, intermediate 96: groups of 32 fit every linear layer several times
GROUP = 32
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column 8 j + AWQ_PACK_ORDER[i]
FP8_MAX = 448.0


# -- packers (from the layouts' descriptions) ----------------------------------------------------

def pack_along_rows(values: np.ndarray, bits: int = 4) -> np.ndarray:
    """`[R, C]` -> int32 `[R * bits / 32, C]`: value `(per * j + i, c)` in bits `[bits * i, bits * (i + 1))` of word (j, c)."""
    per = 32 // bits
    v = values.astype(np.uint32).reshape(-1, per, values.shape[1])
    words = np.zeros((v.shape[0], values.shape[1]), np.uint32)
    for i in range(per):
        words |= v[:, i, :] << np.uint32(bits * i)
    return words.view(np.int32)


def pack_along_columns(values: np.ndarray, bits: int = 4, order=None) -> np.ndarray:
    """`[R, C]` -> int32 `[R, C * bits / 32]`: nibble i of word (r, j) holds value `(r, per * j + order[i])`."""
    per = 32 // bits
    order = range(per) if order is None else order
    v = values.astype(np.uint32).reshape(values.shape[0], -1, per)
    words = np.zeros(v.shape[:2], np.uint32)
    for i, column in enumerate(order):
        words |= v[:, :, column] << np.uint32(bits * i)
    return words.view(np.int32)


def int4_groups(w: np.ndarray, g_idx: np.ndarray, sym: bool):
    """`w [out, in]` -> (q [out, in] 0..15, zeros [out, groups], scales [out, groups]); row groups by g_idx."""
    groups = int(g_idx.max()) + 1
    q = np.zeros(w.shape, np.int64)
    zeros = np.zeros((w.shape[0], groups), np.int64)
    scales = np.zeros((w.shape[0], groups), np.float32)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            scale = 2 * np.abs(cols).max(axis=1) / 15
            zero = np.full(w.shape[0], 8)
        else:
            low, high = cols.min(axis=1), cols.max(axis=1)
            scale = (high - low) / 15
            zero = np.clip(np.round(-low / scale), 0, 15).astype(np.int64)
        scale = scale.astype(np.float16).astype(np.float32)  # the formats store float16 scales
        q[:, g_idx == g] = np.clip(np.round(cols / scale[:, None]) + zero[:, None], 0, 15)
        zeros[:, g], scales[:, g] = zero, scale
    return q, zeros, scales


def int4_dequantized(q, zeros, scales, g_idx):
    return ((q - zeros[:, g_idx]) * scales[:, g_idx]).astype(np.float32)


def awq(w: np.ndarray, rng):
    g_idx = np.arange(w.shape[1]) // GROUP
    q, zeros, scales = int4_groups(w, g_idx, sym=False)
    tensors = {"qweight": pack_along_columns(q.T, order=AWQ_PACK_ORDER), "qzeros": pack_along_columns(zeros.T, order=AWQ_PACK_ORDER),
               "scales": scales.T.astype(np.float16)}
    return tensors, int4_dequantized(q, zeros, scales, g_idx)


def gptq(v1: bool, act_order: bool, sym: bool):
    def pack(w: np.ndarray, rng):
        order = rng.permutation(w.shape[1]) if act_order else np.arange(w.shape[1])
        g_idx = np.empty(w.shape[1], np.int32)
        g_idx[order] = np.arange(w.shape[1]) // GROUP  # act-order: groups follow a column order
        q, zeros, scales = int4_groups(w, g_idx, sym)
        stored_zeros = zeros - 1 if v1 else zeros  # AutoGPTQ (v1) stores z - 1
        assert stored_zeros.min() >= 0
        tensors = {"qweight": pack_along_rows(q.T), "qzeros": pack_along_columns(stored_zeros.T),
                   "scales": scales.T.astype(np.float16), "g_idx": g_idx}
        return tensors, int4_dequantized(q, zeros, scales, g_idx)

    return pack


def compressed_int4(sym: bool, strategy: str):
    def pack(w: np.ndarray, rng):
        size = GROUP if strategy == "group" else w.shape[1]
        g_idx = np.arange(w.shape[1]) // size
        q, zeros, scales = int4_groups(w, g_idx, sym)  # q = q_signed + 8, zeros = zp_signed + 8
        tensors = {"weight_packed": pack_along_columns(q), "weight_scale": scales,
                   "weight_shape": np.asarray(w.shape, np.int64)}
        if not sym:
            tensors["weight_zero_point"] = pack_along_rows(zeros)  # packed along the output dim
        return tensors, int4_dequantized(q, zeros, scales, g_idx)

    return pack


def compressed_int8(w: np.ndarray, rng):
    scale = (np.abs(w).max(axis=1, keepdims=True) / 127).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int64)
    tensors = {"weight_packed": pack_along_columns(q + 128, bits=8), "weight_scale": scale,
               "weight_shape": np.asarray(w.shape, np.int64)}
    return tensors, (q * scale).astype(np.float32)


def fp8(strategy: str, block: int = 0):
    """FP8 per tensor, per channel, or per `block` x `block` tile (DeepSeek-V3: a partial last tile
    keeps the scale of tile `row // block`)."""

    def pack(w: np.ndarray, rng):
        import torch

        if strategy == "block":
            rows, cols = math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block)
            padded = np.zeros((rows * block, cols * block), np.float32)
            padded[: w.shape[0], : w.shape[1]] = np.abs(w)
            scale = (padded.reshape(rows, block, cols, block).max(axis=(1, 3)) / FP8_MAX).astype(np.float32)
            full = np.repeat(np.repeat(scale, block, 0), block, 1)[: w.shape[0], : w.shape[1]]
        else:
            scale = (np.abs(w).max(axis=1, keepdims=True) if strategy == "channel" else np.abs(w).max(keepdims=True)[0])
            scale = (scale / FP8_MAX).astype(np.float32)
            full = scale
        values = torch.from_numpy(w / full).to(torch.float8_e4m3fn)
        tensors = {"weight": values, ("weight_scale_inv" if strategy == "block" else "weight_scale"): scale}
        return tensors, (values.float().numpy() * full).astype(np.float32)

    return pack


def ct_config(fmt: str, weights: dict) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": fmt}}}


GPTQ_CONFIG = dict(quant_method="gptq", bits=4, group_size=GROUP)
# name -> (packer, quantization_config, our storage type of a quantized linear weight)
FORMATS = {
    "awq-gemm": (awq, dict(quant_method="awq", bits=4, group_size=GROUP, zero_point=True, version="gemm"), Int4Weight),
    "gptq-v1-sym": (gptq(True, False, True), dict(GPTQ_CONFIG, desc_act=False, sym=True, checkpoint_format="gptq"),
                    Int4Weight),
    "gptq-v1-actorder-asym": (gptq(True, True, False), dict(GPTQ_CONFIG, desc_act=True, sym=False), Int4Weight),
    "gptq-v2-asym": (gptq(False, False, False), dict(GPTQ_CONFIG, desc_act=False, sym=False,
                                                     checkpoint_format="gptq_v2"), Int4Weight),
    "ct-int4-group-asym": (compressed_int4(False, "group"), ct_config("pack-quantized", dict(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=GROUP)), Int4Weight),
    "ct-int4-channel-sym": (compressed_int4(True, "channel"), ct_config("pack-quantized", dict(
        num_bits=4, type="int", symmetric=True, strategy="channel")), Int4Weight),
    "ct-int8-channel": (compressed_int8, ct_config("pack-quantized", dict(
        num_bits=8, type="int", symmetric=True, strategy="channel")), Int8Weight),
    "ct-fp8-channel": (fp8("channel"), ct_config("float-quantized", dict(
        num_bits=8, type="float", symmetric=True, strategy="channel")), type(None)),
    "ct-fp8-tensor": (fp8("tensor"), ct_config("float-quantized", dict(
        num_bits=8, type="float", symmetric=True, strategy="tensor")), type(None)),
    "fp8-block": (fp8("block", 32), dict(quant_method="fp8", activation_scheme="dynamic", weight_block_size=[32, 32]),
                  type(None)),
    # 64-wide tiles leave partial tiles on 96-row / 96-column weights
    "fp8-block-partial": (fp8("block", 64), dict(quant_method="fp8", activation_scheme="dynamic",
                                                 weight_block_size=[64, 64]), type(None)),
}


def write_checkpoint(folder, hf_model, float_folder, packer, quantization_config):
    """The tiny model's checkpoint with every linear weight but lm_head packed; returns the reference model."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.RandomState(0)
    reference = copy.deepcopy(hf_model)
    tensors = {}
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                packed, dequantized = packer(module.weight.numpy().astype(np.float32), rng)
                tensors.update({f"{name}.{leaf}": torch.as_tensor(v) for leaf, v in packed.items()})
                module.weight.copy_(torch.from_numpy(dequantized))
            elif isinstance(module, torch.nn.Linear) or not list(module.children()):
                tensors.update({f"{name}.{leaf}": p.detach().clone() for leaf, p in module.named_parameters()})
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = json.loads((float_folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return reference


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    float_folder, hf_model = tiny_checkpoint(CASE)
    root = tmp_path_factory.mktemp("prequantized")
    built = {}

    def get(name: str):
        if name not in built:
            packer, config, _ = FORMATS[name]
            built[name] = root / name, write_checkpoint(root / name, hf_model, float_folder, packer, config)
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_logits_match_the_published_layout(name, checkpoints, forward):
    folder, reference = checkpoints(name)
    model = model_lib.from_pretrained(folder, dtype="float32")
    layers = linear_layers(model)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert isinstance(layers[path].quantized, FORMATS[name][2]), (path, type(layers[path].quantized))
    assert layers["lm_head"].quantized is None
    ids, mask, spans = padded_batch(seed=7)
    ours = np.asarray(forward(model, ids, mask))
    for row, (start, end) in enumerate(spans):
        assert_logits_close(ours[row, start:end], hf_logits(reference, ids[row : row + 1, start:end])[0])


def test_fp8_block_weights_equal_transformers_own_dequantization(checkpoints):
    import torch
    import transformers

    folder, _ = checkpoints("fp8-block")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours = linear_layers(model_lib.from_pretrained(folder, dtype="float32"))
    for name, module in theirs.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            expected = module.weight.detach().float().numpy()
            got = np.asarray(ours[name].kernel[...]).T.astype(np.float32)
            # transformers rounds the dequantized weight to bfloat16 (no GPU): equal up to that rounding.
            np.testing.assert_allclose(got, expected, rtol=2.0**-8, atol=0, err_msg=name)


def test_act_order_checkpoint_serves_greedy_as_the_reference(checkpoints):
    folder, reference = checkpoints("gptq-v1-actorder-asym")
    llm = LLM(folder, dtype="float32", quantization="gptq", max_model_len=64, page_size=8)
    batch = prompts()
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, output in zip(batch, outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt)[:8]


def test_unsupported_and_mismatched_schemes_are_refused(checkpoints, tmp_path):
    folder, _ = checkpoints("awq-gemm")
    with pytest.raises(ValueError, match=r"already quantized \(awq\)"):
        model_lib.from_pretrained(folder, quantization="int4")
    config = json.loads((folder / "config.json").read_text())
    for qc, message in [(dict(quant_method="bitsandbytes"), "quant_method 'bitsandbytes' is not supported"),
                        (dict(config["quantization_config"], version="gemv"), "only 4-bit GEMM"),
                        (dict(GPTQ_CONFIG, bits=3), "GPTQ with 3 bits")]:
        broken = tmp_path / qc.get("quant_method") / str(qc.get("bits", qc.get("version")))
        broken.mkdir(parents=True)
        (broken / "config.json").write_text(json.dumps(dict(config, quantization_config=qc)))
        (broken / "model.safetensors").symlink_to(folder / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            model_lib.from_pretrained(broken)


def test_serve_accepts_quantization_flags():
    from serving.openai.cli import parse_args

    assert parse_args(["model", "-q", "int4"]).quantization == "int4"
    assert parse_args(["model", "--quantization", "awq"]).quantization == "awq"
    with pytest.raises(SystemExit):
        parse_args(["model", "--quantization", "int3"])


def test_export_writes_float_weights_and_refuses_quantized_ones(checkpoints, tmp_path):
    folder, _ = checkpoints("fp8-block")
    model = model_lib.from_pretrained(folder, dtype="float32")
    model_lib.save_pretrained(model, tmp_path / "float")
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())
    again = linear_layers(model_lib.from_pretrained(tmp_path / "float", dtype="float32"))
    q_proj = "model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(np.asarray(again[q_proj].kernel[...]), np.asarray(linear_layers(model)[q_proj].kernel[...]))
    with pytest.raises(ValueError, match="cannot export quantized weights"):
        model_lib.save_pretrained(model_lib.from_pretrained(checkpoints("awq-gemm")[0]), tmp_path / "awq")
