"""Grouped (ragged) matmul: ragged_dot against a dense per-group loop, the Pallas kernels
(interpret mode) against both, forward and both gradients.

Interpret mode starts every output as NaN, so an element no program writes fails the
comparisons. Shapes stay tiny (one compilation per dtype and function; group sizes are
data) with 16-wide tiles so that every kernel runs several row, K and N tiles.
"""

from __future__ import annotations

import importlib.util
import pathlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe import grouped_matmul, reference, triton_kernel
from pallas_kernels.moe.ops import choose_implementation

M, K, N, G = 40, 32, 48, 5
BLOCKS = dict(block_m=16, block_n=16, block_k=16)

# Group sizes by case (sum <= M). "random" cases are drawn per seed in `sizes_for`.
CASES = {
    "mixed_with_empty": [7, 0, 19, 3, 6],  # sum 35 < M, one empty group
    "empty_groups_full": [0, 12, 0, 0, 28],  # sum == M
    "one_group_all_rows": [0, 0, 40, 0, 0],
    "under_filled": [3, 5, 0, 2, 1],  # sum 11: most rows are padding
    "all_empty": [0, 0, 0, 0, 0],
    "last_group_only": [0, 0, 0, 0, 17],
    "random": None,
}


def sizes_for(case: str, seed: int, num_rows: int = M, num_groups: int = G) -> np.ndarray:
    if CASES.get(case) is not None:
        return np.asarray(CASES[case], np.int32)
    rng = np.random.RandomState(seed)
    total = rng.randint(num_rows // 2, num_rows + 1)
    cuts = np.sort(rng.randint(0, total + 1, num_groups - 1))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int32)


def make_inputs(seed: int, num_rows: int = M, dtype=jnp.float32):
    rng = np.random.RandomState(seed)
    lhs = rng.randn(num_rows, K).astype(np.float32)
    rhs = (rng.randn(G, K, N) / np.sqrt(K)).astype(np.float32)
    cotangent = rng.randn(num_rows, N).astype(np.float32)  # non-zero on padding rows too
    return jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype), jnp.asarray(cotangent)


def op(implementation):
    if implementation == "dense":
        return reference.grouped_matmul_dense
    options = BLOCKS if implementation == "interpret" else {}
    return partial(grouped_matmul, implementation=implementation, **options)


@partial(jax.jit, static_argnames="implementation")
def forward(lhs, rhs, group_sizes, implementation):
    return op(implementation)(lhs, rhs, group_sizes)


@partial(jax.jit, static_argnames="implementation")
def gradients(lhs, rhs, group_sizes, cotangent, implementation):
    """(out, d_lhs, d_rhs) for the loss sum(out * cotangent)."""

    def loss(lhs, rhs):
        out = op(implementation)(lhs, rhs, group_sizes)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), (d_lhs, d_rhs) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs, rhs)
    return out, d_lhs, d_rhs


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), "non-finite values (an unwritten output?)"
    scale = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (scale if scale > 0 else 1.0))


@pytest.mark.parametrize("case", sorted(CASES))
def test_ragged_dot_matches_dense_loop(case):
    lhs, rhs, cotangent = make_inputs(seed=1)
    sizes = jnp.asarray(sizes_for(case, seed=1))
    want = gradients(lhs, rhs, sizes, cotangent, "dense")
    got = gradients(lhs, rhs, sizes, cotangent, "reference")
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
    out = forward(lhs, rhs, sizes, "reference")
    assert not np.asarray(out[int(sizes.sum()):]).any(), "rows past sum(group_sizes) must be zeros"


@pytest.mark.parametrize("case", sorted(CASES))
def test_schedule_visits_grid_tiles_once_per_group(case):
    """Row tiles sit on the grid; a tile shared by k groups gets k visits; every row has one owner."""
    block_m = 16
    sizes = sizes_for(case, seed=2)
    visit_group, visit_tile, visit_start, visit_end = map(
        np.asarray, triton_kernel.schedule(jnp.asarray(sizes), M, block_m))
    assert visit_group.shape == (-(-M // block_m) + G,)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.full(M, -1)
    for group, tile, start, end in zip(visit_group, visit_tile, visit_start, visit_end):
        if group < 0:
            continue
        group_start, group_end = (bounds[group], bounds[group + 1]) if group < G else (bounds[-1], M)
        assert (start, end) == (group_start, group_end)
        rows = np.arange(max(start, tile * block_m), min(end, (tile + 1) * block_m))
        assert rows.size, "a visit without rows of its group"
        assert (owner[rows] == -1).all(), "a row in two visits"
        owner[rows] = group
    expected = np.concatenate([np.full(size, g) for g, size in enumerate(sizes)] + [np.full(M - sizes.sum(), G)])
    np.testing.assert_array_equal(owner, expected)
    used = visit_group >= 0
    assert used[: used.sum()].all(), "unused visits come last"
    pieces = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])] + [(bounds[-1], M)]
    assert used.sum() == sum((hi - 1) // block_m - lo // block_m + 1 for lo, hi in pieces if hi > lo)


def test_block_configs_follow_the_shape():
    decode = triton_kernel.gmm_config(16, 4096, 14336, 8, 2)
    prefill = triton_kernel.gmm_config(8192, 4096, 14336, 8, 2)
    assert decode.block_m == 16 and decode.block_k == 128 and decode.num_stages == 4
    assert prefill.block_m == 128 and prefill.num_warps == 8
    weight_grad = triton_kernel.tgmm_config(8192, 4096, 14336, 8, 2)
    assert weight_grad.block_k == 128 and weight_grad.block_m == 64


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_forward_matches_references(case):
    lhs, rhs, _ = make_inputs(seed=3)
    sizes = jnp.asarray(sizes_for(case, seed=3))
    out = forward(lhs, rhs, sizes, "interpret")
    assert out.dtype == lhs.dtype and out.shape == (M, N)
    np.testing.assert_allclose(out, forward(lhs, rhs, sizes, "reference"), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out, forward(lhs, rhs, sizes, "dense"), atol=1e-5, rtol=1e-5)
    assert not np.asarray(out[int(sizes.sum()):]).any(), "rows past sum(group_sizes) must be zeros"


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_gradients_match_references(case):
    """d_lhs (the kernel on rhs read transposed) and d_rhs (tgmm) through the custom VJP."""
    lhs, rhs, cotangent = make_inputs(seed=4)
    sizes = jnp.asarray(sizes_for(case, seed=4))
    got = gradients(lhs, rhs, sizes, cotangent, "interpret")
    for implementation in ("reference", "dense"):
        want = gradients(lhs, rhs, sizes, cotangent, implementation)
        for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"{name} vs {implementation}")
    d_lhs, d_rhs = got[1], got[2]
    assert not np.asarray(d_lhs[int(sizes.sum()):]).any(), "padding rows get no gradient"
    for g in np.flatnonzero(np.asarray(sizes) == 0):
        assert not np.asarray(d_rhs[g]).any(), f"empty group {g} must get a zero weight gradient"


def test_padding_rows_may_hold_anything():
    """Rows past sum(group_sizes) are garbage (NaN, inf) in lhs and in the cotangent: outputs,
    d_rhs and the real rows of d_lhs must not see them (the references would: 0 * inf in d_rhs,
    so they get zeros there)."""
    lhs, rhs, cotangent = make_inputs(seed=5)
    sizes = jnp.asarray(CASES["mixed_with_empty"])
    total = int(sizes.sum())
    want = gradients(lhs.at[total:].set(0), rhs, sizes, cotangent.at[total:].set(0), "dense")
    lhs = lhs.at[total:].set(jnp.nan).at[total + 1].set(jnp.inf)
    cotangent = cotangent.at[total:].set(jnp.inf)
    out, d_lhs, d_rhs = gradients(lhs, rhs, sizes, cotangent, "interpret")
    np.testing.assert_allclose(out, want[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(d_rhs, want[2], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(d_lhs[:total], want[1][:total], atol=1e-5, rtol=1e-5)
    assert not np.asarray(out[total:]).any()


@pytest.mark.parametrize("case", ["random", "empty_groups_full"])
def test_kernel_bfloat16(case):
    """bf16 operands, float32 accumulation: compared with float32 references on the same
    (bf16-rounded) values, within bf16 output rounding."""
    lhs, rhs, cotangent = make_inputs(seed=6, dtype=jnp.bfloat16)
    sizes = jnp.asarray(sizes_for(case, seed=6))
    out, d_lhs, d_rhs = gradients(lhs, rhs, sizes, cotangent, "interpret")
    assert out.dtype == d_lhs.dtype == d_rhs.dtype == jnp.bfloat16
    upcast = (lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    for implementation in ("reference", "dense"):
        want = gradients(*upcast, sizes, cotangent, implementation)
        for name, g, w in zip(("out", "d_lhs", "d_rhs"), (out, d_lhs, d_rhs), want):
            error = relative_error(g, w)
            assert error < 1e-2, f"{name} vs {implementation}: relative error {error:.2e}"
    assert not np.asarray(out[int(sizes.sum()):].astype(jnp.float32)).any()


def test_kernel_fewer_rows_than_a_tile():
    """M = 12 < block_m = 16: the row dimension is padded to one tile and cut back."""
    lhs, rhs, cotangent = make_inputs(seed=7, num_rows=12)
    sizes = jnp.asarray([5, 0, 6, 0, 0], jnp.int32)
    got = gradients(lhs, rhs, sizes, cotangent, "interpret")
    want = gradients(lhs, rhs, sizes, cotangent, "reference")
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


def test_choose_implementation_and_supported_shapes():
    lhs, rhs, _ = make_inputs(seed=0)
    assert choose_implementation(lhs, rhs) == "kernel"  # on a CUDA lowering; other platforms take ragged_dot
    assert choose_implementation(lhs[:, :24], rhs[:, :24]) == "reference"
    assert triton_kernel.supported((M, K), (G, K, N), jnp.bfloat16, jnp.bfloat16)
    assert not triton_kernel.supported((M, 24), (G, 24, N), jnp.float32, jnp.float32)  # K not a multiple of 16
    assert not triton_kernel.supported((M, K), (G, K, 40), jnp.float32, jnp.float32)  # N not a multiple of 16
    assert not triton_kernel.supported((M, K), (G, K, N), jnp.bfloat16, jnp.float32)  # mixed dtypes
    assert not triton_kernel.supported((M, K), (G, K, N), jnp.int8, jnp.int8)
    assert triton_kernel.fit_block(14336, 128) == 128 and triton_kernel.fit_block(768, 128) == 128
    assert triton_kernel.fit_block(48, 128) == 16 and triton_kernel.fit_block(40, 128) is None
    with pytest.raises(ValueError, match="implementation"):
        grouped_matmul(lhs, rhs, jnp.zeros((G,), jnp.int32), implementation="nope")
    with pytest.raises(ValueError, match="expected lhs"):
        grouped_matmul(lhs, rhs, jnp.zeros((G + 1,), jnp.int32))


def test_benchmark_dry_run_runs():
    """benchmarks/moe.py in its CPU mode (ragged_dot and dense paths, tiny shapes, one call each)."""
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "moe.py"
    spec = importlib.util.spec_from_file_location("benchmarks_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    records = module.main(["--dry-run", "--configs", "mixtral", "--implementations", "ragged_dot", "dense"])
    assert [r["rows"] for r in records] == [128] and records[0]["ragged_dot"]["ms"] > 0


# Compiled kernels on an NVIDIA GPU (not run without one). The dot tiles run in TF32 for float32.

GPU_SHAPES = {"few_large_groups": (512, 256, 384, 8), "many_small_groups": (384, 128, 256, 64)}


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("shape", sorted(GPU_SHAPES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("implementation", ["kernel", "mosaic"])
def test_kernel_matches_reference_on_gpu(shape, dtype, implementation):
    if implementation == "mosaic" and dtype == "float32":
        pytest.skip("the Mosaic kernel takes bfloat16/float16 only")
    num_rows, depth, width, groups = GPU_SHAPES[shape]
    rng = np.random.RandomState(groups)
    sizes = rng.multinomial(num_rows - 37, np.ones(groups) / groups).astype(np.int32)
    sizes[1] = 0  # an empty group; 37 padding rows at the end
    sizes[0] += num_rows - 37 - sizes.sum()
    lhs = jnp.asarray(rng.randn(num_rows, depth), dtype)
    rhs = jnp.asarray(rng.randn(groups, depth, width) / np.sqrt(depth), dtype)
    cotangent = jnp.asarray(rng.randn(num_rows, width), jnp.float32)
    sizes = jnp.asarray(sizes)

    def run(implementation, lhs, rhs):
        def loss(lhs, rhs):
            out = grouped_matmul(lhs, rhs, sizes, implementation=implementation)
            return jnp.sum(out.astype(jnp.float32) * cotangent), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs)
        return (out, *grads)

    got = run(implementation, lhs, rhs)
    with jax.default_matmul_precision("float32"):  # an exact reference, not TF32
        want = run("reference", lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert g.dtype == lhs.dtype
        error = relative_error(g, w)
        assert error < (1e-2 if dtype == "bfloat16" else 2e-3), f"{name}: relative error {error:.2e}"
    assert not np.asarray(got[0][num_rows - 37:].astype(jnp.float32)).any()
