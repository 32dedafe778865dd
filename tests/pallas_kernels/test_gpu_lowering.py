"""The GPU path compiles, checked on the CPU (`pallas_kernels.gpu_lowering`).

Each kernel entry point (the kernel forced, at model-sized shapes) and the jitted serving
and training steps of representative families are lowered for CUDA on an abstract H100;
every Triton module in them must verify, compile to PTX for sm_90a with the triton
package, spill no registers, and use wgmma for matmul tiles of 64+ rows. The model steps
must also reach the kernels (no reference fallback). Nothing is allocated for the kernel
cases (shapes only); the model steps use the tiny configs.
"""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("triton", reason="the CUDA lowering check needs the triton package (test extra)")

from pallas_kernels import gpu_lowering  # noqa: E402
from pallas_kernels.moe import triton_kernel as moe_kernel  # noqa: E402
from pallas_kernels.paged_attention import PagedMetadata  # noqa: E402
from pallas_kernels.paged_attention import triton_kernel as paged_kernel  # noqa: E402
from pallas_kernels.quantized_matmul import triton_kernel as quant_kernel  # noqa: E402

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


def assert_compiles(lowered, expected_kernels: tuple[str, ...] = ()) -> list[gpu_lowering.PtxReport]:
    """Every Triton module verifies and compiles cleanly; `expected_kernels` name prefixes that must appear."""
    reports, problems = gpu_lowering.check_lowered(lowered)
    for report in reports:
        print(report.summary())
    assert not problems, "\n".join(problems)
    names = [r.name for r in reports]
    for prefix in expected_kernels:
        assert any(name.startswith(prefix) for name in names), f"no {prefix} kernel among {names} (a fallback?)"
    return reports


# -- kernel entry points -------------------------------------------------------------------------

def paged_args(tokens: int, seqs: int, heads: int, kv_heads: int, head_dim: int, page_size: int = 16,
               pages_per_seq: int = 256):
    q = S((tokens, heads, head_dim), BF16)
    cache = S((kv_heads, seqs * pages_per_seq, page_size, head_dim), BF16)
    meta = PagedMetadata(S((seqs + 1,), jnp.int32), S((seqs,), jnp.int32), S((seqs, pages_per_seq), jnp.int32),
                         S((), jnp.int32))
    return q, cache, cache, meta


# name -> (paged_args(...) arguments, kernel options)
PAGED_CASES = {
    "llama8b-decode-b8": (dict(tokens=8, seqs=8, heads=32, kv_heads=8, head_dim=128), {}),
    "llama8b-decode-b1": (dict(tokens=1, seqs=1, heads=32, kv_heads=8, head_dim=128), {}),
    "llama8b-prefill-chunk": (dict(tokens=512, seqs=2, heads=32, kv_heads=8, head_dim=128), {}),
    "qwen7b-groups7": (dict(tokens=64, seqs=8, heads=28, kv_heads=4, head_dim=128), {}),
    "qwen14b-groups5-prefill": (dict(tokens=256, seqs=2, heads=40, kv_heads=8, head_dim=128), {}),
    "phi3-d96-mha": (dict(tokens=16, seqs=16, heads=32, kv_heads=32, head_dim=96), {}),
    "d80-page8": (dict(tokens=16, seqs=4, heads=16, kv_heads=4, head_dim=80, page_size=8), {}),
    "d112-page32": (dict(tokens=16, seqs=4, heads=16, kv_heads=2, head_dim=112, page_size=32), {}),
    "d192-page128": (dict(tokens=16, seqs=4, heads=16, kv_heads=2, head_dim=192, page_size=128, pages_per_seq=32), {}),
    "gemma2-d256-softcap-window": (dict(tokens=64, seqs=8, heads=16, kv_heads=8, head_dim=256),
                                   dict(softcap=50.0, sliding_window=4096)),
    "gpt-oss-sinks-window": (dict(tokens=64, seqs=8, heads=64, kv_heads=8, head_dim=64),
                             dict(sinks=S((64,), jnp.float32), sliding_window=128)),
    "bloom-alibi-mha": (dict(tokens=64, seqs=8, heads=32, kv_heads=32, head_dim=128),
                        dict(alibi_slopes=S((32,), jnp.float32))),
    "llama4-chunked-prefill": (dict(tokens=512, seqs=2, heads=40, kv_heads=8, head_dim=128), dict(chunk_size=8192)),
}


@pytest.mark.parametrize("case", sorted(PAGED_CASES))
def test_paged_attention_kernel_compiles(case):
    shape, options = PAGED_CASES[case]
    arrays = {k: v for k, v in options.items() if isinstance(v, S)}
    static = {k: v for k, v in options.items() if not isinstance(v, S)}

    @jax.jit
    def run(q, k_cache, v_cache, meta, arrays):
        return paged_kernel.paged_attention(q, k_cache, v_cache, meta, scale=0.1, **static, **arrays)

    lowered = gpu_lowering.lower_for_h100(run, *paged_args(**shape), arrays)
    assert_compiles(lowered, ("ragged_paged_attention",))


# Bidirectional spans (`PagedMetadata.visible_until [T]`): the 64-row prefill tiles, split-KV decode steps (a model
# whose prompts carry spans passes the array on every step), and Gemma 3's head_dim 256 with a sliding window.
SPAN_PAGED_CASES = {
    "llama8b-prefill-chunk": PAGED_CASES["llama8b-prefill-chunk"],
    "llama8b-decode-b8": PAGED_CASES["llama8b-decode-b8"],
    "gemma3-d256-window-prefill": (dict(tokens=512, seqs=2, heads=8, kv_heads=4, head_dim=256),
                                   dict(sliding_window=1024)),
}


@pytest.mark.parametrize("case", sorted(SPAN_PAGED_CASES))
def test_paged_attention_kernel_compiles_with_spans(case):
    shape, options = SPAN_PAGED_CASES[case]
    q, cache, _, meta = paged_args(**shape)
    meta = meta.replace(visible_until=S((shape["tokens"],), jnp.int32))

    @jax.jit
    def run(q, k_cache, v_cache, meta):
        return paged_kernel.paged_attention(q, k_cache, v_cache, meta, scale=0.1, **options)

    reports = assert_compiles(gpu_lowering.lower_for_h100(run, q, cache, cache, meta), ("ragged_paged_attention",))
    assert all(r.name.endswith("_spans") for r in reports), [r.name for r in reports]


# (PAGED_CASES name, page dtype): quantized pages and their scales through each load path of the kernel: whole
# pages with split KV (decode), 64-row prefill tiles, the masked gather of a padded head_dim, sub-page steps.
QUANTIZED_PAGED_CASES = [
    ("llama8b-decode-b8", "int8"),
    ("llama8b-prefill-chunk", "int8"),
    ("d80-page8", "int8"),
    ("d192-page128", "int8"),
    ("llama8b-decode-b8", "float8_e4m3fn"),
    ("llama8b-prefill-chunk", "float8_e4m3fn"),
    ("d80-page8", "float8_e5m2"),
]


@pytest.mark.parametrize("case,dtype", QUANTIZED_PAGED_CASES)
def test_paged_attention_kernel_compiles_with_quantized_pages(case, dtype):
    from pallas_kernels.paged_attention import QuantizedPages

    shape, _ = PAGED_CASES[case]
    q, cache, _, meta = paged_args(**shape)
    pages = QuantizedPages(S(cache.shape, jnp.dtype(dtype)), S(cache.shape[:-1], jnp.float32))

    @jax.jit
    def run(q, k_cache, v_cache, meta):
        return paged_kernel.paged_attention(q, k_cache, v_cache, meta, scale=0.1)

    reports = assert_compiles(gpu_lowering.lower_for_h100(run, q, pages, pages, meta), ("ragged_paged_attention",))
    assert all(r.name.endswith(f"_{dtype}") for r in reports), [r.name for r in reports]


# name -> (paged_args(...) arguments, page dtype) over MLA latent pages at DeepSeek-V3 shape: one kv head of
# 512 + 64 columns, V its first 512 (`value_dim`); all 128 heads (tp 1) or 16 (tp 8); sub-page steps (page 64)
# and whole-page steps (page 16); int8 pages with their scales.
LATENT_CASES = {
    "dsv3-decode-b8-h128": (dict(tokens=8, seqs=8, heads=128, kv_heads=1, head_dim=576, page_size=64,
                                 pages_per_seq=64), "bfloat16"),
    "dsv3-tp8-decode-b32-page16": (dict(tokens=32, seqs=32, heads=16, kv_heads=1, head_dim=576, pages_per_seq=64),
                                   "bfloat16"),
    "dsv3-tp8-prefill-chunk": (dict(tokens=512, seqs=2, heads=16, kv_heads=1, head_dim=576, page_size=64,
                                    pages_per_seq=64), "bfloat16"),
    "dsv3-tp8-decode-int8": (dict(tokens=32, seqs=32, heads=16, kv_heads=1, head_dim=576, page_size=64,
                                  pages_per_seq=64), "int8"),
}


@pytest.mark.parametrize("case", sorted(LATENT_CASES))
def test_latent_paged_attention_kernel_compiles(case):
    from pallas_kernels.paged_attention import QuantizedPages

    shape, dtype = LATENT_CASES[case]
    q, cache, _, meta = paged_args(**shape)
    if dtype != "bfloat16":
        cache = QuantizedPages(S(cache.shape, jnp.dtype(dtype)), S(cache.shape[:-1], jnp.float32))

    @jax.jit
    def run(q, cache, meta):
        return paged_kernel.paged_attention(q, cache, None, meta, scale=0.1, value_dim=512)

    reports = assert_compiles(gpu_lowering.lower_for_h100(run, q, cache, meta), ("ragged_paged_attention",))
    assert all("_latent576" in r.name for r in reports), [r.name for r in reports]


# name -> paged_args(...) arguments of decode steps the Mosaic decode kernel covers (page size 64 or 128)
MOSAIC_DECODE_CASES = {
    "llama8b-decode-b1": dict(tokens=1, seqs=1, heads=32, kv_heads=8, head_dim=128, page_size=64, pages_per_seq=64),
    "llama8b-decode-b64": dict(tokens=64, seqs=64, heads=32, kv_heads=8, head_dim=128, page_size=64, pages_per_seq=64),
    "qwen7b-groups7-decode": dict(tokens=8, seqs=8, heads=28, kv_heads=4, head_dim=128, page_size=128,
                                  pages_per_seq=32),
    "d256-page64": dict(tokens=4, seqs=4, heads=16, kv_heads=8, head_dim=256, page_size=64, pages_per_seq=32),
}


@pytest.mark.parametrize("case", sorted(MOSAIC_DECODE_CASES))
def test_mosaic_decode_attention_lowers(case):
    """The Mosaic GPU decode kernel lowered for an H100 and its module verified, with TMA and wgmma."""
    from pallas_kernels.paged_attention import mosaic_decode

    run = jax.jit(functools.partial(mosaic_decode.paged_attention, scale=0.1))
    modules = gpu_lowering.mosaic_modules(gpu_lowering.lower_for_h100(run, *paged_args(**MOSAIC_DECODE_CASES[case])))
    assert len(modules) == 1 and modules[0].wgmma and modules[0].tma, [m.summary() for m in modules]


# name -> (M rows, K, N, G groups); Mixtral-8x7B w1 and w2, Qwen3-30B-A3B's gate/up.
MOE_SHAPES = {
    "mixtral-decode": (16, 4096, 14336, 8),
    "mixtral-prefill": (8192, 4096, 14336, 8),
    "mixtral-down-prefill": (8192, 14336, 4096, 8),
    "qwen3-prefill": (16384, 2048, 768, 128),
    "qwen3-decode": (64, 2048, 768, 128),
}


@pytest.mark.parametrize("pass_", ["forward", "input_grad", "weight_grad"])
@pytest.mark.parametrize("shape", sorted(MOE_SHAPES))
def test_grouped_matmul_kernels_compile(shape, pass_):
    rows, depth, width, groups = MOE_SHAPES[shape]
    sizes = S((groups,), jnp.int32)
    if pass_ == "forward":
        fn, args, prefix = moe_kernel.gmm, (S((rows, depth), BF16), S((groups, depth, width), BF16), sizes), "gmm_"
    elif pass_ == "input_grad":  # d_lhs = d_out [M, N] x rhs[g]^T, rhs read as [G, K, N] transposed
        fn = functools.partial(moe_kernel.gmm, transpose_rhs=True)
        args, prefix = (S((rows, width), BF16), S((groups, depth, width), BF16), sizes), "gmm_t"
    else:  # d_rhs[g] = lhs_g^T d_out_g
        fn, args, prefix = moe_kernel.tgmm, (S((rows, depth), BF16), S((rows, width), BF16), sizes), "tgmm"
    assert_compiles(gpu_lowering.lower_for_h100(jax.jit(fn), *args), (prefix,))


# Multi-LoRA (SGMV-style, `pallas_kernels.lora`): 4 adapters of rank 16 on a Llama-3-8B projection
# (K = N = 4096), a 512-token prefill chunk (wgmma tiles; decode-sized tiles are in the serving step
# test below). Both the shrink (N = R) and the expand (K = R) grouped matmuls must be the kernel.
LORA_TOKENS = {"prefill-t512": 512}


@pytest.mark.parametrize("tokens", sorted(LORA_TOKENS))
def test_multi_lora_product_compiles(tokens):
    from pallas_kernels.lora import lora_delta

    rows = LORA_TOKENS[tokens]
    args = (S((rows, 4096), BF16), S((4, 4096, 16), BF16), S((4, 16, 4096), BF16), S((rows,), jnp.int32))
    reports = assert_compiles(gpu_lowering.lower_for_h100(jax.jit(lora_delta), *args), ("gmm_",))
    assert len([r for r in reports if r.name.startswith("gmm_")]) >= 2, [r.name for r in reports]


# Llama-3-8B layers (K, N): gate/up_proj, down_proj (q/o_proj tile like down_proj); rows: decode
# batches and a prefill chunk.
QUANT_LAYERS = {"gate_up": (4096, 14336), "down": (14336, 4096)}
QUANT_ROWS = {"decode-m1": 1, "decode-m16": 16, "prefill-m512": 512}


@pytest.mark.parametrize("rows", sorted(QUANT_ROWS))
@pytest.mark.parametrize("layer", sorted(QUANT_LAYERS))
@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_quantized_matmul_kernels_compile(bits, layer, rows):
    """Fused dequantize-matmul (int4 group 128, int8 per channel); prefill tiles of 128 rows must be wgmma."""
    depth, width = QUANT_LAYERS[layer]
    x = S((QUANT_ROWS[rows], depth), BF16)
    if bits == "int4":
        groups = S((depth // 128, width), jnp.float32), S((depth // 128, width), jnp.uint8)
        fn, args = quant_kernel.int4_matmul, (x, S((depth // 2, width), jnp.uint8), *groups)
    else:
        fn, args = quant_kernel.int8_matmul, (x, S((depth, width), jnp.int8), S((width,), jnp.float32))
    reports = assert_compiles(gpu_lowering.lower_for_h100(fn, *args), (f"{bits}_matmul",))
    if QUANT_ROWS[rows] >= 128:
        assert all(report.wgmma for report in reports)


FP8 = jnp.float8_e4m3fn
FP8_DOT = re.compile(r"stablehlo\.dot_general .*: \(tensor<(\d+)x(\d+)x(\w+)>, tensor<(\d+)x(\d+)x(\w+)>\) -> tensor<\d+x\d+x(\w+)>")


def dot_operand_types(lowered) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) element types of every dot_general in the StableHLO."""
    return [(m[2], m[5], m[6]) for m in FP8_DOT.findall(lowered.as_text())]


FP8_ROWS = {"decode-m1": 1, "decode-m64": 64, "prefill-m512": 512}


@pytest.mark.parametrize("rows", sorted(FP8_ROWS))
@pytest.mark.parametrize("scales", ["channel", "block128"])
def test_fp8_matmul_compiles_for_hopper(scales, rows):
    """W8A8 FP8 for CUDA at Llama-3-8B's gate/up shape. Decode rows: the Pallas kernel (FP8 weights,
    bf16 MMAs; wgmma at 64 rows), with no XLA dot left. Prefill rows: every product a dot_general on
    float8_e4m3fn operands with float32 results, which XLA's GPU compiler turns into cuBLASLt FP8
    GEMMs; no float reference in the CUDA branch."""
    from pallas_kernels.quantized_matmul import fp8_matmul

    depth, width = QUANT_LAYERS["gate_up"]
    groups = 1 if scales == "channel" else depth // 128
    args = S((FP8_ROWS[rows], depth), BF16), S((width, depth), FP8), S((groups, width), jnp.float32)
    lowered = gpu_lowering.lower_for_h100(jax.jit(fp8_matmul), *args)
    dots = dot_operand_types(lowered)
    if FP8_ROWS[rows] <= 64:
        reports = assert_compiles(lowered, ("fp8_matmul",))
        assert dots == [] and all(report.wgmma for report in reports) == (FP8_ROWS[rows] == 64)
    else:
        assert dots == [("f8E4M3FN", "f8E4M3FN", "f32")] and not gpu_lowering.triton_modules(lowered), dots


def test_pallas_triton_fp8_dot_is_not_an_fp8_mma():
    """Why fp8_matmul has no Pallas kernel: jax's Triton lowering emits `tt.dot` with maxNumImpreciseAcc 0,
    so for a float32 accumulator Triton upcasts FP8 tiles to float16 and uses Ampere mma.sync, never the
    e4m3 wgmma. If this fails, a jax release lowers FP8 dots to FP8 MMAs and a Pallas kernel is worth writing."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    def kernel(x_ref, w_ref, o_ref):
        o_ref[...] = jax.lax.dot_general(x_ref[...], w_ref[...], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    call = pl.pallas_call(kernel, out_shape=S((128, 128), jnp.float32), name="fp8_dot_probe",
                          compiler_params=pltriton.CompilerParams(num_warps=8, num_stages=1))
    lowered = gpu_lowering.lower_for_h100(jax.jit(call), S((128, 128), FP8), S((128, 128), FP8))
    (report,) = gpu_lowering.check_lowered(lowered)[0]
    mmas = {line.split()[0] for line in report.ptx.splitlines() if "mma" in line}
    assert not report.wgmma and mmas == {"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"}, mmas
    assert "cvt.rn.f16x2.e4m3x2" in report.ptx  # the FP8 tiles upcast before the float16 MMA

# GGUF block types (bits, zero, offsets): blocks of 32 rows, i.e. 16-deep K steps.
BLOCK_TYPES = {"Q4_0": (4, 8, False), "Q4_1": (4, 0, True), "Q8_0": (8, 0, False)}


@pytest.mark.parametrize("rows", ["decode-m1", "prefill-m512"])
@pytest.mark.parametrize("qtype", sorted(BLOCK_TYPES))
def test_block_matmul_kernel_compiles(qtype, rows):
    """Fused GGUF-block dequantize-matmul (Llama-3-8B gate/up_proj); prefill tiles of 128 rows must be wgmma."""
    from pallas_kernels.block_matmul import triton_kernel as block_kernel

    bits, zero, has_offsets = BLOCK_TYPES[qtype]
    depth, width = QUANT_LAYERS["gate_up"]
    blocks = S((depth // 32, width), jnp.float16)
    qs = S((depth // 2, width), jnp.uint8) if bits == 4 else S((depth, width), jnp.int8)
    fn = jax.jit(functools.partial(block_kernel.block_matmul, bits=bits, zero=zero))
    args = (S((QUANT_ROWS[rows], depth), BF16), qs, blocks, blocks if has_offsets else None)
    reports = assert_compiles(gpu_lowering.lower_for_h100(fn, *args), (f"block{bits}_matmul",))
    if QUANT_ROWS[rows] >= 128:
        assert all(report.wgmma for report in reports)


# Mamba's selective scan (rows, tokens, channels, state): 130m training rows, 2.8b long prefill.
SCAN_SHAPES = {"mamba-130m-train": (8, 2048, 1536, 16), "mamba-2.8b-prefill": (1, 8192, 5120, 16)}


@pytest.mark.parametrize("shape", sorted(SCAN_SHAPES))
def test_selective_scan_kernel_compiles(shape):
    """The sequential-in-time scan kernel, the dense Mamba forward reaching it through `ops`, and its gradient
    reaching the backward kernels."""
    from pallas_kernels.ssm import ops as ssm_ops
    from pallas_kernels.ssm import triton_kernel as scan_kernel

    rows, length, channels, state = SCAN_SHAPES[shape]
    f32 = jnp.float32
    tokens, per_token = (rows, length, channels), (rows, length, state)
    args = (S(tokens, BF16), S(tokens, f32), S((channels, state), f32), S(per_token, BF16), S(per_token, BF16),
            S((channels,), f32))
    assert_compiles(gpu_lowering.lower_for_h100(jax.jit(scan_kernel.selective_scan), *args, S((rows, length), f32)),
                    ("selective_scan",))
    dispatched = jax.jit(lambda *a: ssm_ops.selective_scan(*a)[0])
    assert_compiles(gpu_lowering.lower_for_h100(dispatched, *args, S((rows, length), jnp.int32)), ("selective_scan",))
    # Training: the gradient reaches the states kernel and the reverse-time backward kernel.
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ssm_ops.selective_scan(*a)[0]), argnums=(0, 1, 2, 3, 4, 5)))
    assert_compiles(gpu_lowering.lower_for_h100(grads, *args, S((rows, length), jnp.int32)),
                    ("selective_scan_states", "selective_scan_bwd"))


# The serving path (rows, tokens, channels, state, runs with a state): a flat ragged step (one row of the step's
# sequences continuing from their slots) for 130m with 64 slots, and a 2.8b prefill chunk.
SCAN_STATE_SHAPES = {"mamba-130m-serving": (1, 512, 1536, 16, 64), "mamba-2.8b-prefill-chunk": (1, 2048, 5120, 16, 8)}


@pytest.mark.parametrize("shape", sorted(SCAN_STATE_SHAPES))
def test_selective_scan_from_states_kernel_compiles(shape):
    """The scan with per-run initial states in and final states out, through `ops`."""
    from pallas_kernels.ssm import ops as ssm_ops

    rows, length, channels, state, runs = SCAN_STATE_SHAPES[shape]
    f32 = jnp.float32
    tokens, per_token = (rows, length, channels), (rows, length, state)
    args = (S(tokens, BF16), S(tokens, f32), S((channels, state), f32), S(per_token, BF16), S(per_token, BF16),
            S((channels,), f32), S((rows, length), jnp.int32), S((rows, runs, channels, state), f32))
    assert_compiles(gpu_lowering.lower_for_h100(jax.jit(ssm_ops.selective_scan), *args),
                    ("selective_scan_from_states",))


# Mamba-2's SSD (rows, tokens, heads, head dim, groups, state): Mamba-2-130m training rows, Granite 4.0-H-Tiny
# (48 heads of 64, one group, state 128) on a long prompt.
SSD_SHAPES = {"mamba2-130m-train": (8, 2048, 24, 64, 1, 128), "granite4-tiny-prefill": (1, 8192, 48, 64, 1, 128)}


@pytest.mark.parametrize("shape", sorted(SSD_SHAPES))
def test_ssd_kernel_compiles(shape):
    """The chunked SSD kernel (wgmma for its 64-row tiles), the dense forward and a prefill from states reaching it,
    and the gradient reaching the backward kernels (the entering states, then the reverse walk forming every
    gradient)."""
    from pallas_kernels.ssm import ops as ssm_ops

    rows, length, heads, head_dim, groups, state = SSD_SHAPES[shape]
    f32 = jnp.float32
    args = (S((rows, length, heads, head_dim), BF16), S((rows, length, heads), f32), S((heads,), f32),
            S((rows, length, groups, state), BF16), S((rows, length, groups, state), BF16), S((heads,), f32),
            S((rows, length), jnp.int32))
    forward = jax.jit(lambda *a: ssm_ops.ssd_chunked(*a, 256)[0])
    reports = assert_compiles(gpu_lowering.lower_for_h100(forward, *args), ("ssd_chunked",))
    assert all(report.wgmma for report in reports)
    prefill = jax.jit(lambda *a: ssm_ops.ssd_chunked(*a[:7], 256, a[7]))
    states = S((rows, heads, head_dim, state), f32)
    assert_compiles(gpu_lowering.lower_for_h100(prefill, *args, states), ("ssd_chunked",))
    # (A loss that reads y, so the forward kernel stays in the gradient's graph.)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ssm_ops.ssd_chunked(*a, 256)[0] ** 2), argnums=(0, 1, 2, 3, 4, 5)))
    reports = assert_compiles(gpu_lowering.lower_for_h100(grads, *args), ("ssd_chunked", "ssd_states", "ssd_bwd"))
    assert all(report.wgmma for report in reports)


# The serving path (rows, tokens, heads, head dim, groups, state, runs with a state): Mamba-2-2.7B's mixer (80 heads
# of 64, one group, state 128) on a flat ragged step (one row, 64 slots), and on a decode step (one row per
# sequence, one token each).
SSD_STATE_SHAPES = {"mamba2-2.7b-serving": (1, 2048, 80, 64, 1, 128, 64),
                    "mamba2-2.7b-decode-b64": (64, 1, 80, 64, 1, 128, 1)}


@pytest.mark.parametrize("shape", sorted(SSD_STATE_SHAPES))
def test_ssd_from_states_kernel_compiles(shape):
    """The chunked SSD with per-run initial states in and final states out, through `ops`, without spills at P = 64,
    N = 128."""
    from pallas_kernels.ssm import ops as ssm_ops

    rows, length, heads, head_dim, groups, state, runs = SSD_STATE_SHAPES[shape]
    f32 = jnp.float32
    args = (S((rows, length, heads, head_dim), BF16), S((rows, length, heads), f32), S((heads,), f32),
            S((rows, length, groups, state), BF16), S((rows, length, groups, state), BF16), S((heads,), f32),
            S((rows, length), jnp.int32), S((rows, runs, heads, head_dim, state), f32))
    forward = jax.jit(lambda *a: ssm_ops.ssd_chunked_states(*a[:7], 64, a[7]))
    assert_compiles(gpu_lowering.lower_for_h100(forward, *args), ("ssd_from_states",))


# RecurrentGemma's RG-LRU scan (rows, tokens, lru_width): 2B training rows, 9B long prefill.
RGLRU_SHAPES = {"recurrentgemma-2b-train": (8, 2048, 2560), "recurrentgemma-9b-prefill": (1, 8192, 4096)}


@pytest.mark.parametrize("shape", sorted(RGLRU_SHAPES))
def test_rglru_scan_kernel_compiles(shape):
    """The dense RG-LRU forward and its gradient through `ops`: the scan kernel forward and run from the end."""
    from pallas_kernels import rglru

    rows, length, channels = RGLRU_SHAPES[shape]
    tokens = S((rows, length, channels), BF16)

    def loss(x, input_gate, recurrent_gate, a_param, reset, segment_ids):
        return jnp.sum(rglru.rg_lru(x, input_gate, recurrent_gate, a_param, reset, segment_ids)[0])

    args = (tokens, tokens, tokens, S((channels,), BF16), S((rows, length), jnp.bool_), S((rows, length), jnp.int32))
    lowered = gpu_lowering.lower_for_h100(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), *args)
    assert_compiles(lowered, ("rglru_scan_d32", "rglru_scan_d32_reverse"))


# The serving path (rows, tokens, lru_width, runs with a state): 2B and 9B on a flat ragged step (one row, 64 slots)
# and on a decode step (one row per sequence, one token each).
RGLRU_STATE_SHAPES = {
    "recurrentgemma-2b-serving": (1, 2048, 2560, 64), "recurrentgemma-2b-decode-b64": (64, 1, 2560, 1),
    "recurrentgemma-9b-serving": (1, 2048, 4096, 64), "recurrentgemma-9b-decode-b64": (64, 1, 4096, 1),
}


@pytest.mark.parametrize("shape", sorted(RGLRU_STATE_SHAPES))
def test_rglru_from_states_kernel_compiles(shape):
    """The RG-LRU with per-run initial states in and final states out, through `ops`."""
    from pallas_kernels import rglru

    rows, length, channels, runs = RGLRU_STATE_SHAPES[shape]
    gate = S((rows, length, channels), jnp.float32)
    args = (S((rows, length, channels), BF16), gate, gate, S((channels,), BF16), S((rows, length), jnp.bool_),
            S((rows, length), jnp.int32), S((rows, runs, channels), jnp.float32))
    assert_compiles(gpu_lowering.lower_for_h100(jax.jit(rglru.rg_lru), *args), ("rglru_from_states_d32",))


# Qwen3-Next's Gated DeltaNet (rows, tokens, q/k heads, value heads, key dim, value dim): 80B-A3B's mixer on
# training rows.
GATED_DELTA_SHAPES = {"qwen3-next-80b-train": (2, 2048, 16, 32, 128, 128)}


@pytest.mark.parametrize("shape", sorted(GATED_DELTA_SHAPES))
def test_gated_delta_kernels_compile(shape):
    """The dense gated delta rule through `ops` reaches the chunked forward kernel, and its gradient the three
    backward kernels (states, reverse state adjoints, per-chunk gradients), none spilling at K = V = 128."""
    from pallas_kernels import gated_delta

    rows, length, groups, heads, key_dim, value_dim = GATED_DELTA_SHAPES[shape]
    f32 = jnp.float32
    args = (S((rows, length, groups, key_dim), BF16), S((rows, length, groups, key_dim), BF16),
            S((rows, length, heads, value_dim), BF16), S((rows, length, heads), f32), S((rows, length, heads), f32),
            S((rows, length), jnp.int32))
    forward = jax.jit(lambda *a: gated_delta.gated_delta(*a, 64)[0])
    assert_compiles(gpu_lowering.lower_for_h100(forward, *args), ("gated_delta_l",))
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(gated_delta.gated_delta(*a, 64)[0] ** 2), argnums=(0, 1, 2, 3, 4)))
    assert_compiles(gpu_lowering.lower_for_h100(grads, *args),
                    ("gated_delta_l", "gated_delta_states", "gated_delta_dstates", "gated_delta_bwd"))


# The serving path (rows, tokens, q/k heads, value heads, key dim, value dim, runs with a state): 80B-A3B's mixer on
# a flat ragged step (one row, 64 slots), and on a decode step (one row per sequence, one token each).
GATED_DELTA_STATE_SHAPES = {"qwen3-next-80b-serving": (1, 2048, 16, 32, 128, 128, 64),
                            "qwen3-next-80b-decode-b64": (64, 1, 16, 32, 128, 128, 1)}


@pytest.mark.parametrize("shape", sorted(GATED_DELTA_STATE_SHAPES))
def test_gated_delta_from_states_kernel_compiles(shape):
    """The gated delta rule with per-run initial states in and final states out, through `ops`, without spills at
    K = V = 128."""
    from pallas_kernels import gated_delta

    rows, length, groups, heads, key_dim, value_dim, runs = GATED_DELTA_STATE_SHAPES[shape]
    f32 = jnp.float32
    args = (S((rows, length, groups, key_dim), BF16), S((rows, length, groups, key_dim), BF16),
            S((rows, length, heads, value_dim), BF16), S((rows, length, heads), f32), S((rows, length, heads), f32),
            S((rows, length), jnp.int32), S((rows, runs, heads, key_dim, value_dim), f32))
    forward = jax.jit(lambda *a: gated_delta.gated_delta(*a[:6], 64, a[6]))
    assert_compiles(gpu_lowering.lower_for_h100(forward, *args), ("gated_delta_from_states",))


@pytest.mark.parametrize("shape", sorted(MOE_SHAPES))
def test_mosaic_grouped_matmul_lowers(shape):
    """The Mosaic GPU forward: lowered for an H100 (layout inference, the shared-memory budget), its
    module parsed back and verified, with TMA and wgmma in it. PTX needs the CUDA plugin (a GPU)."""
    from pallas_kernels.moe import mosaic_kernel

    rows, depth, width, groups = MOE_SHAPES[shape]
    args = (S((rows, depth), BF16), S((groups, depth, width), BF16), S((groups,), jnp.int32))
    modules = gpu_lowering.mosaic_modules(gpu_lowering.lower_for_h100(mosaic_kernel.gmm, *args))
    assert len(modules) == 1 and modules[0].wgmma and modules[0].tma, [m.summary() for m in modules]


def test_invalid_triton_ir_is_reported():
    """The check itself: a module that does not verify raises (the i1-typed loop bound that
    `jnp.where(pred, n, 0)` gave the old MoE kernel), so the tests above cannot pass vacuously."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    def kernel(n_ref, x_ref, o_ref):
        steps = jnp.where(n_ref[0] > 0, 4, 0)  # jax's Triton lowering types the branches as the predicate: i1
        o_ref[...] = jax.lax.fori_loop(0, steps, lambda i, acc: acc + x_ref[...], jnp.zeros((16, 16), jnp.float32))

    call = pl.pallas_call(kernel, out_shape=S((16, 16), jnp.float32), compiler_params=pltriton.CompilerParams(),
                          name="bool_loop_bound")
    lowered = gpu_lowering.lower_for_h100(jax.jit(call), S((1,), jnp.int32), S((16, 16), jnp.float32))
    with pytest.raises(gpu_lowering.TritonIRError, match="does not verify|pipeline failed"):
        gpu_lowering.check_lowered(lowered)


# -- model steps ---------------------------------------------------------------------------------

# Families whose serving step must reach the paged attention kernel (and the MoE kernel where marked).
# "qwen2-groups7" is not in tests/tiny_models.py's shared table: only its config is needed here.
SERVING_FAMILIES = {
    "llama-gqa": False,
    "qwen2-groups7": False,
    "mixtral-moe": True,
    "gpt_oss-sinks-sliding": True,
    "bloom-alibi": False,
    "minicpm3-mla-longrope": False,
    "gemma2-softcaps": False,
    "llama4-chunked-nope-moe": True,
}
GROUPS7 = dict(num_attention_heads=14, num_key_value_heads=2, head_dim=16, hidden_size=64)
# (tokens, sequences, pages per sequence): a decode step for every family, and a prefill chunk where
# the step's own kernels differ (each attention variant's prefill tiles are in PAGED_CASES above).
STEP_SHAPES = {"decode": (8, 8, 8), "prefill": (64, 2, 8)}
PREFILL_TOO = ("llama-gqa", "mixtral-moe")
EXPANDED_TOO = ("minicpm3-mla-longrope",)  # MLA: also the prefill step's expanded variant (serving/engine/mla_prefill.py)
SPANS_TOO = ("llama-gqa",)  # also the prefill step with bidirectional spans (`visible_until`) through scanned layers
PAGE_SIZE = 16


def tiny_config(name: str, folder, **overrides):
    """The family's ModelConfig in bfloat16 from a config.json alone (lowering needs no weights); `overrides`
    change the tiny case's HF config."""
    import dataclasses

    from model_lib import load_config
    from tests.tiny_models import CASES_BY_NAME, TinyCase

    if name == "qwen2-groups7":
        case = TinyCase(name, "Qwen2Config", GROUPS7)
    else:
        case = CASES_BY_NAME[name]
    case = dataclasses.replace(case, overrides={**case.overrides, **overrides})
    hf = case.hf_config()
    raw = hf.to_dict()
    raw["architectures"] = [case.hf_architecture()]
    (folder / "config.json").write_text(json.dumps(raw))
    config, _ = load_config(folder, "bfloat16")
    return config


@pytest.mark.parametrize("family", sorted(SERVING_FAMILIES))
def test_serving_step_compiles_with_kernels(family, tmp_path):
    from flax import nnx

    from model_lib import CausalLM
    from serving.engine.runner import ModelRunner

    config = tiny_config(family, tmp_path)
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))  # shapes only: nothing to initialise
    runner = ModelRunner(model, num_pages=64, page_size=PAGE_SIZE, max_num_seqs=8,
                         max_num_batched_tokens=64, max_model_len=PAGE_SIZE * 8, scan_layers=True)
    expected = ("ragged_paged_attention", "gmm") if SERVING_FAMILIES[family] else ("ragged_paged_attention",)
    for name, shape in STEP_SHAPES.items():
        if name == "prefill" and family not in PREFILL_TOO:
            continue
        lowered = gpu_lowering.lower_for_h100(runner._step, *gpu_lowering.abstract(runner.step_args(runner.empty_inputs(shape))))
        assert_compiles(lowered, expected)
    if family in EXPANDED_TOO:  # the absorbed rows still reach the kernel beside the expanded ones
        inputs = runner.empty_inputs(STEP_SHAPES["prefill"])
        inputs.batch = inputs.batch.replace(expanded_from=np.int32(0))
        lowered = gpu_lowering.lower_for_h100(runner._step, *gpu_lowering.abstract(runner.step_args(inputs)))
        assert_compiles(lowered, expected)
    if family in SPANS_TOO:
        inputs = runner.empty_inputs(STEP_SHAPES["prefill"], spans=True)
        lowered = gpu_lowering.lower_for_h100(runner._step, *gpu_lowering.abstract(runner.step_args(inputs)))
        reports = assert_compiles(lowered, expected)
        assert any(r.name.endswith("_spans") for r in reports), [r.name for r in reports]


# family -> (HF config overrides, the state kernel its recurrent layers must reach): Qwen3-Next with value heads of
# 32 (a whole kernel block; the table's 8 is below a Triton tile), the Mamba-2 families with SSD_TRAINING_FAMILIES'
# overrides (likewise).
RECURRENT_SERVING = {"mamba-tied": ({}, "selective_scan_from_states"),
                     "qwen3_next-hybrid": (dict(linear_value_head_dim=32), "gated_delta_from_states"),
                     "recurrentgemma-local-mqa": ({}, "rglru_from_states"),
                     "mamba2-groups-chunked": (dict(num_heads=4, head_dim=32, state_size=16), "ssd_from_states"),
                     "granitemoehybrid-nope": (dict(mamba_d_state=16), "ssd_from_states")}


@pytest.mark.parametrize("family", sorted(RECURRENT_SERVING))
def test_recurrent_serving_step_reaches_the_state_kernels(family, tmp_path):
    """A prefill step of a recurrent model (its chunks continuing from the slots' states) runs the scan kernel
    with states in and out (for Qwen3-Next beside the paged attention kernel)."""
    from flax import nnx

    from model_lib import CausalLM
    from serving.engine.runner import ModelRunner

    overrides, kernel = RECURRENT_SERVING[family]
    config = tiny_config(family, tmp_path, **overrides)  # outside the trace (RecurrentGemma's config rounds on jnp)
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    runner = ModelRunner(model, num_pages=64, page_size=PAGE_SIZE, max_num_seqs=8, max_num_batched_tokens=64,
                         max_model_len=PAGE_SIZE * 8)
    lowered = gpu_lowering.lower_for_h100(
        runner._step, *gpu_lowering.abstract(runner.step_args(runner.empty_inputs(STEP_SHAPES["prefill"])))
    )
    assert_compiles(lowered, (kernel,))


# quantization -> the fused kernel its linear layers must reach
WEIGHT_ONLY_KERNELS = {"int4": "int4_matmul", "int8": "int8_matmul", "gguf-Q4_1": "block4_matmul"}


@pytest.mark.parametrize("method", sorted(WEIGHT_ONLY_KERNELS))
def test_weight_only_serving_step_reaches_the_fused_kernel(method, tmp_path):
    """A weight-only quantized model's decode step runs its linear layers through the fused kernel."""
    from model_lib import from_config
    from model_lib.lora import quantization_targets, quantize_model_weight_only
    from model_lib.quantization.gguf_blocks import quantize_gguf
    from serving.engine.runner import ModelRunner

    model = from_config(tiny_config("llama-gqa", tmp_path))
    if method.startswith("gguf-"):  # GGUF blocks, as `quantization="gguf"` loads them
        for layer in quantization_targets(model).values():
            layer.quantized, layer.kernel = quantize_gguf(np.asarray(layer.kernel[...]), method[5:]), None
    else:
        quantize_model_weight_only(model, method)
    runner = ModelRunner(model, num_pages=64, page_size=PAGE_SIZE, max_num_seqs=8,
                         max_num_batched_tokens=64, max_model_len=PAGE_SIZE * 8, scan_layers=True)
    lowered = gpu_lowering.lower_for_h100(
        runner._step, *gpu_lowering.abstract(runner.step_args(runner.empty_inputs(STEP_SHAPES["decode"])))
    )
    assert_compiles(lowered, ("ragged_paged_attention", WEIGHT_ONLY_KERNELS[method]))


def test_multi_lora_serving_step_reaches_the_kernel(tmp_path):
    """A decode step with served LoRA adapters runs every layer's adapter product through the grouped matmul."""
    from flax import nnx

    from model_lib import CausalLM
    from serving.engine.runner import ModelRunner
    from serving.lora import LoRAManager

    model = nnx.eval_shape(lambda: CausalLM(tiny_config("llama-gqa", tmp_path), rngs=nnx.Rngs(0)))
    lora = LoRAManager(model, max_loras=4, max_lora_rank=16)
    runner = ModelRunner(model, num_pages=64, page_size=PAGE_SIZE, max_num_seqs=8, max_num_batched_tokens=64,
                         max_model_len=PAGE_SIZE * 8, lora=lora)
    lowered = gpu_lowering.lower_for_h100(
        runner._step, *gpu_lowering.abstract(runner.step_args(runner.empty_inputs(STEP_SHAPES["decode"])))
    )
    reports = assert_compiles(lowered, ("ragged_paged_attention", "gmm_"))
    assert len([r for r in reports if r.name.startswith("gmm_")]) >= 2, [r.name for r in reports]


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_quantized_kv_serving_step_reaches_the_kernel(kv_cache_dtype, tmp_path):
    """A decode step over int8 / fp8 KV pages (`kv_cache_dtype`) runs the paged attention kernel on them."""
    from flax import nnx

    from model_lib import CausalLM
    from pallas_kernels.paged_attention.kv_quant import resolve_kv_cache_dtype
    from serving.engine.runner import ModelRunner

    config = tiny_config("llama-gqa", tmp_path)
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    dtype = resolve_kv_cache_dtype(kv_cache_dtype, config.dtype)
    runner = ModelRunner(model, num_pages=64, page_size=PAGE_SIZE, max_num_seqs=8, max_num_batched_tokens=64,
                         max_model_len=PAGE_SIZE * 8, kv_cache_dtype=dtype)
    lowered = gpu_lowering.lower_for_h100(
        runner._step, *gpu_lowering.abstract(runner.step_args(runner.empty_inputs(STEP_SHAPES["decode"])))
    )
    reports = assert_compiles(lowered, ("ragged_paged_attention",))
    assert all(r.name.endswith(f"_{dtype.name}") for r in reports if r.name.startswith("ragged")), reports


TRAINING_FAMILIES = {"llama-gqa": (), "mixtral-moe": ("gmm_", "gmm_t", "tgmm")}


def _training_step_lowered(folder, tmp_path):
    """The trainer's jitted step (full fine-tuning, bf16 compute) for a checkpoint folder, lowered for CUDA."""
    from training.config import TrainConfig
    from training.trainer import Trainer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "abcdefgh" * (1 + i % 3)}) + "\n" for i in range(8)))
    trainer = Trainer(TrainConfig(model_name_or_path=str(folder), training_data_path=str(data),
                                  output_dir=str(tmp_path / "out"), peft_method="none", max_steps=1,
                                  per_device_train_batch_size=2, max_seq_length=32, torch_dtype="bfloat16",
                                  progress_bar=False))
    batches = trainer._device_batch([trainer.micro_batch(0)])
    args = (trainer.trainable, trainer.opt_state, trainer.rng_state, trainer.frozen, batches, np.int32(0))
    return gpu_lowering.lower_for_h100(trainer.train_step, *gpu_lowering.abstract(args))


@pytest.mark.parametrize("family", sorted(TRAINING_FAMILIES))
def test_training_step_compiles(family, tiny_checkpoint, tmp_path):
    """The trainer's jitted step (full fine-tuning, bf16 compute): for MoE, all three grouped matmul kernels."""
    folder, _ = tiny_checkpoint(family)
    assert_compiles(_training_step_lowered(folder, tmp_path), TRAINING_FAMILIES[family])


def _tiny_training_step_lowered(name: str, overrides: dict, tmp_path):
    """`_training_step_lowered` for the tiny case `name` with `overrides` on its config."""
    import dataclasses

    from tests.tiny_models import CASES_BY_NAME, build_checkpoint

    case = CASES_BY_NAME[name]
    build_checkpoint(dataclasses.replace(case, overrides={**case.overrides, **overrides}), tmp_path / "model")
    return _training_step_lowered(tmp_path / "model", tmp_path)


def test_qwen3_next_training_step_reaches_the_gated_delta_kernels(tmp_path):
    """Qwen3-Next's training step: its DeltaNet layers (the tiny case with value heads of 32, a whole kernel
    block; the table's value dim of 8 is below a Triton tile) reach the gated delta forward and backward kernels."""
    assert_compiles(_tiny_training_step_lowered("qwen3_next-hybrid", {"linear_value_head_dim": 32}, tmp_path),
                    ("gated_delta_l", "gated_delta_states", "gated_delta_dstates", "gated_delta_bwd"))


# Mamba-2 families whose training step must reach the SSD kernels: the tiny case and the overrides that give its
# mixer kernel tiles (a head dim of 32, a state of 16; the table's 16 and 8 are below them).
SSD_TRAINING_FAMILIES = {
    "mamba2-groups-chunked": dict(num_heads=4, head_dim=32, state_size=16),
    "granitemoehybrid-nope": dict(mamba_d_state=16),
}


@pytest.mark.parametrize("family", sorted(SSD_TRAINING_FAMILIES))
def test_mamba2_training_step_reaches_the_ssd_kernels(family, tmp_path):
    """Mamba2ForCausalLM's and GraniteMoeHybridForCausalLM's training steps: their Mamba-2 layers reach the SSD
    forward kernel and both backward kernels (no reference VJP)."""
    assert_compiles(_tiny_training_step_lowered(family, SSD_TRAINING_FAMILIES[family], tmp_path),
                    ("ssd_chunked", "ssd_states", "ssd_bwd"))


def test_sharded_serving_step_compiles_with_kernels_on_local_shards():
    """The serving step on an abstract mesh of 8 H100s (ep preset: expert 4 x tensor 2): the kernels run under
    shard_map on local shards (2 of 4 query heads, 1 of 2 kv heads; 2 of 8 experts, half their width)."""
    from functools import partial

    from flax import nnx
    from jax.sharding import AbstractMesh, AxisType

    from model_lib import CausalLM
    from model_lib.config import ModelConfig
    from model_lib.sharding import MESH_AXES, ShardingPlan, load_mesh_preset
    from serving.engine import runner as runner_module
    from serving.engine.step_shardings import place_serving_step

    config = ModelConfig(
        architecture="MixtralForCausalLM", family="mixtral", vocab_size=64, hidden_size=64, intermediate_size=64,
        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
        layer_types=("full_attention",), num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
        moe_layers=(True,), dtype="bfloat16",
    )
    mesh = AbstractMesh((1, 1, 2, 4), MESH_AXES, axis_types=(AxisType.Auto,) * 4, abstract_device=gpu_lowering.H100)
    plan = ShardingPlan(mesh, load_mesh_preset("ep").rules)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))

    def placed(variable):
        value = variable.get_value()
        sharding = plan.variable_sharding(variable, value.shape) if "logical_axes" in variable.get_metadata() else (
            plan.replicated())
        return S(value.shape, value.dtype, sharding=sharding)

    state = jax.tree.map(placed, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    shape = (2, 64, PAGE_SIZE, 16)
    cache = S(shape, BF16, sharding=plan.sharding(("kv_heads", None, None, None), shape))
    params, treedef = jax.tree.flatten(state)
    _, shardings = place_serving_step(plan, params, [(cache, cache)], num_host_inputs=5)
    step = jax.jit(partial(runner_module._step, graphdef, treedef, plan), donate_argnums=(1,), **shardings)
    inputs = runner_module.ModelRunner.empty_inputs(STEP_SHAPES["decode"])
    host_inputs = (inputs.input_ids, inputs.feed, np.zeros(8, np.int32), inputs.batch, inputs.logits_indices)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = step.trace(params, [(cache, cache)], *host_inputs).lower(
            lowering_platforms=(gpu_lowering.H100.platform,))
    # Local shapes: expert width 64 / 2 = 32 in the gate/up kernels (n) and the down kernel (k).
    assert_compiles(lowered, ("ragged_paged_attention", "gmm_m16_n32_k64", "gmm_m16_n64_k32"))
