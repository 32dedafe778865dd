"""FP8 weights kept in float8_e4m3fn with W8A8 compute (`quantization="fp8"`).

The pre-quantized checkpoints are test_prequantized.py's (llm-compressor `float-quantized` per
tensor and per channel; DeepSeek-style block scales, whole and partial tiles), written at test
time. Kept FP8, the model holds exactly the weights the dequantized path loads (its `dequantize`
equals the float kernel bit for bit); its logits differ only by the rounding of activations to
e4m3 (3 mantissa bits, per token and K group), which the tolerance below states. The W8A8 math
itself is checked against numpy in tests/pallas_kernels/test_fp8_matmul.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import model_lib
from model_lib.lora import linear_layers, param_bytes
from model_lib.quantization import Fp8Weight
from tests.model_lib.test_prequantized import CASE, checkpoints  # noqa: F401  (the writers' fixture)
from tests.tiny_models import padded_batch

pytestmark = pytest.mark.xdist_group("prequantized")

# name -> K groups of the kept q_proj (hidden 64): per tensor / channel one, 32-wide blocks 2, 64-wide 1.
FP8_CHECKPOINTS = {"ct-fp8-channel": 1, "ct-fp8-tensor": 1, "fp8-block": 2, "fp8-block-partial": 1}
# W8A8 against the same weights dequantized: activations rounded to e4m3 (relative error <= 2^-4 per
# value) move the tiny model's logits by 3.6-4.7% of their scale (measured), never more than this.
W8A8_LOGIT_TOLERANCE = 0.08


def assert_w8a8_close(ours: np.ndarray, dequantized: np.ndarray) -> None:
    scale = float(np.abs(dequantized).max())
    diff = float(np.abs(ours - dequantized).max())
    assert 0 < diff <= W8A8_LOGIT_TOLERANCE * scale, f"max abs diff {diff:.3g} vs logit scale {scale:.3g}"


@pytest.mark.parametrize("name", sorted(FP8_CHECKPOINTS))
def test_fp8_checkpoint_kept_fp8_matches_the_dequantized_path(name, checkpoints, forward):
    folder = checkpoints(name)[0]
    kept = model_lib.from_pretrained(folder, dtype="float32", quantization="fp8")
    dequantized = model_lib.from_pretrained(folder, dtype="float32")  # the CPU default
    ours, theirs = linear_layers(kept), linear_layers(dequantized)
    for path, layer in ours.items():
        if path == "lm_head":
            assert layer.quantized is None
            continue
        assert isinstance(layer.quantized, Fp8Weight) and layer.kernel is None, path
        assert str(layer.quantized.values.dtype) == "float8_e4m3fn"
        np.testing.assert_array_equal(np.asarray(layer.quantized.dequantize("float32")),
                                      np.asarray(theirs[path].kernel[...]), err_msg=path)
    assert ours["model.layers.0.self_attn.q_proj"].quantized.scales.shape[0] == FP8_CHECKPOINTS[name]
    assert param_bytes(kept) < param_bytes(dequantized)
    ids, mask, _ = padded_batch(seed=7)
    assert_w8a8_close(np.asarray(forward(kept, ids, mask)), np.asarray(forward(dequantized, ids, mask)))


def test_dynamic_fp8_of_a_float_checkpoint(tiny_checkpoint, forward):
    """`quantization="fp8"` on a float checkpoint: per-channel e4m3 weights (absmax / 448), W8A8."""
    import ml_dtypes

    folder, _ = tiny_checkpoint(CASE)
    model = model_lib.from_pretrained(folder, dtype="float32", quantization="fp8")
    full = model_lib.from_pretrained(folder, dtype="float32")
    q_proj = "model.layers.0.self_attn.q_proj"
    weight = linear_layers(model)[q_proj].quantized
    assert isinstance(weight, Fp8Weight) and weight.scales.shape[0] == 1
    w = np.asarray(linear_layers(full)[q_proj].kernel[...]).T  # HF [out, in]
    scale = np.abs(w).max(axis=1, keepdims=True) / 448.0
    expected = (w / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    np.testing.assert_allclose(np.asarray(weight.dequantize("float32")).T, expected, rtol=1e-6)
    ids, mask, _ = padded_batch(seed=7)
    assert_w8a8_close(np.asarray(forward(model, ids, mask)), np.asarray(forward(full, ids, mask)))


def test_fp8_request_on_other_schemes_is_refused(checkpoints):
    with pytest.raises(ValueError, match=r"already quantized \(awq\); omit quantization or pass 'awq'"):
        model_lib.from_pretrained(checkpoints("awq-gemm")[0], quantization="fp8")
    with pytest.raises(ValueError, match=r"already quantized \(fp8\)"):
        model_lib.from_pretrained(checkpoints("fp8-block")[0], quantization="int8")


def test_checkpoint_scales_read_by_their_layout():
    """Each llm-compressor / DeepSeek scale layout against numpy's `weight * scale` by the published meaning."""
    import ml_dtypes

    from model_lib.quantization.fp8 import Fp8Error, from_checkpoint

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((96, 80)) * 50).astype(ml_dtypes.float8_e4m3fn)  # HF [out, in]
    w = weight.astype(np.float32)
    tiles = rng.uniform(0.5, 2.0, (2, 2)).astype(np.float32)  # 64 x 64 blocks: partial last tiles both ways
    layouts = {  # name -> (scale, block, expected float weight)
        "tensor": (np.float32(0.25), None, w * 0.25),
        "channel": (np.arange(1, 97, dtype=np.float32).reshape(96, 1), None, w * np.arange(1, 97)[:, None]),
        "group": (np.stack([np.ones(96), 2 * np.ones(96)], 1).astype(np.float32), None,
                  w * np.repeat([1.0, 2.0], 40)[None, :]),
        "block": (tiles, (64, 64), w * np.repeat(np.repeat(tiles, 64, 0), 64, 1)[:96, :80]),
    }
    for name, (scale, block, expected) in layouts.items():
        host = from_checkpoint("m", weight, scale, block)
        assert host.shape == (80, 96), name
        np.testing.assert_array_equal(host.dequantized(), expected.astype(np.float32), err_msg=name)
        np.testing.assert_array_equal(np.asarray(host.to_weight().dequantize("float32")).T, host.dequantized())
    with pytest.raises(Fp8Error, match=r"m.weight_scale_inv \(3, 2\) does not tile \(96, 80\) in blocks of \(64, 64\)"):
        from_checkpoint("m", weight, np.ones((3, 2), np.float32), (64, 64))
    with pytest.raises(Fp8Error, match=r"m.weight_scale \(95, 1\) fits neither"):
        from_checkpoint("m", weight, np.ones((95, 1), np.float32), None)
